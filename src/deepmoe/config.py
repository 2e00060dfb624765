"""ModelConfig: every DeepSeek-V4 hyper-parameter, presets, validation and the HF config mapping.

Field names explain themselves; the HF / official names they map to are listed in `HF_FIELD_NAMES`
(and in README "Config fields"). See shared/design/deepseek-v4.md §2.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

SLIDING = "sliding_attention"
CSA = "compressed_sparse_attention"
HCA = "heavily_compressed_attention"
ATTENTION_TYPES = (SLIDING, CSA, HCA)
HASH_MOE = "hash_moe"
SCORE_MOE = "moe"
MOE_TYPES = (HASH_MOE, SCORE_MOE)
_ATTENTION_ALIASES = {"swa": SLIDING, "sliding": SLIDING, "csa": CSA, "hca": HCA}
DTYPES = ("float32", "bfloat16")
KERNELS = ("reference", "pallas", "auto")


class ConfigError(ValueError):
    """A ModelConfig field is invalid; the message names the field and the fix."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # Sizes.
    vocab_size: int = 512
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    head_dim: int = 64
    rope_head_dim: int = 16
    query_latent_dim: int = 32
    output_groups: int = 2
    output_group_latent_dim: int = 16
    # Attention schedule: one entry per decoder layer (the MTP layer is always sliding-window).
    layer_types: tuple[str, ...] = (SLIDING, CSA, HCA, CSA)
    sliding_window: int = 16
    csa_compress_ratio: int = 4
    hca_compress_ratio: int = 16
    # Lightning indexer (CSA layers).
    indexer_heads: int = 8
    indexer_head_dim: int = 32
    indexer_topk: int = 4
    # RoPE: plain table for sliding layers, YaRN table for compressed layers.
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    yarn_factor: float = 16.0
    yarn_original_max_positions: int = 65536
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    max_position_embeddings: int = 1048576
    # Mixture of experts (every layer); the first `num_hash_layers` are hash-routed.
    num_experts: int = 8
    experts_per_token: int = 2
    num_shared_experts: int = 1
    expert_hidden_dim: int = 32
    num_hash_layers: int = 1
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0
    # Manifold-constrained hyper-connections.
    residual_streams: int = 4
    sinkhorn_iterations: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    # Multi-token prediction depth (0 or 1).
    num_mtp_layers: int = 1
    # Precision policy: parameters are stored in `param_dtype`, matmuls run in `compute_dtype`;
    # norms, router, mHC, compressor softmax, sinks and logits always run in float32.
    param_dtype: str = "float32"
    compute_dtype: str = "bfloat16"
    # Attention core and the `sorted` MoE's grouped matmul: "reference" (jnp, lax.ragged_dot), "pallas"
    # (pallas_kernels; interpreted where there is no lowering), "auto" (Pallas on GPU, reference elsewhere).
    # An execution choice, kept here because cfg is static.
    kernels: str = "reference"
    bos_token_id: int = 0
    eos_token_id: int = 1

    def __post_init__(self):
        types = tuple(_ATTENTION_ALIASES.get(t, t) for t in self.layer_types)
        object.__setattr__(self, "layer_types", types)
        validate(self)

    # ----- derived quantities -------------------------------------------------------------------
    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @property
    def moe_layer_types(self) -> tuple[str, ...]:
        return tuple(HASH_MOE if i < self.num_hash_layers else SCORE_MOE for i in range(self.num_layers))

    def compress_ratio(self, layer_type: str) -> int:
        return {SLIDING: 0, CSA: self.csa_compress_ratio, HCA: self.hca_compress_ratio}[layer_type]

    @property
    def output_group_input_dim(self) -> int:
        return self.num_heads * self.head_dim // self.output_groups

    # ----- HF mapping ---------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, source: str | os.PathLike | Mapping[str, Any], **overrides: Any) -> "ModelConfig":
        """Build from an HF `config.json` (path, directory or dict): canonical or release fields."""
        from deepmoe.hf_config import config_kwargs_from_hf

        return cls(**{**config_kwargs_from_hf(source), **overrides})

    def to_hf(self) -> dict[str, Any]:
        """The HF `DeepseekV4Config` fields of this config (canonical names)."""
        from deepmoe.hf_config import config_to_hf

        return config_to_hf(self)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def _fail(field: str, problem: str, fix: str) -> None:
    raise ConfigError(f"ModelConfig.{field}: {problem}; {fix}")


