"""Expert parallelism with `lax.ragged_all_to_all`: dropless, no per-expert capacity padding.

GPU and TPU only: XLA:CPU does not implement ragged-all-to-all, so `bind` refuses this strategy on CPU
meshes with a pointer to `ep_all_to_all`. For CPU tests the same algorithm runs with `collective="emulated"`,
an all_gather-based implementation of ragged_all_to_all's documented semantics.

Per device (G = expert-axis size, E_l = E / G local experts, M = N*K local token copies):

  1. sort copies by expert; slice e of the sorted rows goes to device e // E_l (one slice per expert);
  2. all_to_all the per-expert counts, so each receiver knows how many rows every source sends for each
     of its local experts; the receiver lays its buffer out expert-major (expert l: source 0's rows,
     source 1's rows, ...), so the received rows are already grouped for the grouped matmul
     (`sort_ragged.grouped_matmul`: the Pallas gmm kernel or `lax.ragged_dot`);
  3. the receiver's offsets go back to the senders (ragged_all_to_all wants them sender-side);
  4. ragged_all_to_all forward, grouped matmuls, ragged_all_to_all back into the senders' sorted order,
     unsort, weight, sum over the K copies.

Receive buffer: `capacity_factor=None` sizes it for the worst case (G * N * min(K, E_l) rows, dropless);
a factor f sizes it f * M rows (M = what a device receives under perfect balance) and a receiver that
would overflow accepts rows in (local expert, source) order and drops the rest.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from deepmoe.layers.moe import swiglu
from deepmoe.layers.precision import compute_dtype
from deepmoe.moe_dispatch.ep_all_to_all import Layout
from deepmoe.moe_dispatch.sort_ragged import grouped_matmul


def receive_rows(num_tokens: int, cfg, expert_size: int, capacity_factor: float | None) -> int:
    k, local = cfg.experts_per_token, cfg.num_experts // expert_size
    worst = expert_size * num_tokens * min(k, local)
    if capacity_factor is None:
        return worst
    return max(1, min(worst, math.ceil(capacity_factor * num_tokens * k)))


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name):
    """ragged_all_to_all by its documented semantics, from all_gather + scatter (any backend; tests only:
    it moves G times the data)."""
    del recv_sizes  # implied by the senders' send_sizes
    g = jax.lax.axis_size(axis_name)
    me = jax.lax.axis_index(axis_name)
    per_device = input_offsets.shape[0] // g
    rows = operand.shape[0]
    operands = jax.lax.all_gather(operand, axis_name)  # [G, N, ...]
    offsets, sizes, targets = (jax.lax.all_gather(a, axis_name) for a in (input_offsets, send_sizes,
                                                                          output_offsets))  # [G, S]
    mine = me * per_device + jnp.arange(per_device)  # the slices every source addresses to me
    start = offsets[:, mine]  # [G, per_device]
    size = sizes[:, mine]
    target = targets[:, mine]
    r = jnp.arange(rows)
    source_row = start[..., None] + r  # [G, per_device, rows]
    dest_row = jnp.where(r < size[..., None], target[..., None] + r, output.shape[0])  # OOB -> dropped
    source = jnp.arange(g)[:, None, None]
    values = operands[source, jnp.minimum(source_row, rows - 1)]  # [G, per_device, rows, ...]
    values = values.reshape(-1, *operand.shape[1:])
    return output.at[dest_row.reshape(-1)].set(values, mode="drop")


def _collective(kind: str):
    if kind == "native":
        return jax.lax.ragged_all_to_all
    if kind == "emulated":
        return emulated_ragged_all_to_all
    raise ValueError(f"unknown ragged collective {kind!r}; use 'native' or 'emulated'")


def _exchange(a: jax.Array, axis: str) -> jax.Array:
    """[G, ...] -> [G, ...]: row j goes to device j; result row i came from device i."""
    return jax.lax.all_to_all(a, axis, 0, 0, tiled=True)


def ragged_body(params: dict, cfg, x: jax.Array, expert_ids: jax.Array, weights: jax.Array, lay: Layout,
                valid: jax.Array, *, capacity_factor: float | None, collective: str = "native"
                ) -> tuple[jax.Array, jax.Array]:
    """Per device: x [N, D], expert_ids/weights [N, K] -> (y [N, D] float32 partial over tensor, dropped)."""
    n, d = x.shape
    k = expert_ids.shape[-1]
    e, g, axis = cfg.num_experts, lay.expert_size, lay.expert_axis
    local = e // g
    m = n * k
    dtype = compute_dtype(cfg)
    ragged = _collective(collective)

    flat = expert_ids.reshape(-1)
    copy_valid = jnp.repeat(valid, k)
    order = jnp.argsort(flat, stable=True)
    all_counts = jnp.bincount(flat, length=e).astype(jnp.int32)
    starts = (jnp.cumsum(all_counts) - all_counts).astype(jnp.int32)  # [E] group starts in sorted order
    # Padding copies (split tokens) sort last within their expert: slices stop before them.
    counts = jnp.bincount(flat, weights=copy_valid.astype(jnp.int32), length=e).astype(jnp.int32)  # [E] offered
    rows = x.astype(dtype)[order // k]  # [M, D] sorted by expert

    # What every source sends me, per (source, local expert); and where my slices start at the sources.
    recv_counts = _exchange(counts.reshape(g, local), axis)  # [G src, E_l]
    src_starts = _exchange(starts.reshape(g, local), axis)  # [G src, E_l] their input offsets
    # Receive layout, expert-major: (l, i) -> offset; accept in that order up to the buffer size.
    buffer_rows = receive_rows(n, cfg, g, capacity_factor)
    by_expert = recv_counts.T.reshape(-1)  # [E_l * G], index l*G + i
    before = jnp.cumsum(by_expert) - by_expert
    accepted = jnp.clip(buffer_rows - before, 0, by_expert)
    offsets = jnp.minimum(before, buffer_rows)
    accepted_is = accepted.reshape(local, g).T  # [G src, E_l]
    offsets_is = offsets.reshape(local, g).T
    group_sizes = accepted.reshape(local, g).sum(axis=1).astype(jnp.int32)  # [E_l]
    # Tell the senders how many rows were accepted and where they land.
    sent = _exchange(accepted_is, axis).reshape(-1)  # [E]: my rows accepted by expert e's owner
    sent_to = _exchange(offsets_is, axis).reshape(-1)  # [E]

    buffer = ragged(rows, jnp.zeros((buffer_rows, d), dtype), starts, sent, sent_to,
                    accepted_is.reshape(-1), axis_name=axis)

    def grouped(lhs, rhs):
        return grouped_matmul(cfg, lhs, rhs, group_sizes)

    hidden = swiglu(cfg, grouped(buffer, params["w_gate"]), grouped(buffer, params["w_up"]))
    out = grouped(hidden, params["w_down"])  # [buffer_rows, D]; rows past sum(group_sizes) are never sent
    back = ragged(out, jnp.zeros((m, d), dtype), offsets_is.reshape(-1), accepted_is.reshape(-1),
                  src_starts.reshape(-1), sent, axis_name=axis)  # [M, D] in my sorted order

    rank = jnp.arange(m, dtype=jnp.int32) - starts[flat[order]]
    kept_sorted = rank < sent[flat[order]]
    w_sorted = jnp.where(kept_sorted, weights.reshape(-1)[order].astype(jnp.float32), 0.0)
    contrib = back.astype(jnp.float32) * w_sorted[:, None]
    y = jnp.zeros((m, d), jnp.float32).at[order].set(contrib, unique_indices=True)
    dropped = jnp.sum(~kept_sorted & copy_valid[order]).astype(jnp.float32)
    return y.reshape(n, k, d).sum(axis=1), dropped
