"""Expert parallelism with fixed-capacity `lax.all_to_all` (runs everywhere XLA runs, CPU included).

Also home of `MeshStrategy`, the mesh-bound form of every strategy: the routed experts run inside one
`jax.shard_map` over the whole mesh, tokens split over the batch axes, expert weights split over the expert
axis (experts) and the tensor axis (intermediate dim), partial sums reduced over tensor at the end.

Per device (G = expert-axis size, E_l = E / G local experts, N local tokens, K copies each):

  1. rank every token copy within its expert (stable, in token order); copies of rank >= C are dropped;
  2. build a send buffer [E, C, D] (expert-major, so destination device j owns rows j*E_l*C ...);
  3. all_to_all over the expert axis -> [G sources, E_l, C, D]; run the local experts as dense batched
     matmuls over the G*C rows of each (empty slots are zeros and stay zero through SwiGLU);
  4. all_to_all back, gather each kept copy's row, multiply by its routing weight, sum the K copies.

Capacity C per (source device, expert): `capacity_factor=None` (the default) is dropless, C = N (a token
never picks an expert twice); otherwise C = ceil(capacity_factor * N * K / E), at most N. Any factor
>= E / K is therefore dropless too. The spec (§7) drops no tokens, so dropping is opt-in.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from deepmoe.layers.kernels import use_pallas_kernels
from deepmoe.layers.moe import EXPERT_WEIGHTS, swiglu
from deepmoe.layers.precision import compute_dtype, matmul_precision


@dataclasses.dataclass(frozen=True)
class Layout:
    """How the mesh splits one MoE call (all static)."""

    batch_axes: tuple[str, ...]  # tokens split over these
    expert_axis: str | None  # routed experts split over this (None: every device holds every expert)
    expert_size: int
    tensor_axes: tuple[str, ...]  # expert intermediate dim split over these (partial sums psum'd)
    split_tokens: bool  # tokens replicated over the expert axis: each expert rank takes 1/G of them


def layout(mesh: Mesh, rules, *, expert_parallel: bool) -> Layout:
    from deepmoe.sharding import ShardingError

    batch = tuple(a for a in rules.mesh_axes("batch") if mesh.shape[a] > 1)
    tensor = tuple(a for a in rules.mesh_axes("expert_mlp") if mesh.shape[a] > 1)
    experts = tuple(a for a in rules.mesh_axes("experts") if mesh.shape[a] > 1)
    if len(experts) > 1:
        raise ShardingError(f"expert parallelism runs over one mesh axis, but ShardingRules.experts maps to "
                            f"{experts}; map 'experts' to a single axis")
    if not expert_parallel or not experts:
        return Layout(batch, None, 1, tensor, False)
    axis = experts[0]
    if axis in tensor:
        raise ShardingError(f"mesh axis {axis!r} shards both experts and expert_mlp; use distinct axes")
    return Layout(batch, axis, mesh.shape[axis], tensor, axis not in batch)


def _weight_specs(lay: Layout, experts_sharded: bool) -> dict[str, P]:
    e = lay.expert_axis if experts_sharded else None
    t = lay.tensor_axes or None
    return {"w_gate": P(e, None, t), "w_up": P(e, None, t), "w_down": P(e, t, None)}


def capacity(num_tokens: int, cfg, capacity_factor: float | None) -> int:
    """Slots per (source device, expert) for `num_tokens` local tokens."""
    if capacity_factor is None:
        return num_tokens
    slots = math.ceil(capacity_factor * num_tokens * cfg.experts_per_token / cfg.num_experts)
    return max(1, min(num_tokens, slots))


def expert_ffn(params: dict, cfg, h: jax.Array) -> jax.Array:
    """Dense batched experts: h [E_l, R, D] -> [E_l, R, D] in the compute dtype (empty rows stay 0)."""
    dtype, precision = compute_dtype(cfg), matmul_precision(cfg)

    def mm(spec, a, b):
        return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), precision=precision)

    hidden = swiglu(cfg, mm("erd,edi->eri", h, params["w_gate"]), mm("erd,edi->eri", h, params["w_up"]))
    return mm("eri,eid->erd", hidden, params["w_down"])


def rank_in_expert(flat_ids: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """flat_ids [M] -> (order: copies sorted by expert (stable), rank of each copy within its expert [M],
    copies per expert [E])."""
    m = flat_ids.shape[0]
    order = jnp.argsort(flat_ids, stable=True)
    counts = jnp.bincount(flat_ids, length=num_experts).astype(jnp.int32)
    starts = jnp.cumsum(counts) - counts
    rank_sorted = jnp.arange(m, dtype=jnp.int32) - starts[flat_ids[order]]
    rank = jnp.zeros(m, jnp.int32).at[order].set(rank_sorted, unique_indices=True)
    return order, rank, counts


def all_to_all_body(params: dict, cfg, x: jax.Array, expert_ids: jax.Array, weights: jax.Array, lay: Layout,
                    valid: jax.Array, *, capacity_factor: float | None) -> tuple[jax.Array, jax.Array]:
    """Per device: x [N, D], expert_ids/weights [N, K], valid [N] (False: padding) ->
    (y [N, D] float32, partial over tensor; number of dropped real token copies)."""
    n, d = x.shape
    k = expert_ids.shape[-1]
    e, g = cfg.num_experts, lay.expert_size
    c = capacity(n, cfg, capacity_factor)
    flat = expert_ids.reshape(-1)
    order, rank, counts = rank_in_expert(flat, e)
    starts = jnp.cumsum(counts) - counts
    # Send buffer [E, C, D]: slot (e, r) holds the r-th copy routed to expert e.
    slot_rank = jnp.arange(c, dtype=jnp.int32)
    filled = slot_rank[None, :] < counts[:, None]  # [E, C]
    copy = order[jnp.minimum(starts[:, None] + slot_rank[None, :], n * k - 1)]  # [E, C]
    send = jnp.where(filled[..., None], x.astype(compute_dtype(cfg))[copy // k], 0)  # [E, C, D]
    local_experts = e // g
    if lay.expert_axis is not None:
        recv = jax.lax.all_to_all(send.reshape(e * c, d), lay.expert_axis, 0, 0, tiled=True)
        h = recv.reshape(g, local_experts, c, d).transpose(1, 0, 2, 3).reshape(local_experts, g * c, d)
    else:
        h = send
    out = expert_ffn(params, cfg, h)
    if lay.expert_axis is not None:
        out = out.reshape(local_experts, g, c, d).transpose(1, 0, 2, 3).reshape(e * c, d)
        out = jax.lax.all_to_all(out, lay.expert_axis, 0, 0, tiled=True).reshape(e, c, d)
    kept = rank < c
    rows = out[flat, jnp.minimum(rank, c - 1)].astype(jnp.float32)  # [N*K, D]
    rows = rows * jnp.where(kept, weights.reshape(-1).astype(jnp.float32), 0.0)[:, None]
    dropped = jnp.sum(~kept & jnp.repeat(valid, k)).astype(jnp.float32)
    return rows.reshape(n, k, d).sum(axis=1), dropped


def local_body(run_local: Callable) -> Callable:
    """A single-device strategy (`sorted`, `dense`) as a per-device body: every device holds all experts."""

    def body(params, cfg, x, expert_ids, weights, lay, valid, **_):
        y = run_local(params, cfg, x[None], expert_ids[None], weights[None])[0]
        return y.astype(jnp.float32), jnp.zeros((), jnp.float32)

    return body


def run_sharded(body: Callable, params: dict, cfg, x: jax.Array, expert_ids: jax.Array, weights: jax.Array, *,
                mesh: Mesh, rules, expert_parallel: bool, **options: Any) -> tuple[jax.Array, jax.Array]:
    """Run `body` per device inside one shard_map over the whole mesh.

    x [B, T, D], expert_ids/weights [B, T, K] -> (y [B, T, D] float32, dropped token copies (global, f32))."""
    lay = layout(mesh, rules, expert_parallel=expert_parallel)
    token_spec = P(lay.batch_axes or None)
    weight_specs = _weight_specs(lay, expert_parallel)
    params = {name: params[name] for name in EXPERT_WEIGHTS}
    g = lay.expert_size

    def device_fn(p, x, ids, w):
        b, t, d = x.shape
        n, k = b * t, ids.shape[-1]
        x, ids, w = x.reshape(n, d), ids.reshape(n, k), w.reshape(n, k)
        valid = jnp.ones(n, bool)
        if lay.split_tokens:  # tokens identical across the expert axis: each rank dispatches its share
            chunk = -(-n // g)
            pad = chunk * g - n
            # padding rows: expert 0, weight 0, marked invalid (ranked after every real copy of expert 0)
            x, ids, w, valid = (jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) for a in (x, ids, w, valid))
            start = jax.lax.axis_index(lay.expert_axis) * chunk
            x, ids, w, valid = (jax.lax.dynamic_slice_in_dim(a, start, chunk) for a in (x, ids, w, valid))
        y, dropped = body(p, cfg, x, ids, w, lay, valid, **options)
        if lay.split_tokens:
            # reassemble by a psum of disjoint pieces: unlike all_gather its result is typed invariant over
            # the expert axis (the out_spec says replicated there); 2x the bytes, only on this fallback path
            y = jax.lax.dynamic_update_slice_in_dim(jnp.zeros((chunk * g, d), y.dtype), y, start, 0)
            y = jax.lax.psum(y, lay.expert_axis)[:n]
            dropped = jax.lax.psum(dropped, lay.expert_axis)
        if lay.tensor_axes:
            y = jax.lax.psum(y, lay.tensor_axes)
        if lay.batch_axes:
            dropped = jax.lax.psum(dropped, lay.batch_axes)
        return y.reshape(b, t, d), dropped

    # A pallas_call inside shard_map must declare how its output varies over the mesh axes when JAX checks them
    # (check_vma), which pallas_kernels' calls do not: with the Pallas kernels on (the grouped matmul of `sorted`
    # and `ep_ragged`), the check is off.
    fn = jax.shard_map(device_fn, mesh=mesh, in_specs=(weight_specs, token_spec, token_spec, token_spec),
                       out_specs=(token_spec, P()), check_vma=not use_pallas_kernels(cfg))
    return fn(params, x, expert_ids, weights)


@dataclasses.dataclass(frozen=True)
class MeshStrategy:
    """A MoE strategy bound to a mesh. Frozen and hashable: safe to close over in jit."""

    name: str  # dense | sorted | ep_all_to_all | ep_ragged
    mesh: Mesh
    rules: Any
    capacity_factor: float | None = None
    collective: str = "native"  # ep_ragged only: "native" | "emulated" (all_gather based; CPU tests)

    def run(self, params: dict, cfg, x, expert_ids, weights, *, return_extras: bool = False):
        from deepmoe.moe_dispatch import STRATEGIES

        if self.name == "ep_all_to_all":
            y, dropped = run_sharded(all_to_all_body, params, cfg, x, expert_ids, weights, mesh=self.mesh,
                                     rules=self.rules, expert_parallel=True, capacity_factor=self.capacity_factor)
        elif self.name == "ep_ragged" and layout(self.mesh, self.rules, expert_parallel=True).expert_axis:
            from deepmoe.moe_dispatch.ep_ragged import ragged_body

            y, dropped = run_sharded(ragged_body, params, cfg, x, expert_ids, weights, mesh=self.mesh,
                                     rules=self.rules, expert_parallel=True, capacity_factor=self.capacity_factor,
                                     collective=self.collective)
        else:  # dense / sorted, or ep_ragged without an expert axis (= local sorted: dropless too)
            local = STRATEGIES["sorted" if self.name == "ep_ragged" else self.name]
            y, dropped = run_sharded(local_body(local), params, cfg, x, expert_ids, weights,
                                     mesh=self.mesh, rules=self.rules, expert_parallel=False)
        return (y, {"dropped_tokens": dropped}) if return_extras else y


def run(params: dict, cfg, x: jax.Array, expert_ids: jax.Array, weights: jax.Array, *, mesh: Mesh,
        rules=None, capacity_factor: float | None = None, return_extras: bool = False):
    """The strategy signature, plus the mesh: [B,T,D] -> [B,T,D] float32 (and extras if asked)."""
    from deepmoe.sharding import ShardingRules

    strategy = MeshStrategy("ep_all_to_all", mesh, rules or ShardingRules(), capacity_factor)
    return strategy.run(params, cfg, x, expert_ids, weights, return_extras=return_extras)
