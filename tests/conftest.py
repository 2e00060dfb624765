"""Test set-up: 8 simulated CPU devices, a persistent compilation cache, shared session fixtures."""

import contextlib
import logging
import os
import re

# Must happen before jax is imported anywhere. keep_host_buffers() below adds XLA:CPU's memory-ordered schedule
# to these flags, as the deepmoe commands do: without it the simulated mesh's collectives can deadlock.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

_CACHE = Path(__file__).resolve().parent.parent / ".jax_cache"
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
# XLA:CPU compiles with LLVM at -O0 (jax_disable_most_optimizations). Every HLO pass still runs, so fusions,
# layouts, buffers and collectives are those users get; results differ only in rounding, which the tests'
# tolerances absorb. Most tests compile a program and run it once or twice, and compiling is most of the suite:
# from an empty cache on 2 cores it took 16.5 min instead of 22 (docs/performance.md, fourteenth session).
jax.config.update("jax_disable_most_optimizations", True)

from deepmoe.backend.host_memory import keep_host_buffers  # noqa: E402

keep_host_buffers()  # as the deepmoe commands do, before the backend starts

import deepmoe as dm  # noqa: E402


@pytest.fixture(scope="session")
def tiny_cfg():
    return dm.preset("tiny")


@pytest.fixture(scope="session")
def tiny_params(tiny_cfg):
    return dm.init_params(tiny_cfg, jax.random.key(0))


@pytest.fixture
def compile_log(caplog):
    """`with compile_log() as compiles:` -> after the block, `compiles` holds (jitted function's name, thread)
    for every program XLA compiled inside it, read from JAX's compile log (a persistent-cache hit logs the
    same line)."""

    @contextlib.contextmanager
    def record():
        caplog.set_level(logging.WARNING, logger="jax._src.dispatch")  # records of every thread reach caplog
        caplog.clear()
        logged_before = jax.config.jax_log_compiles
        jax.config.update("jax_log_compiles", True)  # global, not the thread-local context: threads see it
        compiles = []
        try:
            yield compiles
        finally:
            jax.config.update("jax_log_compiles", logged_before)
            compiles.extend((m.group(1), r.threadName) for r in caplog.records
                            if (m := re.match(r"Finished XLA compilation of jit\((\w+)\)", r.getMessage())))

    return record


# The heaviest test files from an empty compilation cache on 2 cores (--durations, 2026-12-02: 320 s down to 114 s
# each), heaviest first. `make test` hands files to its two workers in collection order (--dist loadfile
# --no-loadscope-reorder); started first, the long files no longer end the run on one worker while the other idles.
HEAVY_FILES = ("test_experiments.py", "test_sharding.py", "test_layer_layouts.py", "test_notebooks.py",
               "test_bench.py", "test_infer_decode.py", "test_model.py", "test_model_kernels.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the other files keep their order