def validate(cfg: ModelConfig) -> None:
    """Raise ConfigError naming the field and the fix for any inconsistent setting."""
    positive = ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim", "query_latent_dim",
                "output_groups", "output_group_latent_dim", "sliding_window", "num_experts", "experts_per_token",
                "expert_hidden_dim", "residual_streams", "sinkhorn_iterations", "indexer_heads",
                "indexer_head_dim", "indexer_topk", "csa_compress_ratio", "hca_compress_ratio")
    for name in positive:
        if getattr(cfg, name) <= 0:
            _fail(name, f"must be positive, got {getattr(cfg, name)}", "set it to a positive integer")
    if len(cfg.layer_types) != cfg.num_layers:
        _fail("layer_types", f"has {len(cfg.layer_types)} entries but num_layers={cfg.num_layers}",
              "give exactly one attention type per decoder layer")
    for i, t in enumerate(cfg.layer_types):
        if t not in ATTENTION_TYPES:
            _fail("layer_types", f"entry {i} is the unknown layer type {t!r}",
                  f"use one of {ATTENTION_TYPES} (or the aliases swa/csa/hca)")
    if cfg.num_heads % cfg.output_groups:
        _fail("output_groups", f"num_heads={cfg.num_heads} is not divisible by output_groups={cfg.output_groups}",
              "choose output_groups dividing num_heads")
    if cfg.rope_head_dim <= 0 or cfg.rope_head_dim % 2:
        _fail("rope_head_dim", f"must be a positive even number, got {cfg.rope_head_dim}",
              "RoPE rotates channel pairs; use an even size")
    if cfg.rope_head_dim > cfg.head_dim:
        _fail("rope_head_dim", f"{cfg.rope_head_dim} exceeds head_dim={cfg.head_dim}", "use rope_head_dim <= head_dim")
    if CSA in cfg.layer_types and cfg.rope_head_dim > cfg.indexer_head_dim:
        _fail("indexer_head_dim", f"{cfg.indexer_head_dim} is smaller than rope_head_dim={cfg.rope_head_dim}",
              "the indexer rotates its trailing rope_head_dim channels; make it at least that large")
    if cfg.experts_per_token > cfg.num_experts:
        _fail("experts_per_token", f"top-k {cfg.experts_per_token} exceeds num_experts={cfg.num_experts}",
              "choose experts_per_token <= num_experts")
    if not 0 <= cfg.num_hash_layers <= cfg.num_layers:
        _fail("num_hash_layers", f"{cfg.num_hash_layers} is outside [0, num_layers={cfg.num_layers}]",
              "hash-route at most every decoder layer")
    if cfg.num_shared_experts != 1:
        _fail("num_shared_experts", f"got {cfg.num_shared_experts}", "DeepSeek-V4 has exactly one shared expert")
    if cfg.num_mtp_layers not in (0, 1):
        _fail("num_mtp_layers", f"got {cfg.num_mtp_layers}", "only MTP depth 0 or 1 is supported (V4 uses 1)")
    for name in ("param_dtype", "compute_dtype"):
        if getattr(cfg, name) not in DTYPES:
            _fail(name, f"unknown dtype {getattr(cfg, name)!r}", f"use one of {DTYPES}")
    if cfg.kernels not in KERNELS:
        _fail("kernels", f"unknown kernel choice {cfg.kernels!r}", f"use one of {KERNELS}")
    if cfg.bos_token_id >= cfg.vocab_size or cfg.eos_token_id >= cfg.vocab_size:
        _fail("vocab_size", f"{cfg.vocab_size} does not cover bos/eos ids {cfg.bos_token_id}/{cfg.eos_token_id}",
              "enlarge the vocabulary")
    if cfg.hc_eps <= 0 or cfg.rms_norm_eps <= 0:
        _fail("hc_eps" if cfg.hc_eps <= 0 else "rms_norm_eps", "must be positive", "use e.g. 1e-6")
    if cfg.yarn_factor < 1 or not math.isfinite(cfg.yarn_factor):
        _fail("yarn_factor", f"got {cfg.yarn_factor}", "use 1 (no scaling) or larger")


def _alternating(prefix: tuple[str, ...], num_layers: int, first: str, second: str) -> tuple[str, ...]:
    rest = num_layers - len(prefix)
    return prefix + tuple(first if i % 2 == 0 else second for i in range(rest))


