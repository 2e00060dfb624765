"""Cached attention for a short chunk of new tokens (decode: 1 token; speculative verify: 2) — spec §9.2.

The same layer math as `deepmoe.layers.attention` (shared projections, compressor pooling, indexer scoring,
sink softmax, output projection); only where keys come from differs: the window ring + the chunk's own rows,
the compressed entries closed so far (+ those the chunk closes). Every query of the chunk sees exactly the keys
the full forward would show it:
  * window: key positions in (q - W, q], read from the ring (positions start - W .. start - 1, implied by the
    chunk start) or from the chunk itself;
  * compressed entries: n < (q + 1) // ratio; CSA keeps the indexer's top-k of those, HCA all of them.
Slots are never trusted beyond what the start position implies, which is what makes a rejected speculative
token harmless (it can only have overwritten a slot that no later query reads).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from deepmoe.config import CSA, SLIDING, ModelConfig
from deepmoe.infer.cache import CompressorCache, LayerCache
from deepmoe.layers.attention import NEG_INF, output_projection, project_query_kv, sink_softmax
from deepmoe.layers.compressor import pool, project
from deepmoe.layers.indexer import indexer_queries, score_keys
from deepmoe.layers.precision import einsum
from deepmoe.layers.rope import inverse_frequencies


def ring_positions(start: jax.Array, size: int) -> jax.Array:
    """[B] chunk start -> [B, size] the position each ring slot holds (start - size .. start - 1)."""
    last = start[:, None] - 1
    return last - (last - jnp.arange(size)) % size


def _write_rows(buffer: jax.Array, positions: jax.Array, rows: jax.Array) -> jax.Array:
    """buffer [B, P, C] <- rows [B, S, C] at slots positions % P (negative positions are dropped)."""
    size = buffer.shape[1]
    slots = jnp.where(positions >= 0, positions % size, size)
    batch = jnp.arange(buffer.shape[0])[:, None]
    return buffer.at[batch, slots].set(rows.astype(buffer.dtype), mode="drop")


def update_compressor(params: dict, cfg: ModelConfig, x: jax.Array, positions: jax.Array, cache: CompressorCache,
                      *, ratio: int, overlap: bool, inv_freq: np.ndarray) -> CompressorCache:
    """Feed the chunk's tokens to a compressor: every chunk token that closes a window appends its entry
    (pooled exactly as `compressor.compress` does); the chunk's projections join the pending buffer."""
    kv, gate = project(params, x, positions, ratio)  # [B, S, width] float32
    size = cache.kv.shape[1]  # ratio (HCA) or 2 * ratio (CSA)
    dim = params["kv_norm"].shape[-1]
    start = positions[:, :1]
    # The `size` positions ending at each chunk token, looked up in (old buffer ++ chunk rows).
    needed = positions[:, :, None] + jnp.arange(1 - size, 1)  # [B, S, size]
    index = jnp.where(needed >= start[..., None], size + needed - start[..., None], needed % size)
    b = jnp.arange(x.shape[0])[:, None, None]
    slots_kv = jnp.concatenate([cache.kv, kv], axis=1)[b, index]  # [B, S, size, width]
    slots_gate = jnp.concatenate([cache.gate, gate], axis=1)[b, index]
    window = (positions + 1) // ratio - 1  # [B, S] index of the window a token closes
    if overlap:  # previous window through the first half of the projection, current through the second
        has_previous = (window >= 1)[..., None, None]
        prev_gate = jnp.where(has_previous, slots_gate[..., :ratio, :dim], -jnp.inf)
        slots_kv = jnp.concatenate([slots_kv[..., :ratio, :dim], slots_kv[..., ratio:, dim:]], axis=-2)
        slots_gate = jnp.concatenate([prev_gate, slots_gate[..., ratio:, dim:]], axis=-2)
    pooled = pool(params, cfg, slots_kv, slots_gate, positions + 1 - ratio, inv_freq)  # [B, S, dim]
    closes = ((positions + 1) % ratio == 0) & (positions >= 0)
    capacity = cache.entries.shape[1]
    entry_index = jnp.where(closes, window, capacity)
    entries = cache.entries.at[b[..., 0], entry_index].set(pooled.astype(cache.entries.dtype), mode="drop")
    return CompressorCache(kv=_write_rows(cache.kv, positions, kv), gate=_write_rows(cache.gate, positions, gate),
                           entries=entries)


