"""Analysis helpers shared by `experiments/` and `notebooks/`: the long-context cost model (KV bytes and FLOPs
per token, V4 vs DeepSeek-V3.2 vs a GQA baseline), load-imbalance statistics, and inspection of a model's
parameters, attention patterns and compressed entries.

Cost model (per sequence of `L` tokens, decoding one more token; every formula also in README "Experiments"):

KV cache bytes
  V4         growing bytes per token from `deepmoe.infer.accounting` (release FP8 layout: an entry is
             448 FP8 + 64 BF16 + 7 ue8m0 scales + 1 pad = 584 B, an indexer key 64 FP4 + 4 scales = 68 B):
             sum over CSA layers (584 + 68) / 4 + over HCA layers 584 / 128; SWA layers add nothing.
             Total = bytes_per_token * L + fixed state (window rings, MTP ring, fp32 compressor tails).
  V3.2       61 layers x (656 B MLA latent: 512 FP8 + 4 fp32 scales + 64 BF16 rope, + 132 B FP8 indexer key:
             128 + a 4 B scale) = 48,068 B per token.
  GQA        61 layers x K and V x 8 KV heads x 128 x 2 B (BF16) = 249,856 B per token.

FLOPs of one decoded token (multiply-add = 2 FLOPs; keys visible to the token: `k`)
  weights    2 x active parameters (the reports' counts: V4 from `count_params`, 13.8B Flash / 49.8B Pro;
             V3.2 and the GQA baseline 37B) -- every projection, expert and head matmul.
  V4 attn    per layer 4 H c k (q.k and p.v over the shared c = 512 K=V head), k = min(W, L) + for CSA
             min(top-k, floor(L/4)) + for HCA floor(L/128).
  V4 index   per CSA layer 2 H_I (c_I + 1) floor(L/4): ReLU scores over every visible compressed key plus the
             head weighting (H_I = 64, c_I = 128).
  V3.2 attn  per layer 2 x 128 heads x (576 + 512) x min(2048, L): MLA in the absorbed form, q.k over the
             512 latent + 64 rope dims, p.v over the 512 latent, DSA top-2048.
  V3.2 index per layer 2 x 64 x (128 + 1) x L: the lightning indexer scores every previous token.
  GQA attn   per layer 4 x 64 query heads x 128 x L (dense causal).
  "FP8-equivalent" FLOPs (the report's unit) weigh each term by its arithmetic precision relative to FP8
  throughput: weights FP8 x1, attention cores BF16 x2, V3.2 indexer FP8 x1, V4 indexer FP4 x0.5.

At L = 2^20 this gives V4-Pro 26.5 % and V4-Flash 10.0 % of V3.2's FP8-equivalent FLOPs (report: 27 %, 10 %),
26.3 % / 12.2 % in plain FLOPs, and KV bytes 10.5 % / 7.3 % (report: 10 %, 7 %).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable

import numpy as np

from deepmoe.config import CSA, HCA, SLIDING, ModelConfig

MILLION_CONTEXT = 1 << 20  # 1,048,576 tokens, V4's maximum context
PRECISION_WEIGHT = {"fp4": 0.5, "fp8": 1.0, "bf16": 2.0}  # FLOPs -> FP8-equivalent FLOPs


@dataclasses.dataclass(frozen=True)
class V32Style:
    """DeepSeek-V3.2 (the report's baseline): MLA + DSA lightning indexer, 61 layers, 37B active."""

    name: str = "DeepSeek-V3.2"
    num_layers: int = 61
    num_heads: int = 128
    latent_dim: int = 512
    rope_dim: int = 64
    topk: int = 2048
    indexer_heads: int = 64
    indexer_head_dim: int = 128
    active_params: float = 37e9
    latent_bytes: int = 656  # 512 FP8 + 4 x fp32 scale + 64 x BF16
    index_key_bytes: int = 132  # 128 FP8 + fp32 scale


@dataclasses.dataclass(frozen=True)
class GQABaseline:
    """A dense BF16 GQA-8 model of V3.2's size: 61 layers, 64 query heads, 8 KV heads of 128, 37B active."""

    name: str = "BF16 GQA-8"
    num_layers: int = 61
    num_heads: int = 64
    kv_heads: int = 8
    head_dim: int = 128
    active_params: float = 37e9
    bytes_per_value: int = 2


def _context(context) -> np.ndarray:
    return np.asarray(context, dtype=np.float64)


def v4_costs(cfg: ModelConfig, context) -> dict[str, Any]:
    """KV bytes and per-token FLOPs of a V4 config at `context` tokens (scalar or array); see module docstring."""
    from deepmoe.infer.accounting import layout_accounting
    from deepmoe.params import count_params

    L = _context(context)
    kv = layout_accounting(cfg, "fp8")
    window = np.minimum(cfg.sliding_window, L)
    attention = np.zeros_like(L)
    indexer = np.zeros_like(L)
    for layer_type in cfg.layer_types:  # the MTP block is not used for single-token FLOPs
        keys = window.copy()
        if layer_type == CSA:
            entries = np.floor(L / cfg.csa_compress_ratio)
            keys += np.minimum(cfg.indexer_topk, entries)
            indexer += 2.0 * cfg.indexer_heads * (cfg.indexer_head_dim + 1) * entries
        elif layer_type == HCA:
            keys += np.floor(L / cfg.hca_compress_ratio)
        attention += 4.0 * cfg.num_heads * cfg.head_dim * keys
    weights = 2.0 * float(count_params(cfg).active) * np.ones_like(L)
    return _costs(kv_per_token=kv["bytes_per_token"], kv_fixed=kv["fixed_bytes"], L=L, weights=weights,
                  attention=attention, indexer=indexer, attention_precision="bf16", indexer_precision="fp4")


def v32_costs(context, ref: V32Style = V32Style()) -> dict[str, Any]:
    L = _context(context)
    per_layer_attn = 2.0 * ref.num_heads * (ref.latent_dim + ref.rope_dim + ref.latent_dim) * np.minimum(ref.topk, L)
    per_layer_index = 2.0 * ref.indexer_heads * (ref.indexer_head_dim + 1) * L
    return _costs(kv_per_token=ref.num_layers * (ref.latent_bytes + ref.index_key_bytes), kv_fixed=0.0, L=L,
                  weights=2.0 * ref.active_params * np.ones_like(L), attention=ref.num_layers * per_layer_attn,
                  indexer=ref.num_layers * per_layer_index, attention_precision="bf16", indexer_precision="fp8")


def gqa_costs(context, ref: GQABaseline = GQABaseline()) -> dict[str, Any]:
    L = _context(context)
    kv_per_token = ref.num_layers * 2 * ref.kv_heads * ref.head_dim * ref.bytes_per_value
    attention = ref.num_layers * 4.0 * ref.num_heads * ref.head_dim * L
    return _costs(kv_per_token=kv_per_token, kv_fixed=0.0, L=L, weights=2.0 * ref.active_params * np.ones_like(L),
                  attention=attention, indexer=np.zeros_like(L), attention_precision="bf16",
                  indexer_precision="fp8")


def _costs(*, kv_per_token, kv_fixed, L, weights, attention, indexer, attention_precision, indexer_precision):
    w = PRECISION_WEIGHT
    flops = weights + attention + indexer
    fp8eq = weights * w["fp8"] + attention * w[attention_precision] + indexer * w[indexer_precision]
    return {
        "context": L, "kv_bytes_per_token": float(kv_per_token), "kv_fixed_bytes": float(kv_fixed),
        "kv_total_bytes": kv_per_token * L + kv_fixed,
        "flops_weights": weights, "flops_attention": attention, "flops_indexer": indexer,
        "flops": flops, "flops_fp8_equivalent": fp8eq,
        "precision": {"weights": "fp8", "attention": attention_precision, "indexer": indexer_precision},
    }


def cost_comparison(contexts: Iterable[float] = (MILLION_CONTEXT,), presets: Iterable[str] = ("v4-pro", "v4-flash")
                    ) -> dict[str, dict[str, Any]]:
    """{model name: costs} for the V4 presets, V3.2 and the GQA baseline, at each context length."""
    from deepmoe.config import preset

    L = np.asarray(list(contexts), np.float64)
    out = {name: v4_costs(preset(name), L) for name in presets}
    out[V32Style.name] = v32_costs(L)
    out[GQABaseline.name] = gqa_costs(L)
    return out


def report_claims(context: int = MILLION_CONTEXT) -> dict[str, Any]:
    """The report's 1M-context claims recomputed: ratios of V4 to V3.2 (and to GQA) per token."""
    table = cost_comparison([context])
    base, gqa = table[V32Style.name], table[GQABaseline.name]
    claims = {"context": context, "reported": {"v4-pro": {"flops": 0.27, "kv": 0.10},
                                                "v4-flash": {"flops": 0.10, "kv": 0.07}}}
    for name in ("v4-pro", "v4-flash"):
        c = table[name]
        claims[name] = {
            "kv_bytes_per_token": c["kv_bytes_per_token"],
            "kv_vs_v32": c["kv_bytes_per_token"] / base["kv_bytes_per_token"],
            "kv_vs_gqa": c["kv_bytes_per_token"] / gqa["kv_bytes_per_token"],
            "kv_total_bytes": float(c["kv_total_bytes"][0]),
            "flops": float(c["flops"][0]), "flops_fp8_equivalent": float(c["flops_fp8_equivalent"][0]),
            "flops_vs_v32": float(c["flops"][0] / base["flops"][0]),
            "flops_fp8_equivalent_vs_v32": float(c["flops_fp8_equivalent"][0] / base["flops_fp8_equivalent"][0]),
        }
    claims[V32Style.name] = {"kv_bytes_per_token": base["kv_bytes_per_token"], "flops": float(base["flops"][0]),
                             "flops_fp8_equivalent": float(base["flops_fp8_equivalent"][0])}
    claims[GQABaseline.name] = {"kv_bytes_per_token": gqa["kv_bytes_per_token"], "flops": float(gqa["flops"][0]),
                                "flops_fp8_equivalent": float(gqa["flops_fp8_equivalent"][0])}
    return claims


def sequence_attention_flops(cfg: ModelConfig, layer_type: str, seq_len: int) -> dict[str, float]:
    """Algorithmic FLOPs of one attention layer over a whole sequence of `seq_len` tokens (one document):
    core = sum_t 4 H c k_t with k_t as in `v4_costs` (window keys + selected / all visible entries), and for CSA
    the indexer sum_t 2 H_I (c_I + 1) floor((t+1)/4). Projections and compression are not included."""
    t = np.arange(1, seq_len + 1, dtype=np.float64)  # tokens visible to position t-1
    keys = np.minimum(cfg.sliding_window, t)
    indexer = np.zeros_like(t)
    if layer_type == CSA:
        entries = np.floor(t / cfg.csa_compress_ratio)
        keys = keys + np.minimum(cfg.indexer_topk, entries)
        indexer = 2.0 * cfg.indexer_heads * (cfg.indexer_head_dim + 1) * entries
    elif layer_type == HCA:
        keys = keys + np.floor(t / cfg.hca_compress_ratio)
    core = 4.0 * cfg.num_heads * cfg.head_dim * keys
    return {"core": float(core.sum()), "indexer": float(indexer.sum()), "total": float(core.sum() + indexer.sum())}


# ----- load balance ----------------------------------------------------------------------------------------

def load_imbalance(load) -> dict[str, np.ndarray]:
    """Expert load [..., E] (tokens per expert) -> max/mean and coefficient of variation (std/mean) [...]."""
    load = np.asarray(load, np.float64)
    mean = np.maximum(load.mean(-1), 1e-12)
    return {"max_over_mean": load.max(-1) / mean, "cv": load.std(-1) / mean}


# ----- inspection ------------------------------------------------------------------------------------------

def param_rows(params) -> list[tuple[str, tuple[int, ...], str, int]]:
    """(path, shape, dtype, elements) for every leaf of a parameter pytree (or of `abstract_params`)."""
    import jax

    rows = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        rows.append((name, tuple(leaf.shape), str(leaf.dtype), int(math.prod(leaf.shape))))
    return rows


def window_mask(seq_len: int, window: int) -> np.ndarray:
    """[T, T] bool: query t sees raw key s iff t - window < s <= t (spec §6.8)."""
    t = np.arange(seq_len)
    return (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - window)


def entry_spans(seq_len: int, ratio: int, overlap: bool) -> np.ndarray:
    """[N, T] bool: the tokens compressed entry n pools (one document from position 0): window
    [n*m, n*m + m - 1], plus the previous window for overlapping (CSA) entries; N = T // m."""
    n = np.arange(seq_len // ratio)[:, None]
    t = np.arange(seq_len)[None, :]
    start = (n - 1) * ratio if overlap else n * ratio
    return (t >= np.maximum(start, 0)) & (t <= n * ratio + ratio - 1)


def attention_pattern(attn_params: dict, cfg: ModelConfig, layer_type: str, x, segment_ids=None) -> dict[str, Any]:
    """What one attention layer lets each query see, computed with the layer's own functions (jittable with
    cfg and layer_type static). x [B, T, D]: the layer's normed attention input (e.g.
    `ablations.residual_forward(..., collect_inputs=True)[1]["attn_input"][layer]`).

    -> window [T, T] raw keys (sliding window); for CSA / HCA: entry_end [B, N] (last token of each entry's
    window), visible [B, T, N] (the causal rule of `layers.compressor.visible`); for CSA also index_scores
    [B, T, N] (-inf where not visible) and selected [B, T, N]: the lightning indexer's top-k, the entries the
    layer attends to (as `layers.attention.attention_with_state`)."""
    import jax
    import jax.numpy as jnp

    from deepmoe.layers.attention import project_query_kv
    from deepmoe.layers.compressor import compress, visible
    from deepmoe.layers.documents import document_positions
    from deepmoe.layers.indexer import index_scores, indexer_keys, select_topk
    from deepmoe.layers.rope import inverse_frequencies

    b, t = x.shape[:2]
    if segment_ids is None:
        segment_ids = jnp.zeros((b, t), jnp.int32)
    positions = document_positions(segment_ids)
    out: dict[str, Any] = {"window": jnp.asarray(window_mask(t, cfg.sliding_window))}
    if layer_type == SLIDING:
        return out
    inv_freq = inverse_frequencies(cfg, layer_type)
    entries = compress(attn_params["compressor"], cfg, x, positions, segment_ids, ratio=cfg.compress_ratio(layer_type),
                       overlap=layer_type == CSA, inv_freq=inv_freq)
    out["entry_end"] = entries.end_index
    out["visible"] = visible(entries, segment_ids)
    if layer_type == CSA:
        query_latent, _, _ = project_query_kv(attn_params, cfg, x, positions, inv_freq)
        keys = indexer_keys(attn_params["indexer"], cfg, x, positions, segment_ids, inv_freq)
        scores, mask = index_scores(attn_params["indexer"], cfg, x, query_latent, positions, segment_ids, inv_freq,
                                    keys)
        out["index_scores"] = scores
        out["selected"] = out["visible"] & select_topk(jax.lax.stop_gradient(scores), mask, cfg.indexer_topk)
    return out


def pooling_weights(comp_params: dict, cfg: ModelConfig, x, *, ratio: int, overlap: bool) -> np.ndarray:
    """[B, N, T] weight each compressed entry gives each token, averaged over channels: the per-channel softmax
    over the entry's slots (gates + position bias), as `layers.compressor.compress` pools. One document per row,
    positions 0..T-1. Rows of a [N, T] slice sum to 1."""
    import jax.numpy as jnp

    from deepmoe.layers.compressor import project

    b, t = x.shape[:2]
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    _, gate = project(comp_params, x, positions, ratio)  # [B, T, width]
    dim = comp_params["kv_norm"].shape[-1]
    n = t // ratio
    weights = np.zeros((b, n, t))
    gate = np.asarray(gate, np.float64)
    for w in range(n):
        cur = np.arange(w * ratio, (w + 1) * ratio)
        if overlap:
            slots = [gate[:, cur, dim:]]
            index = [cur]
            if w > 0:
                prev = cur - ratio
                slots.insert(0, gate[:, prev, :dim])
                index.insert(0, prev)
            g = np.concatenate(slots, axis=1)  # [B, slots, dim]
            idx = np.concatenate(index)
        else:
            g, idx = gate[:, cur, :], cur
        p = np.exp(g - g.max(1, keepdims=True))
        p = p / p.sum(1, keepdims=True)
        np.add.at(weights, (slice(None), w, idx), p.mean(-1))  # [B, slots], mean over channels
    return weights


__all__ = ["MILLION_CONTEXT", "PRECISION_WEIGHT", "V32Style", "GQABaseline", "v4_costs", "v32_costs", "gqa_costs",
           "cost_comparison", "report_claims", "sequence_attention_flops", "load_imbalance", "param_rows",
           "window_mask", "entry_spans", "attention_pattern", "pooling_weights"]
