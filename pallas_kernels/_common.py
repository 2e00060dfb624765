"""Shared helpers: implementation dispatch, padding, backend-specific compiler params.

Every kernel module exposes ``f(..., impl="auto", interpret=None)``:

* ``impl="reference"`` runs the pure-jnp reference (also the fallback on platforms without a Pallas lowering,
  e.g. CPU or an Ascend PJRT plugin).
* ``impl="pallas"`` runs the Pallas kernel; on a platform without a Pallas lowering it runs interpreted.
* ``impl="auto"`` runs Pallas on GPU (Triton) and the reference elsewhere, unless ``interpret=True`` asks for
  the interpreted kernel explicitly (how the CPU tests exercise the kernels). See AUTO_PALLAS_PLATFORMS for
  why TPU is not (yet) in the automatic set.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any, Literal

import jax
import jax.numpy as jnp

Impl = Literal["auto", "pallas", "reference"]

# Key positions of padded keys: far beyond any query position, so every causal mask hides them.
PAD_POS = 1 << 30
# Finite "minus infinity" for running maxima: keeps exp(m_old - m_new) free of inf - inf = nan.
NEG_INF = -1e30

# Platforms where impl="auto" picks Pallas: those whose lowering (Triton) the tests check. TPU (Mosaic) is
# not in the list: the kernels use whole-array blocks and gathers that Mosaic TPU is not known to accept, and
# no TPU lowering can be checked without a TPU. impl="pallas" still tries it there.
AUTO_PALLAS_PLATFORMS = ("gpu", "cuda", "rocm")
_NATIVE_PLATFORMS = ("gpu", "cuda", "rocm", "tpu")


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one call runs: which implementation, interpreted or compiled, and for which backend."""

    use_pallas: bool
    interpret: bool
    platform: str

    @property
    def on_gpu(self) -> bool:
        return not self.interpret and self.platform in ("gpu", "cuda", "rocm")

    @property
    def min_dot_dim(self) -> int:
        # Triton's tl.dot needs every operand dimension >= 16; interpreted kernels have no such limit.
        return 16 if self.on_gpu else 1

    def compiler_params(self, num_warps: int = 4, num_stages: int = 2) -> Any:
        """Triton params on GPU (jax >= 0.9 otherwise lowers pallas_call through Mosaic GPU), None elsewhere."""
        if not self.on_gpu:
            return None
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


_platform_override: list[str] = []


@contextlib.contextmanager
def target_platform(platform: str) -> Iterator[None]:
    """Trace kernels as if running on ``platform`` ("gpu", "tpu", "cpu").

    Lets a CPU-only host check that the kernels lower for another backend, e.g.
    ``with target_platform("gpu"): jax.jit(f).trace(x).lower(lowering_platforms=("cuda",))``.
    """
    _platform_override.append(platform)
    try:
        yield
    finally:
        _platform_override.pop()


def current_platform() -> str:
    """The platform kernels are traced for: the innermost ``target_platform``, else JAX's default backend."""
    return _platform_override[-1] if _platform_override else jax.default_backend()


def plan(impl: Impl, interpret: bool | None, platform: str | None = None) -> Plan:
    """Resolve ``impl``/``interpret`` for the current default backend (or ``platform`` when given)."""
    if impl not in ("auto", "pallas", "reference"):
        raise ValueError(f"impl must be 'auto', 'pallas' or 'reference', got {impl!r}")
    platform = platform or current_platform()
    native = platform in _NATIVE_PLATFORMS
    if impl == "reference" or (impl == "auto" and platform not in AUTO_PALLAS_PLATFORMS and not interpret):
        return Plan(False, False, platform)
    return Plan(True, bool(interpret) if interpret is not None else not native, platform)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return cdiv(a, b) * b


def block_size(requested: int, extent: int, minimum: int = 1) -> int:
    """A power-of-two block no larger than needed for ``extent`` (Triton tensors must be powers of two)."""
    return max(minimum, min(next_pow2(requested), next_pow2(extent)))


def pad_axis(x: jax.Array, axis: int, size: int, value: Any = 0) -> jax.Array:
    """Pad ``x`` along ``axis`` at the end up to ``size`` (no-op when already that long)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)
