"""Lightning indexer: Pallas scores / streaming top-k (interpreted) vs the jnp reference and a numpy oracle."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import functools  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from pallas_kernels import indexer_scores, indexer_topk  # noqa: E402
from pallas_kernels.indexer import indexer_scores_reference  # noqa: E402


def _inputs(b, t, heads, d, ratio, seed=0, packed=False):
    n = t // ratio
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (b, t, heads, d))
    w = jax.random.normal(ks[1], (b, t, heads))
    k = jax.random.normal(ks[2], (b, n, d))
    end_idx = jnp.broadcast_to((jnp.arange(n) + 1) * ratio - 1, (b, n)).astype(jnp.int32)
    kwargs = {}
    if packed:
        kwargs = dict(segment_ids=(jnp.arange(t)[None] >= t // 2).astype(jnp.int32).repeat(b, 0),
                      entry_segment_ids=(end_idx >= t // 2).astype(jnp.int32))
    return q, w, k, end_idx, kwargs


def _numpy_scores(q, w, k, end_idx, seg=None, eseg=None):
    q, w, k = (np.asarray(x, np.float64) for x in (q, w, k))
    dots = np.maximum(np.einsum("bthd,bnd->bthn", q, k), 0)
    scores = np.einsum("bth,bthn->btn", w, dots) * q.shape[-1] ** -0.5
    vis = np.asarray(end_idx)[:, None, :] <= np.arange(q.shape[1])[None, :, None]
    if seg is not None:
        vis &= np.asarray(seg)[:, :, None] == np.asarray(eseg)[:, None, :]
    return np.where(vis, scores, -np.inf)


def test_scores_match_numpy_and_reference():
    q, w, k, end_idx, kw = _inputs(2, 37, 3, 16, 4, packed=True)
    expected = _numpy_scores(q, w, k, end_idx, kw.get("segment_ids"), kw.get("entry_segment_ids"))
    got = jax.jit(functools.partial(indexer_scores, **kw, block_q=8, block_n=4, impl="pallas", interpret=True))(
        q, w, k, end_idx)
    ref = jax.jit(functools.partial(indexer_scores, **kw, impl="reference"))(q, w, k, end_idx)
    for a in (got, ref):
        assert np.array_equal(np.isinf(a), np.isinf(expected))
        np.testing.assert_allclose(np.where(np.isinf(expected), 0, a), np.where(np.isinf(expected), 0, expected),
                                   rtol=1e-5, atol=1e-5)


def test_scores_gradients_match_reference():
    q, w, k, end_idx, _ = _inputs(1, 19, 2, 8, 3, seed=1)
    ct = jax.random.normal(jax.random.key(5), (1, 19, 6))
    ct = jnp.where(jnp.isfinite(jax.jit(indexer_scores_reference)(q, w, k, end_idx)), ct, 0.0)

    def grads(impl):
        f = lambda q, w, k: indexer_scores(q, w, k, end_idx, block_q=8, block_n=4, impl=impl, interpret=True)
        return jax.vjp(f, q, w, k)[1](ct)

    for a, b in zip(jax.jit(lambda: grads("pallas"))(), jax.jit(lambda: grads("reference"))()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("b,t,heads,d,ratio,top_k,block_q,block_n,packed", [
    (2, 37, 3, 16, 4, 5, 8, 4, False),  # tiles not dividing T or N; early queries see fewer than k entries
    (1, 45, 4, 8, 2, 6, 16, 8, True),  # packed documents
    (1, 20, 2, 8, 4, 8, 4, 2, False),  # k > N: trailing slots stay invalid
])
def test_topk_matches_reference(b, t, heads, d, ratio, top_k, block_q, block_n, packed):
    q, w, k, end_idx, kw = _inputs(b, t, heads, d, ratio, seed=2, packed=packed)
    run = jax.jit(functools.partial(indexer_topk, top_k=top_k, block_q=block_q, block_n=block_n, **kw,
                                    impl="pallas", interpret=True))
    idx, valid = run(q, w, k, end_idx)
    ref_idx, ref_valid = jax.jit(functools.partial(indexer_topk, top_k=top_k, **kw, impl="reference"))(q, w, k, end_idx)
    np.testing.assert_array_equal(valid, ref_valid)
    np.testing.assert_array_equal(idx, ref_idx)
    # Independent of tie handling: the selected scores are the top-k scores of the numpy oracle.
    scores = _numpy_scores(q, w, k, end_idx, kw.get("segment_ids"), kw.get("entry_segment_ids"))
    picked = np.where(valid, np.take_along_axis(scores, np.maximum(np.asarray(idx), 0), 2), -np.inf)
    padded = np.concatenate([scores, np.full(scores.shape[:2] + (top_k,), -np.inf)], axis=2)
    best = -np.sort(-padded, axis=2)[..., :top_k]
    np.testing.assert_allclose(np.where(valid, picked, 0), np.where(valid, best, 0), rtol=1e-5, atol=1e-5)
    assert np.array_equal(np.isfinite(best), np.asarray(valid))


def test_topk_ties_prefer_lower_index():
    # One indexer head with w = 0 for half the queries: their scores are all exactly 0 (ties everywhere).
    q, w, k, end_idx, _ = _inputs(1, 32, 1, 8, 2, seed=4)
    w = w.at[:, ::2].set(0.0)
    idx, _ = jax.jit(functools.partial(indexer_topk, top_k=4, block_q=8, block_n=4, impl="pallas",
                                       interpret=True))(q, w, k, end_idx)
    ref_idx, _ = jax.jit(functools.partial(indexer_topk, top_k=4, impl="reference"))(q, w, k, end_idx)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(idx[0, 30], [0, 1, 2, 3])
