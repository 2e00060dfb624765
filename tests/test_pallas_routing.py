"""Routing kernel (interpreted Pallas) vs the jnp reference, and the reference vs a numpy oracle."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")


import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from pallas_kernels import route, route_reference  # noqa: E402

CASES = [  # (tokens, experts, top_k, block_tokens): blocks that do not divide T, k == E, E not a power of 2
    (37, 10, 3, 16),
    (9, 8, 8, 128),
]


def _inputs(t, e, seed=0, ties=False):
    k1, k2 = jax.random.split(jax.random.key(seed))
    logits = jax.random.normal(k1, (t, e)) * 2
    if ties:  # integer logits and bias: many exactly equal biased scores
        logits = jnp.round(logits)
        return logits, jnp.zeros((e,))
    return logits, jax.random.normal(k2, (e,)) * 0.3


def _numpy_route(logits, bias, k, scale):
    logits, bias = np.asarray(logits, np.float64), np.asarray(bias, np.float64)
    scores = np.sqrt(np.logaddexp(logits, 0.0))
    biased = scores + bias
    # descending score, ties -> lower expert id (np.lexsort sorts by the last key first)
    idx = np.stack([np.lexsort((np.arange(len(r)), -r))[:k] for r in biased])
    picked = np.take_along_axis(scores, idx, 1)
    weights = picked / picked.sum(1, keepdims=True) * scale
    flat = idx.reshape(-1)
    sort_idx = np.argsort(flat, kind="stable")
    return scores, weights, idx, sort_idx, np.bincount(flat, minlength=logits.shape[1]), np.argsort(sort_idx)


@pytest.mark.parametrize("t,e,k,block", CASES)
def test_route_pallas_matches_reference(t, e, k, block):
    logits, bias = _inputs(t, e)
    pallas = jax.jit(lambda l, b: route(l, b, top_k=k, routed_scaling_factor=1.5, block_tokens=block,
                                        impl="pallas", interpret=True))(logits, bias)
    ref = jax.jit(lambda l, b: route_reference(l, b, top_k=k, routed_scaling_factor=1.5))(logits, bias)
    for name, a, b in zip(ref._fields, pallas, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6, err_msg=name)


def test_route_ties_follow_lax_top_k():
    logits, bias = _inputs(33, 12, seed=3, ties=True)
    pallas = jax.jit(lambda l, b: route(l, b, top_k=4, block_tokens=16, impl="pallas", interpret=True))(logits, bias)
    ref = jax.jit(lambda l, b: route_reference(l, b, top_k=4))(logits, bias)
    np.testing.assert_array_equal(pallas.expert_idx, ref.expert_idx)
    np.testing.assert_array_equal(pallas.sort_idx, ref.sort_idx)


def test_route_gradients_match_reference():
    t, e, k = 21, 10, 3
    logits, bias = _inputs(t, e, seed=1)
    ct = jax.random.normal(jax.random.key(7), (t, k)), jax.random.normal(jax.random.key(8), (t, e))

    def grads(impl):
        def f(l, b):
            out = route(l, b, top_k=k, routed_scaling_factor=2.5, block_tokens=8, impl=impl, interpret=True)
            return out.weights, out.scores

        return jax.vjp(f, logits, bias)[1](ct)

    for a, b in zip(jax.jit(lambda: grads("pallas"))(), jax.jit(lambda: grads("reference"))()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ties", [False, True])
def test_route_reference_matches_numpy(ties):
    logits, bias = _inputs(40, 10, seed=2, ties=ties)
    ref = route_reference(logits, bias, top_k=3, routed_scaling_factor=1.5)
    for name, a, b in zip(ref._fields, ref, _numpy_route(logits, bias, 3, 1.5)):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6, err_msg=name)


def test_route_permutation_is_consistent():
    logits, bias = _inputs(37, 10, seed=4)
    r = jax.jit(lambda l, b: route(l, b, top_k=3, block_tokens=16, impl="pallas", interpret=True))(logits, bias)
    experts_sorted = r.expert_idx.reshape(-1)[r.sort_idx]
    assert np.all(np.diff(np.asarray(experts_sorted)) >= 0)
    np.testing.assert_array_equal(np.asarray(r.sort_idx)[np.asarray(r.inverse_idx)], np.arange(37 * 3))
    np.testing.assert_array_equal(np.bincount(experts_sorted, minlength=10), r.group_sizes)
