"""Keep the CPU runtime's large host buffers between runs of a compiled program.

XLA:CPU mallocs a program's temporaries on every execution (a `small` train step: 1.2 GB) and frees them
afterwards. glibc serves blocks this large from fresh mmap'd pages and unmaps them on free, so every run
page-faults its whole temp buffer in again and the kernel zeroes it: measured ~300k page faults and ~0.65 s of
kernel time per `small` train step on 2 cores (step 1.76 s -> 1.36 s without them). Two settings keep the pages:

- glibc's mmap and trim thresholds raised to their maximum, so large blocks come from the heap and stay there
  when freed (the process keeps its peak host memory instead of returning it between steps);
- single-device programs run on the calling thread (`jax_cpu_enable_async_dispatch=False`): the runtime's
  worker threads allocate from per-thread malloc arenas, which cannot hold blocks over 64 MB and mmap them
  whatever the thresholds say.

Both are process-wide, so the `deepmoe` commands, `make demo` and the experiment scripts call
`keep_host_buffers()` first thing; library users opt in the same way (before JAX starts a backend).
DEEPMOE_KEEP_HOST_BUFFERS=0 turns them off.

`keep_host_buffers()` also applies XLA:CPU's memory-ordered schedule, which keeps fewer temporaries live at once
and no longer lets collectives deadlock (`xla_options.use_memory_ordered_schedule`: a flag in XLA_FLAGS, read
when the backend starts). It applies whatever DEEPMOE_KEEP_HOST_BUFFERS says; an explicit
`--xla_cpu_enable_concurrency_optimized_scheduler=true` in XLA_FLAGS keeps XLA's default.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc malloc.h
_LARGEST = 2**31 - 1  # mallopt takes an int


def glibc_linux() -> bool:
    """Whether the settings can apply here: they are glibc malloc options."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def backend_started() -> bool:
    """Whether JAX has started a backend, after which process-wide runtime settings no longer apply."""
    try:
        from jax._src.xla_bridge import backends_are_initialized
        return backends_are_initialized()
    except ImportError:  # private API moved: assume the worst
        return True


def keep_host_buffers() -> str:
    """Apply the settings above where they can work; returns what happened to the host buffers (for logs and
    bench JSON; the schedule shows in XLA_FLAGS, which the bench records)."""
    from deepmoe.backend.xla_options import use_memory_ordered_schedule

    use_memory_ordered_schedule()
    if os.environ.get("DEEPMOE_KEEP_HOST_BUFFERS", "1") == "0":
        return "off (DEEPMOE_KEEP_HOST_BUFFERS=0)"
    if not glibc_linux():
        return "not applied (needs Linux with glibc)"
    import jax

    if backend_started():
        return "not applied (a JAX backend was already started; call keep_host_buffers() before using JAX)"
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not (libc.mallopt(_M_MMAP_THRESHOLD, _LARGEST) and libc.mallopt(_M_TRIM_THRESHOLD, _LARGEST)):
        return "not applied (glibc refused the mallopt thresholds)"
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return "on"
