"""KV compression for CSA / HCA layers and the lightning indexer (spec §6.5).

Every complete window of `ratio` tokens of a document becomes one entry: a per-channel softmax pool of the
window's projected kv, gated by learned scores plus a position bias; CSA windows overlap (each entry also pools
the previous window through the first half of a 2x-wide projection). Entries are RMS-normed and rotated with
the compress RoPE table at the window's start position.

Packed documents restart compression, so windows are aligned to document starts, not to the row. A row of
T tokens never holds more than T // ratio complete windows, which gives entries a static shape; entry slots
left over are marked invalid (end index = T, never visible).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from deepmoe.config import ModelConfig
from deepmoe.layers.norms import rms_norm
from deepmoe.layers.precision import einsum_f32
from deepmoe.layers.rope import apply_rope


class CompressedEntries(NamedTuple):
    values: jax.Array  # [B, N, dim]
    end_index: jax.Array  # [B, N] row index of the window's last token; T for an empty slot
    segment_ids: jax.Array  # [B, N] document of the entry
    token_kv: jax.Array | None = None  # [B, T, width] float32 per-token projections (the inference cache's
    token_gate: jax.Array | None = None  # pending state is built from them); gate includes the position bias


def _window_end_indices(positions: jax.Array, segment_ids: jax.Array, ratio: int) -> jax.Array:
    """[B, N] indices of tokens that close a window (in order), padded with -1."""
    num_entries = positions.shape[-1] // ratio
    closes = ((positions + 1) % ratio == 0) & (segment_ids >= 0)
    return jax.vmap(lambda c: jnp.nonzero(c, size=num_entries, fill_value=-1)[0])(closes)


def _gather_rows(x: jax.Array, index: jax.Array) -> jax.Array:
    """x [B, T, C], index [B, N, W] -> [B, N, W, C]."""
    b, n, w = index.shape
    rows = jnp.take_along_axis(x, index.reshape(b, n * w, 1), axis=1)
    return rows.reshape(b, n, w, x.shape[-1])


def project(params: dict, x: jax.Array, positions: jax.Array, ratio: int) -> tuple[jax.Array, jax.Array]:
    """x [B, T, D] -> per-token (kv, gate) [B, T, width] float32; the gate already carries the position bias."""
    kv = einsum_f32("btd,dc->btc", x, params["kv_proj"])
    gate = einsum_f32("btd,dc->btc", x, params["gate_proj"])
    return kv, gate + params["position_bias"].astype(jnp.float32)[positions % ratio]


def pool(params: dict, cfg: ModelConfig, slots_kv: jax.Array, slots_gate: jax.Array, start_position: jax.Array,
         inv_freq: np.ndarray) -> jax.Array:
    """Per-channel softmax pool over the slot axis: slots [..., W, dim], start_position [...] -> entries [..., dim]
    (RMS-normed, rotated at the window's start position)."""
    pooled = jnp.sum(jax.nn.softmax(slots_gate, axis=-2) * slots_kv, axis=-2)
    pooled = rms_norm(pooled, params["kv_norm"], cfg.rms_norm_eps)
    return apply_rope(pooled, start_position, inv_freq)


def compress(params: dict, cfg: ModelConfig, x: jax.Array, positions: jax.Array, segment_ids: jax.Array, *,
             ratio: int, overlap: bool, inv_freq: np.ndarray) -> CompressedEntries:
    """x [B, T, D] (the attention input) -> entries. Computed in float32 as the official code does."""
    t = x.shape[1]
    dim = params["kv_norm"].shape[-1]
    kv, gate = project(params, x, positions, ratio)

    end = _window_end_indices(positions, segment_ids, ratio)
    valid = end >= 0
    end = jnp.where(valid, end, t - 1)
    window = end[..., None] + jnp.arange(1 - ratio, 1)  # [B, N, ratio]
    slots_kv, slots_gate = _gather_rows(kv, window), _gather_rows(gate, window)
    if overlap:
        # The previous window feeds this entry through the first half of the projection; the current window
        # through the second half. A document's first window has no predecessor.
        has_previous = jnp.take_along_axis(positions, end, axis=1) >= 2 * ratio - 1  # [B, N]
        previous = jnp.maximum(window - ratio, 0)
        prev_kv, prev_gate = _gather_rows(kv, previous)[..., :dim], _gather_rows(gate, previous)[..., :dim]
        prev_gate = jnp.where(has_previous[..., None, None], prev_gate, -jnp.inf)
        slots_kv = jnp.concatenate([prev_kv, slots_kv[..., dim:]], axis=2)
        slots_gate = jnp.concatenate([prev_gate, slots_gate[..., dim:]], axis=2)
    start_position = jnp.take_along_axis(positions, end, axis=1) - (ratio - 1)
    values = pool(params, cfg, slots_kv, slots_gate, start_position, inv_freq)  # [B, N, dim]
    return CompressedEntries(
        values=values,
        end_index=jnp.where(valid, end, t),
        segment_ids=jnp.take_along_axis(segment_ids, end, axis=1),
        token_kv=kv,
        token_gate=gate,
    )


def visible(entries: CompressedEntries, segment_ids: jax.Array, query_rows: jax.Array | None = None) -> jax.Array:
    """[B, T, N] causal rule of §6.6: query t sees entry n iff its whole window is <= t, same document.
    query_rows [B, T]: the queries' rows in the sequence, when they are not 0 .. T-1 (a chunk of queries)."""
    t = jnp.arange(segment_ids.shape[1])[None] if query_rows is None else query_rows
    return (entries.end_index[:, None, :] <= t[:, :, None]) & (
        entries.segment_ids[:, None, :] == segment_ids[:, :, None])
