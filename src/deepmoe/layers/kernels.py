"""Where `cfg.kernels` lets the Pallas kernels of `pallas_kernels` run: the attention core (layers.attention) and
the routed experts' grouped matmul (moe_dispatch.sort_ragged).

Resolved for the platform a program is traced for: JAX's default backend, or the one a
`pallas_kernels.target_platform` block names (how a CPU host checks what a GPU program lowers to).
"""

from __future__ import annotations

import pallas_kernels as pk

from deepmoe.config import ModelConfig


def use_pallas_kernels(cfg: ModelConfig) -> bool:
    """cfg.kernels: "pallas" always (interpreted where there is no Pallas lowering), "auto" on GPU only."""
    return cfg.kernels == "pallas" or (cfg.kernels == "auto" and native_pallas())


def native_pallas() -> bool:
    """Whether the traced-for platform compiles the kernels (Triton on GPU) rather than interpreting them."""
    return traced_platform() in pk.AUTO_PALLAS_PLATFORMS


def traced_platform() -> str:
    """The platform programs are traced for (see the module docstring)."""
    return pk.current_platform()
