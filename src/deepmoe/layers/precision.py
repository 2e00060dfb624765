"""The precision policy in one place: matmuls in the compute dtype, the spec's islands in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepmoe.config import ModelConfig


def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
    return jnp.dtype(cfg.compute_dtype)


def matmul_precision(cfg: ModelConfig) -> jax.lax.Precision:
    # fp32 mode is the parity mode: forbid TF32 / bf16 passes on accelerators.
    return jax.lax.Precision.HIGHEST if cfg.compute_dtype == "float32" else jax.lax.Precision.DEFAULT


def einsum(cfg: ModelConfig, spec: str, *operands: jax.Array) -> jax.Array:
    """einsum in the compute dtype (operands cast), result in the compute dtype."""
    dtype = compute_dtype(cfg)
    return jnp.einsum(spec, *(o.astype(dtype) for o in operands), precision=matmul_precision(cfg))


def einsum_f32(spec: str, *operands: jax.Array) -> jax.Array:
    """einsum for the float32 islands (router, mHC, compressor, logits)."""
    return jnp.einsum(spec, *(o.astype(jnp.float32) for o in operands), precision=jax.lax.Precision.HIGHEST)
