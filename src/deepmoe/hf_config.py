"""Mapping between ModelConfig and HF / release `config.json` fields (spec §2.1-2.3)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from deepmoe.config import CSA, HCA, SLIDING, ConfigError, ModelConfig

# ModelConfig field -> HF canonical field (release configs use the same names unless noted in from_hf).
HF_FIELD_NAMES = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "head_dim": "head_dim",
    "query_latent_dim": "q_lora_rank",
    "output_groups": "o_groups",
    "output_group_latent_dim": "o_lora_rank",
    "sliding_window": "sliding_window",
    "indexer_heads": "index_n_heads",
    "indexer_head_dim": "index_head_dim",
    "indexer_topk": "index_topk",
    "compress_rope_theta": "compress_rope_theta",
    "max_position_embeddings": "max_position_embeddings",
    "num_experts": "n_routed_experts",
    "experts_per_token": "num_experts_per_tok",
    "num_shared_experts": "n_shared_experts",
    "expert_hidden_dim": "moe_intermediate_size",
    "routed_scaling_factor": "routed_scaling_factor",
    "swiglu_limit": "swiglu_limit",
    "residual_streams": "hc_mult",
    "sinkhorn_iterations": "hc_sinkhorn_iters",
    "hc_eps": "hc_eps",
    "rms_norm_eps": "rms_norm_eps",
    "num_mtp_layers": "num_nextn_predict_layers",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
}
# Also derived (not 1:1): rope_head_dim <- qk_rope_head_dim | partial_rotary_factor * head_dim;
# layer_types <- layer_types | compress_ratios; num_hash_layers <- num_hash_layers | mlp_layer_types;
# csa/hca_compress_ratio <- compress_rates; rope_theta / yarn_* <- rope_theta, rope_scaling | rope_parameters.
_RATIO_TO_TYPE = {0: SLIDING}


def _read(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"no HF config at {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e


def config_kwargs_from_hf(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    hf = _read(source)
    model_type = hf.get("model_type", "deepseek_v4")
    if model_type != "deepseek_v4":
        raise ConfigError(f"config model_type is {model_type!r}; deepmoe loads 'deepseek_v4' checkpoints only")
    kw: dict[str, Any] = {ours: hf[theirs] for ours, theirs in HF_FIELD_NAMES.items() if theirs in hf}
    for ours, official in (("hidden_size", "dim"), ("num_layers", "n_layers"), ("num_heads", "n_heads"),
                           ("num_hash_layers", "num_hash_layers"),
                           ("num_hash_layers", "n_hash_layers"), ("expert_hidden_dim", "moe_inter_dim"),
                           ("routed_scaling_factor", "route_scale"), ("sliding_window", "window_size"),
                           ("query_latent_dim", "q_lora_rank"), ("num_mtp_layers", "n_mtp_layers"),
                           ("experts_per_token", "n_activated_experts"), ("residual_streams", "hc_mult")):
        if ours not in kw and official in hf:
            kw[ours] = hf[official]
    head_dim = kw.get("head_dim", ModelConfig.head_dim)
    if "qk_rope_head_dim" in hf:
        kw["rope_head_dim"] = int(hf["qk_rope_head_dim"])
    elif "rope_head_dim" in hf:
        kw["rope_head_dim"] = int(hf["rope_head_dim"])
    elif "partial_rotary_factor" in hf:
        kw["rope_head_dim"] = int(round(hf["partial_rotary_factor"] * head_dim))

    rates = hf.get("compress_rates") or {}
    if CSA in rates:
        kw["csa_compress_ratio"] = int(rates[CSA])
    if HCA in rates:
        kw["hca_compress_ratio"] = int(rates[HCA])
    num_layers = kw.get("num_layers")
    if hf.get("layer_types"):
        kw["layer_types"] = tuple(hf["layer_types"])[:num_layers]
    elif hf.get("compress_ratios"):
        ratios = [int(r) for r in hf["compress_ratios"]][:num_layers]  # the trailing entry is the MTP layer
        nonzero = sorted({r for r in ratios if r})
        if len(nonzero) > 2:
            raise ConfigError(f"compress_ratios has more than two non-zero ratios {nonzero}; expected CSA and HCA")
        if nonzero:
            kw.setdefault("csa_compress_ratio", nonzero[0])
        if len(nonzero) == 2:
            kw.setdefault("hca_compress_ratio", nonzero[1])
        kind = {0: SLIDING, kw.get("csa_compress_ratio"): CSA, kw.get("hca_compress_ratio"): HCA}
        kw["layer_types"] = tuple(kind[r] for r in ratios)
    if "num_hash_layers" not in kw and hf.get("mlp_layer_types"):
        kw["num_hash_layers"] = sum(t == "hash_moe" for t in hf["mlp_layer_types"])

    rope = hf.get("rope_parameters") or {}
    main = rope.get("main", rope)
    compress = rope.get("compress", rope)
    scaling = hf.get("rope_scaling") or compress or {}
    if "rope_theta" in hf or "rope_theta" in main:
        kw["rope_theta"] = float(hf.get("rope_theta", main.get("rope_theta")))
    if "rope_theta" in compress and "compress_rope_theta" not in kw:
        kw["compress_rope_theta"] = float(compress["rope_theta"])
    for ours, theirs in (("yarn_factor", "factor"), ("yarn_original_max_positions", "original_max_position_embeddings"),
                         ("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
        if theirs in scaling:
            kw[ours] = type(getattr(ModelConfig, ours))(scaling[theirs])
    if scaling.get("type", scaling.get("rope_type", "yarn")) not in ("yarn",) and scaling:
        raise ConfigError(f"rope scaling type {scaling.get('type') or scaling.get('rope_type')!r} is not YaRN")
    return kw


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    hf: dict[str, Any] = {theirs: getattr(cfg, ours) for ours, theirs in HF_FIELD_NAMES.items()}
    hf.update(
        model_type="deepseek_v4",
        architectures=["DeepseekV4ForCausalLM"],
        num_key_value_heads=1,
        qk_rope_head_dim=cfg.rope_head_dim,
        partial_rotary_factor=cfg.rope_head_dim / cfg.head_dim,
        layer_types=list(cfg.layer_types),
        mlp_layer_types=list(cfg.moe_layer_types),
        num_hash_layers=cfg.num_hash_layers,
        compress_rates={CSA: cfg.csa_compress_ratio, HCA: cfg.hca_compress_ratio},
        rope_theta=cfg.rope_theta,
        rope_parameters={"rope_type": "yarn", "factor": cfg.yarn_factor,
                         "original_max_position_embeddings": cfg.yarn_original_max_positions,
                         "beta_fast": cfg.yarn_beta_fast, "beta_slow": cfg.yarn_beta_slow},
        scoring_func="sqrtsoftplus",
        topk_method="noaux_tc",
        norm_topk_prob=True,
        hidden_act="silu",
        tie_word_embeddings=False,
        attention_bias=False,
    )
    return hf
