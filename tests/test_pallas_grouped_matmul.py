"""Grouped matmul kernel (interpreted Pallas) vs jax.lax.ragged_dot, and ragged_dot vs a numpy loop."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")


import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from pallas_kernels import gmm, gmm_reference  # noqa: E402

CASES = [  # (M, K, N, group sizes, tiling): empty groups, rows past sum(group_sizes), tiles not dividing dims
    (37, 20, 24, (7, 0, 15, 0, 10), (8, 8, 16)),
    (16, 8, 8, (0, 16, 0), (16, 4, 8)),
    (29, 12, 10, (3, 5, 0, 11, 9, 1), (4, 16, 4)),
]


def _inputs(m, k, n, g, dtype=jnp.float32, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    lhs = jax.random.normal(k1, (m, k)).astype(dtype)
    rhs = jax.random.normal(k2, (g, k, n)).astype(dtype)
    return lhs, rhs, jax.random.normal(k3, (m, n)).astype(dtype)


def _value_and_grads(impl, lhs, rhs, sizes, dout, tiling):
    f = lambda a, b: gmm(a, b, sizes, tiling=tiling, impl=impl, interpret=True)
    out, vjp = jax.vjp(f, lhs, rhs)
    return (out, *vjp(dout))


@pytest.mark.parametrize("m,k,n,sizes,tiling", CASES)
def test_gmm_values_and_grads_match_ragged_dot(m, k, n, sizes, tiling):
    lhs, rhs, dout = _inputs(m, k, n, len(sizes))
    sizes = jnp.array(sizes, jnp.int32)
    run = jax.jit(_value_and_grads, static_argnums=(0, 5))
    for name, a, b in zip(("out", "dlhs", "drhs"), run("pallas", lhs, rhs, sizes, dout, tiling),
                          run("reference", lhs, rhs, sizes, dout, tiling)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)


def test_gmm_bf16_accumulates_in_fp32():
    lhs, rhs, dout = _inputs(40, 64, 32, 3, jnp.bfloat16, seed=1)
    sizes = jnp.array([13, 0, 20], jnp.int32)
    run = jax.jit(_value_and_grads, static_argnums=(0, 5))
    for a, b in zip(run("pallas", lhs, rhs, sizes, dout, (16, 16, 16)), run("reference", lhs, rhs, sizes, dout, None)):
        assert a.dtype == b.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=2e-2, atol=5e-2)


def test_ragged_dot_reference_matches_numpy():
    m, k, n, sizes, _ = CASES[0]
    lhs, rhs, _ = _inputs(m, k, n, len(sizes))
    expected = np.zeros((m, n), np.float32)
    start = 0
    for g, size in enumerate(sizes):
        expected[start:start + size] = np.asarray(lhs[start:start + size]) @ np.asarray(rhs[g])
        start += size
    np.testing.assert_allclose(gmm_reference(lhs, rhs, jnp.array(sizes)), expected, rtol=1e-5, atol=1e-5)
