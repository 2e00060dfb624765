"""The precision policy in one place: matmuls in the compute dtype, the spec's islands in float32."""

from __future__ import annotations

import string

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
    return _contract(spec, tuple(o.astype(dtype) for o in operands), matmul_precision(cfg))


def einsum_f32(spec: str, *operands: jax.Array) -> jax.Array:
    """einsum for the float32 islands (router, mHC, compressor, logits)."""
    return _contract(spec, tuple(o.astype(jnp.float32) for o in operands), jax.lax.Precision.HIGHEST)


def _contract(spec: str, operands: tuple[jax.Array, ...], precision: jax.lax.Precision) -> jax.Array:
    if _one_row_on_cpu(spec, operands):
        return _as_two_rows(spec, *operands, precision=precision)
    return jnp.einsum(spec, *operands, precision=precision)


# Below this many fp32 matrix elements (0.75 MB) the two-row product was as slow or slower (see _as_two_rows).
_TWO_ROWS_MIN_FP32_ELEMENTS = 192 * 1024


def _one_row_on_cpu(spec: str, operands: tuple[jax.Array, ...]) -> bool:
    """Whether this is a vector-matrix product (a decode step's matmul) compiled for XLA:CPU that runs faster as
    two rows (`_as_two_rows`): two operands, no batch index, the first operand's free indices all of size 1,
    and a matrix in a low-precision dtype or of at least _TWO_ROWS_MIN_FP32_ELEMENTS."""
    if len(operands) != 2 or "->" not in spec or "." in spec or jax.default_backend() != "cpu":
        return False
    inputs, out = spec.split("->")
    lhs, rhs = inputs.split(",")
    row, matrix = operands
    if set(lhs) & set(rhs) & set(out):  # a batched product as two rows ran ~10x slower
        return False
    if matrix.dtype == jnp.float32 and matrix.size < _TWO_ROWS_MIN_FP32_ELEMENTS:
        return False
    return all(size == 1 for index, size in zip(lhs, row.shape) if index not in rhs)


def _as_two_rows(spec: str, row: jax.Array, matrix: jax.Array, precision: jax.lax.Precision) -> jax.Array:
    """einsum(spec, row, matrix) computed as the first row of a two-row product whose second row is zero.

    XLA:CPU runs a one-row product with its own single-threaded matrix-vector loop and hands products of two or
    more rows to YNNPACK. On the bench machine (2-core Sapphire Rapids) YNNPACK reads fp32 matrices of 0.75-2
    MB at 34-41 GB/s against 27-28 (smaller ones: up to 1.2x slower, hence the size floor), and bf16 ones 2.3-3.7x
    faster at every size (one bf16 row goes through a converted copy of the matrix). The extra row costs a row
    of arithmetic and no memory traffic. `small` decode (`generate`): fp32 195 -> 235 tok/s, bf16 131 -> 204.
    The first row is the same sum, possibly accumulated in another order."""
    new = next(c for c in string.ascii_letters if c not in spec)
    lhs, rest = spec.split(",", 1)
    rows = jnp.stack([row, jnp.zeros_like(row)])
    return jnp.einsum(f"{new}{lhs},{rest.replace('->', '->' + new)}", rows, matrix, precision=precision)[0]
