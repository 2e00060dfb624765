"""Dequantization of the release formats (spec §10.2).

- FP8: E4M3 values with one ue8m0 (power-of-two) scale per 128 x 128 block; scale [ceil(out/128), ceil(in/128)].
- MXFP4 (routed experts): int8 [out, in/2] holding two E2M1 codes per byte (low nibble = even column),
  one ue8m0 scale per 32 inputs; scale [out, in/32].
Scales may be stored as F8_E8M0 or as float32/bfloat16 values; both decode to the multiplier itself.
"""

from __future__ import annotations

import numpy as np

from deepmoe.io.safetensors_io import CheckpointError

FP8_BLOCK = 128
FP4_BLOCK = 32
# E2M1 code -> value; bit 3 is the sign.
FP4_VALUES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)


def dequantize_fp8(weight: np.ndarray, scale: np.ndarray, name: str, block: int = FP8_BLOCK) -> np.ndarray:
    """weight [out, in] float8_e4m3fn, scale [ceil(out/b), ceil(in/b)] -> float32 [out, in]."""
    out_dim, in_dim = weight.shape
    expected = (-(-out_dim // block), -(-in_dim // block))
    if scale.shape != expected:
        raise CheckpointError(f"scale of {name!r} has shape {scale.shape}; an FP8 weight of shape {weight.shape} "
                              f"with {block}x{block} blocks needs {expected}")
    multiplier = np.repeat(np.repeat(scale.astype(np.float32), block, axis=0), block, axis=1)
    return weight.astype(np.float32) * multiplier[:out_dim, :in_dim]


def dequantize_fp4(packed: np.ndarray, scale: np.ndarray, name: str, block: int = FP4_BLOCK) -> np.ndarray:
    """packed [out, in/2] int8, scale [out, in/block] -> float32 [out, in]."""
    out_dim, half = packed.shape
    in_dim = 2 * half
    if scale.shape != (out_dim, in_dim // block) or in_dim % block:
        raise CheckpointError(f"scale of {name!r} has shape {scale.shape}; an MXFP4 weight of packed shape "
                              f"{packed.shape} (= [{out_dim}, {in_dim}]) needs {(out_dim, in_dim // block)}")
    codes = packed.view(np.uint8)
    values = np.empty((out_dim, in_dim), np.float32)
    values[:, 0::2] = FP4_VALUES[codes & 0x0F]
    values[:, 1::2] = FP4_VALUES[codes >> 4]
    return values * np.repeat(scale.astype(np.float32), block, axis=1)


def is_quantized(weight: np.ndarray | np.dtype) -> bool:
    dtype = np.dtype(getattr(weight, "dtype", weight))
    return dtype.name == "float8_e4m3fn" or dtype == np.int8


def dequantize(weight: np.ndarray, scale: np.ndarray | None, name: str) -> np.ndarray:
    """Dispatch on the stored dtype; plain floating tensors pass through unchanged."""
    if not is_quantized(weight):
        return weight
    if scale is None:
        raise CheckpointError(f"tensor {name!r} is stored as {weight.dtype} but has no scale tensor beside it "
                              f"(looked for '.scale' and '_scale_inv')")
    if weight.dtype == np.int8:
        return dequantize_fp4(weight, scale, name)
    return dequantize_fp8(weight, scale, name)
