"""Window + sink attention: Pallas (interpreted) and the blocked reference vs the naive dense oracle."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import functools  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

from pallas_kernels import window_attention, window_attention_dense  # noqa: E402

CASES = [  # (B, T, H, D, window, block_q, block_k, packed): T not a multiple of window or of the tiles
    (2, 37, 3, 24, 8, 4, 8, True),
    (1, 20, 2, 8, 1, 8, 4, False),  # only the token itself
    (1, 11, 4, 32, 64, 16, 8, True),  # window longer than the sequence
]


def _inputs(b, t, h, d, packed, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, t, h, d))
    kv = jax.random.normal(ks[1], (b, t, d))
    sinks = jax.random.normal(ks[2], (h,))
    do = jax.random.normal(ks[3], (b, t, h, d))
    seg = (jnp.arange(t)[None] >= (t * 2) // 3).astype(jnp.int32) + jnp.arange(b)[:, None] if packed else None
    return q, kv, sinks, do, seg


def _value_and_grads(f, q, kv, sinks, do):
    out, vjp = jax.vjp(f, q, kv, sinks)
    return (out, *vjp(do))


@pytest.mark.parametrize("b,t,h,d,window,bq,bk,packed", CASES)
def test_window_attention_matches_dense(b, t, h, d, window, bq, bk, packed):
    q, kv, sinks, do, seg = _inputs(b, t, h, d, packed)
    dense = functools.partial(window_attention_dense, window=window, segment_ids=seg)
    kernels = {
        "pallas": functools.partial(window_attention, window=window, segment_ids=seg, block_q=bq, block_k=bk,
                                    impl="pallas", interpret=True),
        "reference": functools.partial(window_attention, window=window, segment_ids=seg, impl="reference"),
    }
    expected = jax.jit(functools.partial(_value_and_grads, dense))(q, kv, sinks, do)
    for impl, f in kernels.items():
        got = jax.jit(functools.partial(_value_and_grads, f))(q, kv, sinks, do)
        for name, a, e in zip(("out", "dq", "dkv", "dsinks"), got, expected):
            np.testing.assert_allclose(a, e, rtol=2e-5, atol=2e-5, err_msg=f"{impl} {name}")


def test_window_attention_bf16_close_to_fp32_oracle():
    q, kv, sinks, _, _ = _inputs(1, 24, 2, 16, False, seed=1)
    f = jax.jit(lambda q, kv, s: window_attention(q, kv, s, window=8, block_q=4, block_k=8, impl="pallas",
                                                  interpret=True))
    got = f(q.astype(jnp.bfloat16), kv.astype(jnp.bfloat16), sinks)
    assert got.dtype == jnp.bfloat16
    expected = jax.jit(functools.partial(window_attention_dense, window=8))(q, kv, sinks)
    np.testing.assert_allclose(np.float32(got), expected, atol=5e-2)


def test_window_attention_in_shard_map():
    if jax.device_count() < 4:
        pytest.skip("needs 4 (simulated) devices")
    mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Explicit,), devices=jax.devices()[:4])
    q, kv, sinks, do, seg = _inputs(4, 19, 2, 16, True, seed=2)
    # Explicit axes: shard_map checks in_specs against the arguments' shardings, so place them first.
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
    args = put(q, P("data")), put(kv, P("data")), put(sinks, P()), put(seg, P("data")), put(do, P("data"))
    kernel = functools.partial(window_attention, window=6, block_q=4, block_k=8, impl="pallas", interpret=True)
    sharded = jax.shard_map(
        lambda q, kv, s, seg: kernel(q, kv, s, segment_ids=seg), mesh=mesh,
        in_specs=(P("data"), P("data"), P(), P("data")), out_specs=P("data"), check_vma=False)

    @jax.jit
    def run(q, kv, s, seg, do):
        return _value_and_grads(lambda *a: sharded(*a, seg), q, kv, s, do)

    got = run(*args)
    assert got[0].sharding.spec[0] == "data"
    dense = functools.partial(window_attention_dense, window=6, segment_ids=seg)
    expected = jax.jit(functools.partial(_value_and_grads, dense))(q, kv, sinks, do)
    for a, e in zip(got, expected):
        np.testing.assert_allclose(a, e, rtol=2e-5, atol=2e-5)
