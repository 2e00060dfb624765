"""Hybrid attention (spec §6): sliding-window (SWA), compressed sparse (CSA) and heavily compressed (HCA) layers.

One shared 512-d K=V head (MQA), low-rank queries with a per-head unweighted norm, partial interleaved RoPE,
a learned per-head sink in the softmax denominator, output de-rotation and a grouped output projection.

The window part is computed block-wise (query block i attends to key blocks i-1 and i), so memory is
O(T * window) rather than O(T^2); compressed entries are scored densely against a visibility mask
(T * T/ratio scores, past a budget a chunk of query blocks at a time: `query_chunks`), the work the Pallas kernels
of `pallas_kernels` avoid at long context.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from deepmoe.config import CSA, SLIDING, ModelConfig
from deepmoe.layers import query_chunks
from deepmoe.layers.compressor import CompressedEntries, compress, visible
from deepmoe.layers.indexer import csa_selection, indexer_keys, selection_mask
from deepmoe.layers.kernel_attention import kernel_sink_attention
from deepmoe.layers.kernels import traced_platform, use_pallas_kernels
from deepmoe.layers.norms import rms_norm
from deepmoe.layers.precision import compute_dtype, einsum
from deepmoe.layers.rope import apply_rope, inverse_frequencies

NEG_INF = -1e30  # finite, so fully masked rows stay NaN-free


def _blocks(x: jax.Array, block: int, fill) -> jax.Array:
    """[B, T, ...] -> [B, T/block, block, ...] after padding T up to a multiple of block."""
    pad = -x.shape[1] % block
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return x.reshape(x.shape[0], x.shape[1] // block, block, *x.shape[2:])


def _with_previous_block(x: jax.Array, fill) -> jax.Array:
    """[B, nb, W, ...] -> [B, nb, 2W, ...]: each block preceded by the one before it."""
    previous = jnp.pad(x[:, :-1], [(0, 0), (1, 0)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return jnp.concatenate([previous, x], axis=2)


def sink_softmax(logits: jax.Array, sinks: jax.Array) -> jax.Array:
    """Softmax over the key axis with a per-head sink in the denominator: logits [..., H, K] f32, sinks [H]."""
    return sink_softmax_parts([logits], sinks)[0]


def sink_softmax_parts(parts: list[jax.Array], sinks: jax.Array) -> list[jax.Array]:
    """`sink_softmax` over the concatenation of `parts` (each [..., H, K_i]), returned as the same parts: the
    window and compressed keys never get concatenated (nor, in the backward pass, their probabilities cut)."""
    sink = sinks.astype(jnp.float32)[:, None]  # [H, 1]
    peak = sink
    for logits in parts:
        peak = jnp.maximum(peak, jnp.max(logits, axis=-1, keepdims=True, initial=NEG_INF))  # a part may be empty
    exps = [jnp.exp(logits - peak) for logits in parts]
    denominator = jnp.exp(sink - peak)
    for e in exps:
        denominator = denominator + jnp.sum(e, axis=-1, keepdims=True)
    return [e / denominator for e in exps]


def sink_attention(cfg: ModelConfig, q: jax.Array, kv: jax.Array, segment_ids: jax.Array, sinks: jax.Array,
                   entries: CompressedEntries | None = None,
                   selection: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """Softmax attention over window keys (+ compressed entries) with a per-head sink.

    q [B, T, H, c]; kv [B, T, c] (keys are values); segment_ids [B, T]; sinks [H]; entries: the compressed
    entries (values [B, N, c]); selection: CSA's top-k (indices [B, T, k], valid [B, T, k]: `csa_selection`)
    or None for every visible entry (HCA). -> [B, T, H, c]. The inputs of `kernel_sink_attention`.

    Query blocks of `sliding_window` rows; when their float32 scores over the compressed entries would pass
    `query_chunks.SCORE_CHUNK_BYTES`, they are attended a chunk of blocks at a time, recomputed in the backward.
    Which entries a query may use is decided inside the chunk too, from the entries' end rows and documents or
    from the top-k indices: no [B, T, N] mask is built (at 1M tokens, 256 GiB for one CSA layer).
    """
    b, t, h, c = q.shape
    w = cfg.sliding_window
    q_blocks = _blocks(q, w, 0)  # [B, nb, W, H, c]
    k_blocks = _with_previous_block(_blocks(kv, w, 0), 0)  # [B, nb, 2W, c]
    index = jnp.arange(q_blocks.shape[1] * w).reshape(-1, w)
    q_index = index[None, :, :, None]  # query row index
    k_index = jnp.concatenate([index - w, index], axis=1)[None, :, None, :]  # [1, nb, 1, 2W]
    seg_q = _blocks(segment_ids, w, -1)  # [B, nb, W]
    seg_k = _with_previous_block(_blocks(segment_ids, w, -2), -2)[:, :, None, :]  # [B, nb, 1, 2W]
    window_mask = (k_index <= q_index) & (k_index > q_index - w) & (k_index >= 0) & (seg_q[..., None] == seg_k)
    rule = None  # what decides, per query row of the blocks, which entries it may use
    n = 0
    if entries is not None:
        n = entries.values.shape[1]
        if selection is None:  # HCA: every entry visible at the row, in its document
            rule = {"rows": jnp.broadcast_to(index, seg_q.shape), "segments": seg_q}
        else:  # CSA: the indexer's top-k; `valid` already says which of them are visible
            rule = {"indices": _blocks(selection[0], w, 0), "valid": _blocks(selection[1], w, False)}
        entries = entries._replace(values=entries.values.astype(kv.dtype), token_kv=None, token_gate=None)
    chunk = query_chunks.rows_per_chunk(q_blocks.shape[1], 4 * b * w * h * (2 * w + n))
    attend = functools.partial(_attend_blocks, cfg, sinks, entries)
    out = query_chunks.map_row_chunks(attend, chunk, q_blocks, k_blocks, window_mask, rule, recompute=True)
    return out.reshape(b, -1, h, c)[:, :t]


def _entry_mask(entries: CompressedEntries, rule: dict) -> jax.Array:
    """[B, nb, W, N]: the entries each query row of the blocks may use (`sink_attention`'s rule, [B, nb, W, ...])."""
    if "indices" in rule:
        return selection_mask(rule["indices"], rule["valid"], entries.values.shape[1])
    b, nb, w = rule["rows"].shape
    return visible(entries, rule["segments"].reshape(b, -1), rule["rows"].reshape(b, -1)).reshape(b, nb, w, -1)


def _attend_blocks(cfg: ModelConfig, sinks: jax.Array, entries: CompressedEntries | None, q_blocks: jax.Array,
                   k_blocks: jax.Array, window_mask: jax.Array, rule: dict | None) -> jax.Array:
    """`sink_attention` of query blocks [B, nb, W, H, c] given their keys [B, nb, 2W, c], window_mask
    [B, nb, W, 2W] and the entries' rule -> [B, nb, W, H, c]."""
    scale = q_blocks.shape[-1] ** -0.5
    logits = einsum(cfg, "bnqhc,bnkc->bnqhk", q_blocks, k_blocks).astype(jnp.float32) * scale
    parts = [jnp.where(window_mask[:, :, :, None, :], logits, NEG_INF)]
    if entries is not None:
        entry_logits = einsum(cfg, "bnqhc,bkc->bnqhk", q_blocks, entries.values).astype(jnp.float32) * scale
        parts.append(jnp.where(_entry_mask(entries, rule)[:, :, :, None, :], entry_logits, NEG_INF))
    probs = sink_softmax_parts(parts, sinks)
    out = einsum(cfg, "bnqhk,bnkc->bnqhc", probs[0], k_blocks)
    if entries is not None:
        out = out + einsum(cfg, "bnqhk,bkc->bnqhc", probs[1], entries.values)
    return out


class AttentionState(NamedTuple):
    """What one layer's attention computed that the inference cache keeps (see deepmoe.infer.cache)."""
    kv: jax.Array  # [B, T, c] window keys (= values), rotated
    entries: CompressedEntries | None  # compressed entries + per-token compressor projections (CSA / HCA)
    index_keys: CompressedEntries | None  # the indexer's compressed keys (CSA)


def project_query_kv(params: dict, cfg: ModelConfig, x: jax.Array, positions: jax.Array, inv_freq: np.ndarray
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [B, T, D] -> (query latent [B, T, d_c], rotated queries [B, T, H, c], rotated kv [B, T, c])."""
    query_latent = rms_norm(einsum(cfg, "btd,dr->btr", x, params["q_down"]), params["q_norm"], cfg.rms_norm_eps)
    q = einsum(cfg, "btr,rhc->bthc", query_latent, params["q_up"])
    q = apply_rope(rms_norm(q, None, cfg.rms_norm_eps), positions[..., None], inv_freq)
    kv = rms_norm(einsum(cfg, "btd,dc->btc", x, params["kv_proj"]), params["kv_norm"], cfg.rms_norm_eps)
    return query_latent, q, apply_rope(kv, positions, inv_freq)


# XLA:CPU batches the groups' product over a copy of the attention output transposed to [g, i, t]; one 2-D product
# per group reads its columns in place: forward 1.04x (`small`) and 1.03x (`mini`), the same values. Its own VJP:
# autodiff of the per-group slices pads each group's cotangent to the whole width and adds them, which made the
# bf16 train step 0.97x; with this backward it is 1.00-1.02x (docs/performance.md, twenty-seventh session).
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def grouped_product(cfg: ModelConfig, x: jax.Array, w: jax.Array) -> jax.Array:
    """einsum("btgi,gil->btgl", x, w) in the compute dtype, as one 2-D product per group (XLA:CPU)."""
    return jnp.stack([einsum(cfg, "bti,il->btl", x[:, :, g], w[g]) for g in range(w.shape[0])], axis=2)


def _grouped_product_fwd(cfg, x, w):
    return grouped_product(cfg, x, w), (x, w)


def _grouped_product_bwd(cfg, residuals, grad):
    x, w = residuals
    groups = range(w.shape[0])
    dx = jnp.stack([einsum(cfg, "btl,il->bti", grad[:, :, g], w[g]) for g in groups], axis=2)
    dw = jnp.stack([einsum(cfg, "bti,btl->il", x[:, :, g], grad[:, :, g]) for g in groups])
    return dx.astype(x.dtype), dw.astype(w.dtype)


grouped_product.defvjp(_grouped_product_fwd, _grouped_product_bwd)


def output_projection(params: dict, cfg: ModelConfig, out: jax.Array, positions: jax.Array, inv_freq: np.ndarray
                      ) -> jax.Array:
    """Attention output [B, T, H, c] -> de-rotated, grouped output projection [B, T, D]."""
    out = apply_rope(out, positions[..., None], inv_freq, inverse=True)
    grouped = out.reshape(*out.shape[:2], cfg.output_groups, cfg.output_group_input_dim)
    if traced_platform() == "cpu":
        latent = grouped_product(cfg, grouped, params["o_group_proj"])
    else:
        latent = einsum(cfg, "btgi,gil->btgl", grouped, params["o_group_proj"])
    return einsum(cfg, "btgl,gld->btd", latent, params["o_proj"]).astype(compute_dtype(cfg))


def attention_with_state(params: dict, cfg: ModelConfig, layer_type: str, x: jax.Array, positions: jax.Array,
                         segment_ids: jax.Array) -> tuple[jax.Array, AttentionState]:
    """x [B, T, D] (normed attention input) -> ([B, T, D], the tensors an inference cache is built from).
    The attention core is `pallas_kernels`' when `use_pallas_kernels(cfg)` (no [T, N] score matrices at all),
    else `sink_attention`."""
    inv_freq = inverse_frequencies(cfg, layer_type)
    query_latent, q, kv = project_query_kv(params, cfg, x, positions, inv_freq)
    compressed = index_keys = selection = None
    if layer_type != SLIDING:
        compressed = compress(params["compressor"], cfg, x, positions, segment_ids,
                              ratio=cfg.compress_ratio(layer_type), overlap=layer_type == CSA, inv_freq=inv_freq)
        if layer_type == CSA:
            index_keys = indexer_keys(params["indexer"], cfg, x, positions, segment_ids, inv_freq)
            selection = csa_selection(params["indexer"], cfg, x, query_latent, positions, segment_ids, inv_freq,
                                      index_keys)
    if use_pallas_kernels(cfg):
        out = kernel_sink_attention(cfg, q, kv, segment_ids, params["sinks"], compressed, selection, impl="pallas")
    else:
        out = sink_attention(cfg, q, kv, segment_ids, params["sinks"], compressed, selection)
    return output_projection(params, cfg, out, positions, inv_freq), AttentionState(kv, compressed, index_keys)


def attention(params: dict, cfg: ModelConfig, layer_type: str, x: jax.Array, positions: jax.Array,
              segment_ids: jax.Array) -> jax.Array:
    """x [B, T, D] (normed attention input) -> [B, T, D]."""
    return attention_with_state(params, cfg, layer_type, x, positions, segment_ids)[0]
