"""deepmoe.backend.xla_options: our jit compiles with the CPU options, computes what jax.jit computes, nests
inside other traces, and falls back to XLA's defaults when asked."""

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
    # the tests run on XLA:CPU with 8 simulated devices (conftest), so the mesh options apply too
    assert xla_options.compiler_options() == {**xla_options.CPU_OPTIONS, **xla_options.CPU_MESH_OPTIONS}
    # the option reaches the compiled program: XLA's default hands this reduction to YNNPACK, ours does not
    if "__ynn_fusion" not in jax.jit(_stream_mix).lower(w, x).compile().as_text():
        pytest.skip("this jaxlib no longer gives reductions to YNNPACK: the option may be obsolete")
    assert "__ynn_fusion" not in f.lower(w, x).compile().as_text()


def test_nested_inside_jit_grad_and_eval_shape(fresh_options):
    f = xla_options.jit(lambda x: jnp.sum(jnp.sin(x) ** 2))
    x = jnp.linspace(0.0, 1.0, 8)
    np.testing.assert_allclose(np.asarray(jax.jit(jax.grad(f))(x)), np.sin(2 * np.asarray(x)), rtol=1e-5)
    assert jax.eval_shape(f, x).shape == ()


def test_single_device_process_gets_no_mesh_options(fresh_options, monkeypatch):
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    assert xla_options.compiler_options() == xla_options.CPU_OPTIONS


def test_env_switch_gives_xla_defaults(fresh_options, monkeypatch):
    monkeypatch.setenv("DEEPMOE_XLA_OPTIONS", "0")
    assert xla_options.compiler_options() is None
