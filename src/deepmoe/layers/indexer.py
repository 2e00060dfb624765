"""Lightning indexer (spec §6.7): which compressed entries each CSA query attends to.

I[t, s] = sum_h w[t, h] * ReLU(q[t, h] . k[s]) / sqrt(c_I), over causally visible entries; the top-k entries per
query are selected. Selection is discrete, so the indexer receives no gradient from the language-model loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from deepmoe.config import ModelConfig
from deepmoe.layers import query_chunks
from deepmoe.layers.compressor import CompressedEntries, compress, visible
from deepmoe.layers.precision import einsum_f32
from deepmoe.layers.rope import apply_rope


def indexer_keys(params: dict, cfg: ModelConfig, x: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                 inv_freq: np.ndarray) -> CompressedEntries:
    """The indexer's own compressed keys K^I [B, N, c_I] (overlapping windows of csa_compress_ratio)."""
    return compress(params["compressor"], cfg, x, positions, segment_ids, ratio=cfg.csa_compress_ratio,
                    overlap=True, inv_freq=inv_freq)


def indexer_queries(params: dict, cfg: ModelConfig, x: jax.Array, query_latent: jax.Array, positions: jax.Array,
                    inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """-> (rotated queries [B, T, H_I, c_I] float32, head weights [B, T, H_I] float32 incl. H_I^-1/2)."""
    q = einsum_f32("btc,chd->bthd", query_latent, params["q_up"])
    q = apply_rope(q, positions[..., None], inv_freq)
    head_weights = einsum_f32("btd,dh->bth", x, params["weights_proj"]) * cfg.indexer_heads ** -0.5
    return q, head_weights


def score_keys(cfg: ModelConfig, q: jax.Array, head_weights: jax.Array, keys: jax.Array) -> jax.Array:
    """I[t, s] = sum_h w[t, h] ReLU(q[t, h] . k[s]) / sqrt(c_I): q [B, T, H, c], keys [B, N, c] -> [B, T, N]."""
    logits = jax.nn.relu(jnp.einsum("bthd,bnd->bthn", q, keys, precision=jax.lax.Precision.HIGHEST))
    return jnp.einsum("bthn,bth->btn", logits, head_weights) * cfg.indexer_head_dim ** -0.5


def index_scores(params: dict, cfg: ModelConfig, x: jax.Array, query_latent: jax.Array, positions: jax.Array,
                 segment_ids: jax.Array, inv_freq: np.ndarray, keys: CompressedEntries | None = None
                 ) -> tuple[jax.Array, jax.Array]:
    """-> (scores [B, T, N] float32 with -inf where not visible, visibility mask [B, T, N])."""
    if keys is None:
        keys = indexer_keys(params, cfg, x, positions, segment_ids, inv_freq)
    q, head_weights = indexer_queries(params, cfg, x, query_latent, positions, inv_freq)
    return _visible_scores(cfg, keys, q, head_weights, _query_rows(segment_ids), segment_ids)


def _query_rows(segment_ids: jax.Array) -> jax.Array:
    """[B, T]: each query's row in the sequence (what the causal rule compares entry ends with)."""
    return jnp.broadcast_to(jnp.arange(segment_ids.shape[1]), segment_ids.shape)


def _visible_scores(cfg: ModelConfig, keys: CompressedEntries, q: jax.Array, head_weights: jax.Array,
                    query_rows: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`index_scores` of the queries at `query_rows` (all of them, or a chunk)."""
    mask = visible(keys, segment_ids, query_rows)
    return jnp.where(mask, score_keys(cfg, q, head_weights, keys.values), -jnp.inf), mask


def topk_entries(scores: jax.Array, mask: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """-> (indices [B, T, k'], valid [B, T, k']) of the top-k visible entries per query, k' = min(k, N);
    ties go to the lower index (lax.top_k); `valid` is False where fewer than k entries are visible."""
    k = min(k, scores.shape[-1])
    _, chosen = jax.lax.top_k(scores, k)
    return chosen, jnp.take_along_axis(mask, chosen, axis=-1)


def select_topk(scores: jax.Array, mask: jax.Array, k: int) -> jax.Array:
    """[B, T, N] bool: the top-k visible entries per query (all visible ones when fewer than k)."""
    if min(k, scores.shape[-1]) == 0:
        return mask
    return selection_mask(*topk_entries(scores, mask, k), scores.shape[-1])


def selection_mask(indices: jax.Array, valid: jax.Array, entries: int) -> jax.Array:
    """[..., entries] bool from `topk_entries`' (indices, valid) [..., k]: True at the valid chosen entries. A
    row's indices are distinct (lax.top_k), so each entry is written at most once."""
    unused = jnp.zeros((*valid.shape[:-1], entries), bool)
    return jnp.put_along_axis(unused, indices, valid, axis=-1, inplace=False)


def csa_selection(params: dict, cfg: ModelConfig, x: jax.Array, query_latent: jax.Array, positions: jax.Array,
                  segment_ids: jax.Array, inv_freq: np.ndarray, keys: CompressedEntries | None = None
                  ) -> tuple[jax.Array, jax.Array]:
    """The CSA selection: `topk_entries`' (indices [B, T, k], valid [B, T, k]) of the indexer's scores.

    Only the selection leaves this function, so when the indexer's float32 logits [B, T, H_I, N] would pass
    `query_chunks.SCORE_CHUNK_BYTES`, queries are scored and selected a chunk at a time."""
    if keys is None:
        keys = indexer_keys(params, cfg, x, positions, segment_ids, inv_freq)
    keys = jax.lax.stop_gradient(keys._replace(token_kv=None, token_gate=None))  # what scoring reads
    q, head_weights = jax.lax.stop_gradient(indexer_queries(params, cfg, x, query_latent, positions, inv_freq))

    def select(q, head_weights, query_rows, segment_ids):
        return topk_entries(*_visible_scores(cfg, keys, q, head_weights, query_rows, segment_ids), cfg.indexer_topk)

    batch, tokens = segment_ids.shape
    chunk = query_chunks.rows_per_chunk(tokens, 4 * batch * cfg.indexer_heads * keys.values.shape[1])
    return query_chunks.map_row_chunks(select, chunk, q, head_weights, _query_rows(segment_ids), segment_ids,
                                       recompute=False)
