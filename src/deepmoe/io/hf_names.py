"""Our parameter tree <-> HF `DeepseekV4ForCausalLM` state-dict names (spec §10.3-10.4).

Each leaf gets (our path, HF name, transform kind). Our matrices are [in, out]; HF's are [out, in].
MTP weights, which transformers ignores, are written under the official `mtp.0.` prefix with HF-style names.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from deepmoe.config import CSA, HCA, SCORE_MOE, ModelConfig

Path = tuple  # path of keys into the nested params dict


def to_ours(kind: str, a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if kind == "copy":
        return a
    if kind == "linear":
        return a.T
    if kind in ("linear_split_out", "linear_split_in"):  # q_up [dc, H, c]; o_proj [g, dg, D]
        return a.T.reshape(shape)
    if kind == "o_group":  # HF [g*dg, H*c/g] viewed [g, dg, H*c/g] -> ours [g, H*c/g, dg]
        g, i, dg = shape
        return a.reshape(g, dg, i).transpose(0, 2, 1)
    if kind == "experts_down":  # HF [E, D, I] -> ours [E, I, D]
        return a.transpose(0, 2, 1)
    raise KeyError(kind)


def to_hf(kind: str, a: np.ndarray) -> np.ndarray:
    if kind == "copy":
        return a
    if kind == "linear":
        return a.T
    if kind == "linear_split_out":
        return a.reshape(a.shape[0], -1).T
    if kind == "linear_split_in":
        return a.reshape(-1, a.shape[-1]).T
    if kind == "o_group":
        g, i, dg = a.shape
        return a.transpose(0, 2, 1).reshape(g * dg, i)
    if kind == "experts_down":
        return a.transpose(0, 2, 1)
    raise KeyError(kind)


def _hc(path: Path, name: str, fn: str = "fn", base: str = "base", scale: str = "scale"):
    yield (*path, "fn"), f"{name}.{fn}", "linear"
    yield (*path, "base"), f"{name}.{base}", "copy"
    yield (*path, "scale"), f"{name}.{scale}", "copy"


def _compressor(path: Path, name: str):
    yield (*path, "kv_proj"), f"{name}.kv_proj.weight", "linear"
    yield (*path, "gate_proj"), f"{name}.gate_proj.weight", "linear"
    yield (*path, "position_bias"), f"{name}.position_bias", "copy"
    yield (*path, "kv_norm"), f"{name}.kv_norm.weight", "copy"


def layer_entries(layer_type: str, moe_type: str, prefix: str) -> Iterator[tuple[Path, str, str]]:
    """(path inside one layer's params, HF name, transform) for a decoder layer named `prefix` (ending in '.')."""
    a, m = f"{prefix}self_attn", f"{prefix}mlp"
    yield from _hc(("attn_hc",), f"{prefix}attn_hc")
    yield from _hc(("ffn_hc",), f"{prefix}ffn_hc")
    yield ("attn_norm",), f"{prefix}input_layernorm.weight", "copy"
    yield ("ffn_norm",), f"{prefix}post_attention_layernorm.weight", "copy"
    yield ("attn", "q_down"), f"{a}.q_a_proj.weight", "linear"
    yield ("attn", "q_norm"), f"{a}.q_a_norm.weight", "copy"
    yield ("attn", "q_up"), f"{a}.q_b_proj.weight", "linear_split_out"
    yield ("attn", "kv_proj"), f"{a}.kv_proj.weight", "linear"
    yield ("attn", "kv_norm"), f"{a}.kv_norm.weight", "copy"
    yield ("attn", "sinks"), f"{a}.sinks", "copy"
    yield ("attn", "o_group_proj"), f"{a}.o_a_proj.weight", "o_group"
    yield ("attn", "o_proj"), f"{a}.o_b_proj.weight", "linear_split_in"
    if layer_type in (CSA, HCA):
        yield from _compressor(("attn", "compressor"), f"{a}.compressor")
    if layer_type == CSA:
        ix = f"{a}.compressor.indexer"
        yield from _compressor(("attn", "indexer", "compressor"), ix)
        yield ("attn", "indexer", "q_up"), f"{ix}.q_b_proj.weight", "linear_split_out"
        yield ("attn", "indexer", "weights_proj"), f"{ix}.scorer.weights_proj.weight", "linear"
    yield ("moe", "router"), f"{m}.gate.weight", "linear"
    if moe_type == SCORE_MOE:
        yield ("moe", "router_bias"), f"{m}.gate.e_score_correction_bias", "copy"
    else:
        yield ("moe", "tid2eid"), f"{m}.gate.tid2eid", "copy"
    # gate and up projections of the routed experts share one HF tensor; see GATE_UP below.
    yield ("moe", "experts", "w_down"), f"{m}.experts.down_proj", "experts_down"
    yield ("moe", "shared", "w_gate"), f"{m}.shared_experts.gate_proj.weight", "linear"
    yield ("moe", "shared", "w_up"), f"{m}.shared_experts.up_proj.weight", "linear"
    yield ("moe", "shared", "w_down"), f"{m}.shared_experts.down_proj.weight", "linear"


def gate_up_name(prefix: str) -> str:
    return f"{prefix}mlp.experts.gate_up_proj"


def split_gate_up(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HF [E, 2I, D] (rows 0..I-1 gate, I..2I-1 up) -> ours ([E, D, I], [E, D, I])."""
    i = a.shape[1] // 2
    return a[:, :i].transpose(0, 2, 1), a[:, i:].transpose(0, 2, 1)


def join_gate_up(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    return np.concatenate([gate.transpose(0, 2, 1), up.transpose(0, 2, 1)], axis=1)


def global_entries(cfg: ModelConfig) -> Iterator[tuple[Path, str, str]]:
    yield ("embed",), "model.embed_tokens.weight", "copy"
    yield ("final_norm",), "model.norm.weight", "copy"
    yield ("lm_head",), "lm_head.weight", "linear"
    yield from _hc(("hc_head",), "model.hc_head", "hc_fn", "hc_base", "hc_scale")
    if cfg.num_mtp_layers:
        yield ("mtp", "embed_norm"), "mtp.0.enorm.weight", "copy"
        yield ("mtp", "hidden_norm"), "mtp.0.hnorm.weight", "copy"
        yield ("mtp", "embed_proj"), "mtp.0.e_proj.weight", "linear"
        yield ("mtp", "hidden_proj"), "mtp.0.h_proj.weight", "linear"
        yield ("mtp", "norm"), "mtp.0.norm.weight", "copy"
        yield from _hc(("mtp", "hc_head"), "mtp.0.hc_head", "hc_fn", "hc_base", "hc_scale")