def _v4_flash() -> ModelConfig:
    return ModelConfig(
        vocab_size=129280, hidden_size=4096, num_layers=43, num_heads=64, head_dim=512, rope_head_dim=64,
        query_latent_dim=1024, output_groups=8, output_group_latent_dim=1024,
        layer_types=_alternating((SLIDING, SLIDING), 43, CSA, HCA), sliding_window=128,
        csa_compress_ratio=4, hca_compress_ratio=128, indexer_heads=64, indexer_head_dim=128, indexer_topk=512,
        num_experts=256, experts_per_token=6, expert_hidden_dim=2048, num_hash_layers=3,
        routed_scaling_factor=1.5, residual_streams=4, sinkhorn_iterations=20, num_mtp_layers=1)


def _v4_pro() -> ModelConfig:
    return ModelConfig(
        vocab_size=129280, hidden_size=7168, num_layers=61, num_heads=128, head_dim=512, rope_head_dim=64,
        query_latent_dim=1536, output_groups=16, output_group_latent_dim=1024,
        layer_types=_alternating((HCA, HCA), 61, CSA, HCA), sliding_window=128,
        csa_compress_ratio=4, hca_compress_ratio=128, indexer_heads=64, indexer_head_dim=128, indexer_topk=1024,
        num_experts=384, experts_per_token=6, expert_hidden_dim=3072, num_hash_layers=3,
        routed_scaling_factor=2.5, residual_streams=4, sinkhorn_iterations=20, num_mtp_layers=1)


def _tiny() -> ModelConfig:
    # The spec's §13 reference config: every attention type and both MoE kinds, compiles in seconds.
    return ModelConfig()


def _small() -> ModelConfig:
    # ~100M parameters: a CPU benchmark size with all three attention types and both MoE kinds.
    return ModelConfig(
        vocab_size=512, hidden_size=512, num_layers=8, num_heads=8, head_dim=128, rope_head_dim=32,
        query_latent_dim=256, output_groups=4, output_group_latent_dim=256,
        layer_types=_alternating((SLIDING, SLIDING), 8, CSA, HCA), sliding_window=64,
        csa_compress_ratio=4, hca_compress_ratio=32, indexer_heads=8, indexer_head_dim=64, indexer_topk=32,
        num_experts=16, experts_per_token=2, expert_hidden_dim=384, num_hash_layers=2,
        routed_scaling_factor=1.5, num_mtp_layers=1)


def _mini() -> ModelConfig:
    # ~10M parameters: the benchmark size of the performance targets (sequence 512, batch 1).
    return ModelConfig(
        vocab_size=512, hidden_size=256, num_layers=4, num_heads=4, head_dim=128, rope_head_dim=32,
        query_latent_dim=128, output_groups=2, output_group_latent_dim=128, layer_types=(SLIDING, CSA, HCA, CSA),
        sliding_window=64, csa_compress_ratio=4, hca_compress_ratio=32, indexer_heads=8, indexer_head_dim=64,
        indexer_topk=32, num_experts=8, experts_per_token=2, expert_hidden_dim=256, num_hash_layers=1)


def _medium() -> ModelConfig:
    # ~1B parameters (0.34B active): the GPU benchmark size (one accelerator, bf16, sequence 4096), V4-Flash's
    # layout scaled down: two sliding layers then CSA / HCA alternating, 128-token window, HCA ratio 128,
    # fine-grained top-6 experts, two hash-routed layers.
    return ModelConfig(
        vocab_size=32768, hidden_size=1024, num_layers=16, num_heads=16, head_dim=128, rope_head_dim=64,
        query_latent_dim=512, output_groups=4, output_group_latent_dim=512,
        layer_types=_alternating((SLIDING, SLIDING), 16, CSA, HCA), sliding_window=128,
        csa_compress_ratio=4, hca_compress_ratio=128, indexer_heads=16, indexer_head_dim=128, indexer_topk=512,
        num_experts=32, experts_per_token=6, expert_hidden_dim=512, num_hash_layers=2,
        routed_scaling_factor=1.5, num_mtp_layers=1)


PRESETS = {"tiny": _tiny, "mini": _mini, "small": _small, "medium": _medium, "v4-flash": _v4_flash,
           "v4-pro": _v4_pro}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named configuration: one of PRESETS (tiny, mini, small, medium, v4-flash, v4-pro); fields may be
    overridden."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    return cfg.replace(**overrides) if overrides else cfg
