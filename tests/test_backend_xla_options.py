"""deepmoe.backend.xla_options: our jit compiles with the CPU options, computes what jax.jit computes, nests
inside other traces, and falls back to XLA's defaults when asked; the memory-ordered schedule reaches a fresh
process's programs through XLA_FLAGS and is left alone where the user set it."""

import json
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepmoe.backend import xla_options


def _stream_mix(w, x):  # the mHC pattern the option is for: a sum over 4 streams in a middle axis
    return jnp.sum(w[..., None] * x, axis=1)


@pytest.fixture
def fresh_options():
    xla_options.compiler_options.cache_clear()
    yield
    xla_options.compiler_options.cache_clear()


def test_jit_matches_numpy_and_applies_cpu_options(fresh_options):
    w = np.random.default_rng(0).normal(size=(512, 4)).astype(np.float32)
    x = np.random.default_rng(1).normal(size=(512, 4, 256)).astype(np.float32)
    f = xla_options.jit(_stream_mix)
    np.testing.assert_allclose(np.asarray(f(w, x)), np.einsum("tj,tjd->td", w, x), rtol=1e-5, atol=1e-5)
    assert xla_options.compiler_options() == xla_options.CPU_OPTIONS
    # the option reaches the compiled program: XLA's default hands this reduction to YNNPACK, ours does not
    if "__ynn_fusion" not in jax.jit(_stream_mix).lower(w, x).compile().as_text():
        pytest.skip("this jaxlib no longer gives reductions to YNNPACK: the option may be obsolete")
    assert "__ynn_fusion" not in f.lower(w, x).compile().as_text()


def test_nested_inside_jit_grad_and_eval_shape(fresh_options):
    f = xla_options.jit(lambda x: jnp.sum(jnp.sin(x) ** 2))
    x = jnp.linspace(0.0, 1.0, 8)
    np.testing.assert_allclose(np.asarray(jax.jit(jax.grad(f))(x)), np.sin(2 * np.asarray(x)), rtol=1e-5)
    assert jax.eval_shape(f, x).shape == ()


def test_a_mesh_without_the_schedule_flag_is_warned_about(fresh_options, monkeypatch, caplog):
    # the suite's 8 simulated devices (conftest); the flag is what keeps their collectives from deadlocking
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    with caplog.at_level(logging.WARNING, logger=xla_options.__name__):
        xla_options.compiler_options()
    assert xla_options.SCHEDULE_FLAG in caplog.text and "deadlock" in caplog.text
    xla_options.compiler_options.cache_clear()
    caplog.clear()
    monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {xla_options.SCHEDULE_FLAG}")
    with caplog.at_level(logging.WARNING, logger=xla_options.__name__):
        xla_options.compiler_options()
    assert "deadlock" not in caplog.text


def test_one_device_under_the_default_schedule_is_warned_about(fresh_options, monkeypatch, caplog):
    # one device: no deadlock, but a gradient program's recomputed layers all live at once
    monkeypatch.setattr(xla_options.jax, "device_count", lambda: 1)
    for flags, warned in [("", True), (xla_options.SCHEDULE_FLAG, False),
                          ("--xla_cpu_enable_concurrency_optimized_scheduler=true", False)]:  # the user's choice
        monkeypatch.setenv("XLA_FLAGS", flags)
        xla_options.compiler_options.cache_clear()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=xla_options.__name__):
            xla_options.compiler_options()
        assert ("keep_host_buffers" in caplog.text) == warned, flags
        assert "deadlock" not in caplog.text


_SCHEDULE_SCRIPT = """
import json
from deepmoe.backend.xla_options import use_memory_ordered_schedule
status = use_memory_ordered_schedule()
import jax, jax.numpy as jnp
def f(x, w):  # eight independent dot operands of 4 MiB (sin(x * k), materialised whole), one product each
    return sum(jnp.sin(x * (k + 1)) @ w for k in range(8))
x, w = jax.ShapeDtypeStruct((1024, 1024), jnp.float32), jax.ShapeDtypeStruct((1024, 8), jnp.float32)
temp = jax.jit(f).lower(x, w).compile().memory_analysis().temp_size_in_bytes
print(json.dumps({"status": status, "temp": temp}))
"""


def _schedule_run(xla_flags: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", **({"XLA_FLAGS": xla_flags} if xla_flags is not None else {}))
    out = subprocess.run([sys.executable, "-c", _SCHEDULE_SCRIPT], env=env, capture_output=True, text=True,
                         check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_memory_ordered_schedule_reaches_a_fresh_process():
    operand = 1024 * 1024 * 4
    ours = _schedule_run(None)
    users = _schedule_run("--xla_cpu_enable_concurrency_optimized_scheduler=true")  # XLA's default, said aloud
    assert ours["status"] == "on" and users["status"] == "as set in XLA_FLAGS"
    # one operand live at a time (plus the small products), against several at once under XLA's default
    assert operand <= ours["temp"] < 2 * operand
    assert users["temp"] >= 2 * ours["temp"]


def test_memory_ordered_schedule_is_not_applied_after_the_backend_starts(monkeypatch):
    jax.devices()  # the test process's backend is up
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert "already started" in xla_options.use_memory_ordered_schedule()
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"


def test_env_switch_gives_xla_defaults(fresh_options, monkeypatch):
    monkeypatch.setenv("DEEPMOE_XLA_OPTIONS", "0")
    assert xla_options.compiler_options() is None
