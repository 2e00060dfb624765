"""Window + compressed attention (HCA dense entries, CSA selected entries) vs the naive [T, T+N] oracle."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import functools  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from pallas_kernels import compressed_attention, compressed_attention_dense  # noqa: E402


def _inputs(b, t, h, d, ratio, seed=0):
    n = t // ratio  # only complete compression windows give entries: T need not be a multiple of the ratio
    ks = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(ks[0], (b, t, h, d))
    kv = jax.random.normal(ks[1], (b, t, d))
    sinks = jax.random.normal(ks[2], (h,))
    ckv = jax.random.normal(ks[3], (b, n, d))
    do = jax.random.normal(ks[4], (b, t, h, d))
    end_idx = jnp.broadcast_to((jnp.arange(n) + 1) * ratio - 1, (b, n)).astype(jnp.int32)
    return q, kv, sinks, ckv, do, end_idx, ks[5]


def _selection(key, end_idx, t, k):
    """Random top-k among the visible entries (-1 when fewer are visible), like the indexer's output."""
    b, n = end_idx.shape
    visible = end_idx[:, None, :] <= jnp.arange(t)[None, :, None]
    score = jnp.where(visible, jax.random.uniform(key, (b, t, n)), -1.0)
    vals, idx = jax.lax.top_k(score, k)
    return jnp.where(vals >= 0, idx, -1)


def _value_and_grads(f, q, kv, sinks, ckv, do):
    out, vjp = jax.vjp(f, q, kv, sinks, ckv)
    return (out, *vjp(do))


def _check(kwargs, q, kv, sinks, ckv, do, tiles):
    expected = jax.jit(functools.partial(_value_and_grads, functools.partial(compressed_attention_dense, **kwargs)))(
        q, kv, sinks, ckv, do)
    kernels = {
        "pallas": functools.partial(compressed_attention, **kwargs, **tiles, impl="pallas", interpret=True),
        "reference": functools.partial(compressed_attention, **kwargs, impl="reference"),
    }
    for impl, f in kernels.items():
        got = jax.jit(functools.partial(_value_and_grads, f))(q, kv, sinks, ckv, do)
        for name, a, e in zip(("out", "dq", "dkv", "dsinks", "dckv"), got, expected):
            np.testing.assert_allclose(a, e, rtol=2e-5, atol=2e-5, err_msg=f"{impl} {name}")


def test_hca_matches_dense():
    # Packed documents (segment ids on tokens and entries); T = 37 is not a multiple of the ratio, the window
    # or the tiles.
    q, kv, sinks, ckv, do, end_idx, _ = _inputs(2, 37, 3, 24, 4, seed=1)
    seg = (jnp.arange(37)[None] >= 17).astype(jnp.int32).repeat(2, 0)
    entry_seg = (end_idx >= 17).astype(jnp.int32)
    kwargs = dict(window=8, end_idx=end_idx, segment_ids=seg, entry_segment_ids=entry_seg)
    _check(kwargs, q, kv, sinks, ckv, do, dict(block_q=4, block_k=8))


@pytest.mark.parametrize("b,t,h,d,window,ratio,k,block_n,masked", [
    (2, 37, 3, 24, 8, 4, 5, 2, False),  # k not a multiple of the gather chunk; early queries see < k entries
    (1, 30, 4, 16, 4, 2, 12, 8, True),  # validity mask hiding slots that carry real indices
])
def test_csa_matches_dense(b, t, h, d, window, ratio, k, block_n, masked):
    q, kv, sinks, ckv, do, end_idx, key = _inputs(b, t, h, d, ratio)
    idx = _selection(key, end_idx, t, k)
    kwargs = dict(window=window, topk_idx=idx)
    if masked:
        valid = (idx >= 0) & (jax.random.uniform(jax.random.key(9), idx.shape) < 0.6)
        kwargs = dict(window=window, topk_idx=jnp.where(valid, idx, 3), topk_valid=valid)
    _check(kwargs, q, kv, sinks, ckv, do, dict(block_q=4, block_k=8, block_n=block_n))