def cached_attention(params: dict, cfg: ModelConfig, layer_type: str, x: jax.Array, positions: jax.Array,
                     cache: LayerCache) -> tuple[jax.Array, LayerCache]:
    """x [B, S, D] normed attention input of S new tokens at positions [B, S] (consecutive per row, S <= window)
    -> ([B, S, D], updated layer cache)."""
    inv_freq = inverse_frequencies(cfg, layer_type)
    query_latent, q, kv = project_query_kv(params, cfg, x, positions, inv_freq)
    w = cfg.sliding_window
    scale = cfg.head_dim ** -0.5
    keys = jnp.concatenate([cache.window, kv.astype(cache.window.dtype)], axis=1)  # [B, W + S, c]
    key_pos = jnp.concatenate([ring_positions(positions[:, 0], w), positions], axis=1)
    qp, kp = positions[:, :, None], key_pos[:, None, :]
    window_mask = (kp <= qp) & (kp > qp - w) & (kp >= 0)  # [B, S, W + S]
    logits = einsum(cfg, "bshc,bkc->bshk", q, keys).astype(jnp.float32) * scale
    logits = jnp.where(window_mask[:, :, None, :], logits, NEG_INF)

    compressor = indexer = None
    entry_values = None
    if layer_type != SLIDING:
        ratio = cfg.compress_ratio(layer_type)
        compressor = update_compressor(params["compressor"], cfg, x, positions, cache.compressor, ratio=ratio,
                                       overlap=layer_type == CSA, inv_freq=inv_freq)
        entries = compressor.entries.astype(kv.dtype)  # [B, N, c]
        n = entries.shape[1]
        visible = jnp.arange(n)[None, None, :] < ((positions + 1) // ratio)[..., None]  # [B, S, N]
        if layer_type == CSA:
            indexer = update_compressor(params["indexer"]["compressor"], cfg, x, positions, cache.indexer,
                                        ratio=ratio, overlap=True, inv_freq=inv_freq)
            iq, head_weights = indexer_queries(params["indexer"], cfg, x, query_latent, positions, inv_freq)
            scores = jnp.where(visible, score_keys(cfg, iq, head_weights, indexer.entries), -jnp.inf)
            _, chosen = jax.lax.top_k(scores, min(cfg.indexer_topk, n))  # [B, S, k]; ties -> lower index
            entry_mask = jnp.take_along_axis(visible, chosen, axis=-1)
            entry_values = entries[jnp.arange(x.shape[0])[:, None, None], chosen]  # [B, S, k, c]
            entry_logits = einsum(cfg, "bshc,bskc->bshk", q, entry_values)
        else:
            entry_mask = visible
            entry_logits = einsum(cfg, "bshc,bnc->bshn", q, entries)
        entry_logits = jnp.where(entry_mask[:, :, None, :], entry_logits.astype(jnp.float32) * scale, NEG_INF)
        logits = jnp.concatenate([logits, entry_logits], axis=-1)

    probs = sink_softmax(logits, params["sinks"])  # [B, S, H, K]
    out = einsum(cfg, "bshk,bkc->bshc", probs[..., :keys.shape[1]], keys)
    if entry_values is not None:
        out = out + einsum(cfg, "bshk,bskc->bshc", probs[..., keys.shape[1]:], entry_values)
    elif layer_type != SLIDING:
        out = out + einsum(cfg, "bshn,bnc->bshc", probs[..., keys.shape[1]:], entries)
    new_window = _write_rows(cache.window, positions, kv)
    y = output_projection(params, cfg, out, positions, inv_freq)
    return y, LayerCache(window=new_window, compressor=compressor, indexer=indexer)
