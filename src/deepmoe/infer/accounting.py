"""KV-cache byte accounting (spec §9.3): bytes per token and fixed per-sequence state, for our cache layout
and for the release's FP8 layout, with the report's comparison points.

Release layout (report §2.3.4 + official / vLLM formats): a compressed or window entry stores its
(head_dim - rope_dim) "nope" channels in FP8 (1 B), the rope channels in BF16 (2 B) and one ue8m0 scale per 64
nope channels, padded to 8 bytes: 448 + 128 + 7 + 1 = 584 B for V4. An indexer key is FP4 (half a byte per
channel) plus one ue8m0 scale per 32 channels: 64 + 4 = 68 B. Growing bytes per token: CSA (584 + 68) / 4,
HCA 584 / 128, sliding-window layers 0. The window ring (W entries per layer) and the compressor's float32
pending rows are fixed per sequence.

Our layout (`deepmoe.infer.cache`): window and compressed entries in the compute dtype (bf16 by default),
indexer keys in float32 (the forward scores in float32), pending rows float32; `cache_shapes` is the truth and
the tests check this file against it.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp

from deepmoe.config import CSA, HCA, SLIDING, ModelConfig

# The report's comparison points, per token over 61 layers.
V32_BYTES_PER_TOKEN = 61 * (656 + 132)  # DeepSeek-V3.2: MLA latent 656 B (FP8) + indexer key 132 B = 48,068 B
GQA8_BF16_BYTES_PER_TOKEN = 61 * 2 * 8 * 128 * 2  # K and V, 8 heads x 128, BF16 = 249,856 B


def fp8_entry_bytes(cfg: ModelConfig) -> int:
    """One compressed / window entry in the release format (584 B for V4)."""
    nope = cfg.head_dim - cfg.rope_head_dim
    raw = nope + 2 * cfg.rope_head_dim + math.ceil(nope / 64)
    return -(-raw // 8) * 8


def fp4_index_key_bytes(cfg: ModelConfig) -> int:
    """One indexer key in the release format (68 B for c_I = 128)."""
    return cfg.indexer_head_dim // 2 + math.ceil(cfg.indexer_head_dim / 32)


def _layout_sizes(cfg: ModelConfig, layout: str) -> tuple[float, float, float]:
    """(window entry bytes, compressed entry bytes, indexer key bytes)."""
    if layout == "fp8":
        entry = fp8_entry_bytes(cfg)
        return entry, entry, fp4_index_key_bytes(cfg)
    if layout != "ours":
        raise ValueError(f"unknown cache layout {layout!r}; use 'ours' or 'fp8'")
    item = jnp.dtype(cfg.compute_dtype).itemsize
    return cfg.head_dim * item, cfg.head_dim * item, cfg.indexer_head_dim * 4


def _pending_bytes(cfg: ModelConfig, layer_type: str) -> int:
    """float32 pending rows (kv and gate): CSA [2m, 2c] + indexer [2m, 2c_I]; HCA [m, c] (same in both layouts,
    the official code keeps them in float32 as well)."""
    ratio = cfg.compress_ratio(layer_type)
    if layer_type == CSA:
        return 2 * 4 * (2 * ratio) * (2 * cfg.head_dim + 2 * cfg.indexer_head_dim)
    if layer_type == HCA:
        return 2 * 4 * ratio * cfg.head_dim
    return 0


def layout_accounting(cfg: ModelConfig, layout: str, max_len: int | None = None) -> dict[str, Any]:
    """Bytes of one sequence's cache in `layout` ('ours' or 'fp8')."""
    window_entry, entry, index_key = _layout_sizes(cfg, layout)
    per_type = {t: 0.0 for t in (SLIDING, CSA, HCA)}
    per_type[CSA] = (entry + index_key) / cfg.csa_compress_ratio
    per_type[HCA] = entry / cfg.hca_compress_ratio
    counts = {t: cfg.layer_types.count(t) for t in (SLIDING, CSA, HCA)}
    per_token = sum(per_type[t] * counts[t] for t in counts)
    window = cfg.sliding_window * window_entry * cfg.num_layers
    mtp_window = cfg.sliding_window * window_entry * cfg.num_mtp_layers
    pending = sum(_pending_bytes(cfg, t) * counts[t] for t in counts)
    result = {
        "layout": f"{cfg.compute_dtype} (deepmoe)" if layout == "ours" else "fp8/fp4 (release)",
        "entry_bytes": entry, "index_key_bytes": index_key,
        "bytes_per_token": per_token,
        "bytes_per_token_by_layer_type": {t: per_type[t] for t in counts if counts[t]},
        "layers_by_type": counts,
        "fixed_window_bytes": window, "fixed_mtp_window_bytes": mtp_window, "fixed_pending_bytes": pending,
        "fixed_bytes": window + mtp_window + pending,
        "vs_v32": per_token / V32_BYTES_PER_TOKEN, "vs_gqa8_bf16": per_token / GQA8_BF16_BYTES_PER_TOKEN,
    }
    if max_len is not None:
        entries = (counts[CSA] * (max_len // cfg.csa_compress_ratio) * (entry + index_key)
                   + counts[HCA] * (max_len // cfg.hca_compress_ratio) * entry)
        result["max_len"] = max_len
        result["entries_bytes"] = entries
        result["total_bytes"] = entries + result["fixed_bytes"]
    return result


def cache_accounting(cfg: ModelConfig, max_len: int | None = None) -> dict[str, Any]:
    """{'ours': ..., 'fp8': ..., 'reference': ...}: bytes per token, fixed per-sequence state, ratios to
    DeepSeek-V3.2 (48.1 KB/token) and a BF16 GQA-8 head-dim-128 61-layer model (250 KB/token)."""
    return {
        "ours": layout_accounting(cfg, "ours", max_len),
        "fp8": layout_accounting(cfg, "fp8", max_len),
        "reference": {"v32_bytes_per_token": V32_BYTES_PER_TOKEN,
                      "gqa8_bf16_bytes_per_token": GQA8_BF16_BYTES_PER_TOKEN},
    }


def _human(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.1f} B"


def format_accounting(table: dict[str, Any]) -> str:
    """A printable table of `cache_accounting` (decimal KB / MB, as the report)."""
    lines = [f"{'KV cache per sequence':<34}{'ours':>18}{'release fp8':>18}"]
    ours, fp8 = table["ours"], table["fp8"]
    rows = [
        ("layout", ours["layout"], fp8["layout"]),
        ("entry / indexer key bytes", f"{ours['entry_bytes']:.0f} / {ours['index_key_bytes']:.0f}",
         f"{fp8['entry_bytes']:.0f} / {fp8['index_key_bytes']:.0f}"),
        ("bytes per token", _human(ours["bytes_per_token"]), _human(fp8["bytes_per_token"])),
    ]
    short = {SLIDING: "swa", CSA: "csa", HCA: "hca"}
    for t in ours["bytes_per_token_by_layer_type"]:
        n = ours["layers_by_type"][t]
        rows.append((f"  per {short[t]} layer (x{n})", f"{ours['bytes_per_token_by_layer_type'][t]:.2f} B",
                     f"{fp8['bytes_per_token_by_layer_type'][t]:.2f} B"))
    rows += [
        ("vs DeepSeek-V3.2 (48.1 KB/token)", f"{100 * ours['vs_v32']:.1f} %", f"{100 * fp8['vs_v32']:.1f} %"),
        ("vs BF16 GQA-8 (250 KB/token)", f"{100 * ours['vs_gqa8_bf16']:.1f} %", f"{100 * fp8['vs_gqa8_bf16']:.1f} %"),
        ("fixed: window rings", _human(ours["fixed_window_bytes"]), _human(fp8["fixed_window_bytes"])),
        ("fixed: MTP window ring", _human(ours["fixed_mtp_window_bytes"]), _human(fp8["fixed_mtp_window_bytes"])),
        ("fixed: fp32 compressor pending", _human(ours["fixed_pending_bytes"]), _human(fp8["fixed_pending_bytes"])),
    ]
    if "total_bytes" in ours:
        rows.append((f"total at {ours['max_len']} tokens", _human(ours["total_bytes"]), _human(fp8["total_bytes"])))
    lines += [f"{a:<34}{b:>18}{c:>18}" for a, b, c in rows]
    return "\n".join(lines)
