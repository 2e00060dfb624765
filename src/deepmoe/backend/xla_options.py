"""XLA compile options for deepmoe's own jitted programs (train step, prefill, decode, bench), and `jit`, a
`jax.jit` that applies them.

XLA:CPU hands reductions to YNNPACK by default. For the reductions this model is made of (mHC's sums over
4 streams in a middle axis, Sinkhorn's 4x4 row / column sums, their transposes in the backward pass) YNNPACK
runs 10-30x slower than XLA's own fused loops: keeping YNNPACK for dots only made the `mini` train step ~1.5x
faster (measured with `deepmoe bench`, see docs/performance.md). The option is experimental in XLA, so it is
probed once and silently dropped where this jaxlib does not know it; other platforms get no options. Set
DEEPMOE_XLA_OPTIONS=0 to compile with XLA's defaults. The train step's optimizer half keeps XLA's defaults on
purpose: its big flat reductions (the global gradient norm) are the ones YNNPACK does fast (train/step.py).

One more XLA:CPU setting, the memory-ordered schedule (`use_memory_ordered_schedule`), cannot be a compile option:
this jaxlib accepts `xla_cpu_enable_concurrency_optimized_scheduler` as one and compiles the very same program
(checked on one device and on a simulated 8-device mesh). XLA reads it from XLA_FLAGS when the first backend
starts, so `keep_host_buffers()` (backend/host_memory.py), which every deepmoe entry point calls first, sets it.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable

import jax

log = logging.getLogger(__name__)

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}

# XLA:CPU's default schedule is concurrency-optimised: it starts every op as soon as its inputs exist. Two costs:
# - Memory. A gradient program's recomputed (remat) layers all start early and stay live together: `small`'s
#   gradient at T=2048 with remat="full" held 2,399 MiB of temporaries, 459 MiB under the memory-ordered
#   schedule (311 MiB less without remat). docs/performance.md, twenty-second session.
# - Deadlocks on meshes. One device can have several independent collectives in flight; each blocks a thread of
#   the shared pool until its partners arrive, and once every pool thread blocks, the partners' collectives never
#   start (XLA aborts after its 40 s rendezvous timeout). Seen on tests/test_sharding.py's fsdp2 x expert2 x
#   tensor2 gradient program: 10 of 29 runs aborted with a hand-written mHC VJP since reverted.
SCHEDULE_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def add_xla_flag(flag: str) -> str:
    """Append `flag` (`--name=value`) to XLA_FLAGS for this process and the processes it starts; returns what
    happened. XLA reads XLA_FLAGS once, when the first backend starts, so only before that; a setting of the same
    name already in XLA_FLAGS is the user's and stays."""
    from deepmoe.backend.host_memory import backend_started

    flags = os.environ.get("XLA_FLAGS", "")
    if flag.lstrip("-").partition("=")[0] in flags:
        return "as set in XLA_FLAGS"
    if backend_started():
        return "not applied (a JAX backend was already started)"
    os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()
    return "on"


def use_memory_ordered_schedule() -> str:
    """SCHEDULE_FLAG in XLA_FLAGS (`add_xla_flag`). Harmless off CPU: XLA parses every backend's flags and only
    XLA:CPU reads this one."""
    return add_xla_flag(SCHEDULE_FLAG)


@functools.cache
def compiler_options() -> dict[str, str] | None:
    """The options for the default backend, or None (XLA's defaults)."""
    if os.environ.get("DEEPMOE_XLA_OPTIONS", "1") == "0" or jax.default_backend() != "cpu":
        return None
    flags = os.environ.get("XLA_FLAGS", "")
    if jax.device_count() > 1 and SCHEDULE_FLAG not in flags:
        log.warning("XLA:CPU over %d devices without %s in XLA_FLAGS: collectives can deadlock (XLA aborts after "
                    "40 s). Call deepmoe.backend.host_memory.keep_host_buffers() before JAX starts, or set the flag.",
                    jax.device_count(), SCHEDULE_FLAG)
    elif SCHEDULE_FLAG.partition("=")[0] not in flags:  # the flag set either way: the user's choice
        log.warning("XLA:CPU's default schedule (no %s in XLA_FLAGS) keeps a train step's recomputed layers live "
                    "together: `small`'s gradients at 8K tokens hold 8.9 GiB of temporaries, 1.6 GiB under the "
                    "memory-ordered schedule. Call deepmoe.backend.host_memory.keep_host_buffers() before JAX "
                    "starts (the deepmoe commands do), or set the flag.", SCHEDULE_FLAG)
    options = dict(CPU_OPTIONS)
    try:  # an unknown option or value fails at compile time: find out on something trivial
        jax.jit(lambda x: x + 1, compiler_options=options).lower(1.0).compile()
    except Exception as err:  # noqa: BLE001 - any failure means: this jaxlib cannot take the option
        log.info("XLA:CPU options %s not accepted by this jaxlib (%s); using XLA's defaults", options, err)
        return None
    return options


class _LazyJit:
    """jax.jit(fun, compiler_options=compiler_options(), **kwargs), built at the first call or attribute access:
    the backend must be up to know the options, and deepmoe modules must not start it at import. Called
    inside another trace (jit, eval_shape, grad) it is a plain nested jit: JAX takes compile options only at
    the top level, and the outer program's options apply."""

    def __init__(self, fun: Callable, kwargs: dict[str, Any]):
        self._fun, self._kwargs, self._jitted, self._nested = fun, kwargs, None, None
        functools.update_wrapper(self, fun)

    def _get(self):
        if self._jitted is None:
            self._jitted = jax.jit(self._fun, compiler_options=compiler_options(), **self._kwargs)
        return self._jitted

    def __call__(self, *args, **kwargs):
        if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((args, kwargs))):
            if self._nested is None:
                self._nested = jax.jit(self._fun, **self._kwargs)
            return self._nested(*args, **kwargs)
        return self._get()(*args, **kwargs)

    def __getattr__(self, name: str):  # lower, eval_shape, clear_cache, ...
        return getattr(self._get(), name)


def jit(fun: Callable | None = None, **kwargs: Any):
    """`jax.jit` with deepmoe's compile options; usable as `@jit`, `@jit(static_argnames=...)` or `jit(f, ...)`."""
    if fun is None:
        return lambda f: _LazyJit(f, kwargs)
    return _LazyJit(fun, kwargs)
