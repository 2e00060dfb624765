"""Every Pallas kernel (forward and backward) lowers for GPU through Triton, checked on a CPU-only host, and so
does a model's train step, without `lax.ragged_dot` (which XLA:GPU expands into E times the work).

Lowering runs the Pallas -> Triton-IR translation in Python (block shapes, indexing, dot operands, atomics);
compiling that IR to PTX needs a GPU and is not covered here. The target is named as an abstract H100: from jax
0.11 the Triton lowering asks the device for its compute capability, and a CPU host has none to give.
"""

import os
import re

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

import deepmoe as dm  # noqa: E402
import pallas_kernels as pk  # noqa: E402
from deepmoe import train  # noqa: E402
from deepmoe.moe_dispatch import local_strategy  # noqa: E402
from deepmoe.moe_dispatch.sort_ragged import grouped_matmul  # noqa: E402
from deepmoe.train.step import build_gradient_fn  # noqa: E402
from pallas_kernels import _common as pk_common  # noqa: E402

SHAPES = {  # (B, T, H, D, window, N, top_k, indexer heads, indexer dim); T not a multiple of the tiles
    "v4_like": (1, 300, 64, 512, 128, 75, 64, 64, 128),
    "odd": (2, 37, 6, 48, 8, 9, 5, 3, 24),  # nothing a power of two: exercises the padding
}


def _zeros(*shape, dtype=jnp.bfloat16):
    return jnp.zeros(shape, dtype)


def _with_grads(f, *args):
    """f and its full VJP in one function, so lowering covers the backward kernels too."""
    def run(*args):
        out, vjp = jax.vjp(f, *args)
        return out, vjp(jax.tree.map(jnp.ones_like, out))
    return run, args


def _cases(shape):
    B, T, H, D, WINDOW, N, TOPK, HI, DI = SHAPES[shape]
    end_idx = jnp.broadcast_to((jnp.arange(N) + 1) * 4 - 1, (B, N)).astype(jnp.int32)
    sel = jnp.zeros((B, T, TOPK), jnp.int32)
    attn = (_zeros(B, T, H, D), _zeros(B, T, D), _zeros(H, dtype=jnp.float32))
    return {
        "route": _with_grads(lambda lg: pk.route(lg, jnp.zeros(N), top_k=min(TOPK, 8), impl="pallas").weights,
                             _zeros(T, N, dtype=jnp.float32)),
        "gmm": _with_grads(lambda a, b: pk.gmm(a, b, jnp.array([T // 3, 0, T // 2, 7], jnp.int32), impl="pallas"),
                           _zeros(T, D), _zeros(4, D, DI)),
        "window": _with_grads(lambda q, kv, s: pk.window_attention(q, kv, s, window=WINDOW, impl="pallas"), *attn),
        "hca": _with_grads(lambda q, kv, s, c: pk.compressed_attention(
            q, kv, s, c, window=WINDOW, end_idx=end_idx, impl="pallas"), *attn, _zeros(B, N, D)),
        "csa": _with_grads(lambda q, kv, s, c: pk.compressed_attention(
            q, kv, s, c, window=WINDOW, topk_idx=sel, impl="pallas"), *attn, _zeros(B, N, D)),
        "indexer_scores": _with_grads(lambda q, w, k: pk.indexer_scores(q, w, k, end_idx, impl="pallas"),
                                      _zeros(B, T, HI, DI), _zeros(B, T, HI, dtype=jnp.float32), _zeros(B, N, DI)),
        "indexer_topk": (lambda q, w, k: pk.indexer_topk(q, w, k, end_idx, top_k=TOPK, impl="pallas"),
                         (_zeros(B, T, HI, DI), _zeros(B, T, HI, dtype=jnp.float32), _zeros(B, N, DI))),
    }


GPU_TARGET = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=jax.sharding.AbstractDevice(
    device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu"))


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("name", list(_cases("odd")))
def test_lowers_to_triton(name, shape):
    f, args = _cases(shape)[name]
    with pk.target_platform("gpu"), jax.sharding.use_abstract_mesh(GPU_TARGET):
        text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text and "mosaic_gpu" not in text


@pytest.mark.parametrize("kernels", ["auto", "reference"])
def test_train_step_lowers_for_gpu_without_ragged_dot(kernels):
    """The single-device train step's gradients for a GPU: the routed experts multiply through the gmm / tgmm
    kernels where Pallas may run (kernels="auto"), as the blocked strategy's dense matmuls where it may not;
    never through lax.ragged_dot."""
    cfg = dm.preset("tiny", kernels=kernels)
    tcfg = train.TrainConfig(optimizer="adamw", batch_size=2, seq_len=64, mtp_weight=0.0, mtp_weight_after_decay=0.0)
    state = jax.eval_shape(lambda key: train.init_state(cfg, tcfg, key), jax.random.key(0))
    batch = {"input_ids": jax.ShapeDtypeStruct((2, 64), jnp.int32)}
    with pk.target_platform("gpu"), jax.sharding.use_abstract_mesh(GPU_TARGET):
        assert local_strategy(cfg) == ("sorted" if kernels == "auto" else "blocked")
        lowered = jax.jit(build_gradient_fn(cfg, tcfg)).trace(state.params, state.step, batch)
        text = lowered.lower(lowering_platforms=("cuda",)).as_text()
    assert "ragged_dot" not in text
    kernel_names = set(re.findall(r'custom_call @__gpu\$xla\.gpu\.triton\(.*name = "(\w+)"', text))
    assert {"gmm", "tgmm"} <= kernel_names if kernels == "auto" else not kernel_names


def test_ragged_dot_on_gpu_warns():
    """An explicit `sorted` without the Pallas kernels, traced for a GPU: a warning names the cost and the fix."""
    cfg = dm.preset("tiny", kernels="reference")
    lhs, rhs = jnp.ones((6, 64)), jnp.ones((cfg.num_experts, 64, 32))
    with pk.target_platform("gpu"), pytest.warns(UserWarning, match=r"8x the FLOPs.*kernels='auto'"):
        grouped_matmul(cfg, lhs, rhs, jnp.full((cfg.num_experts,), 0, jnp.int32).at[0].set(6))


@pytest.mark.parametrize("platform,kernels,expected", [
    ("cpu", "pallas", "blocked"),  # an interpreted grouped matmul would be the slowest choice
    ("tpu", "reference", "sorted"),  # TPU lowers ragged_dot to a grouped matmul
    ("ascend", "auto", "blocked"),  # no Pallas, ragged_dot not known to be grouped
])
def test_local_moe_strategy_elsewhere(platform, kernels, expected):
    with pk.target_platform(platform):
        assert local_strategy(dm.preset("tiny", kernels=kernels)) == expected


@pytest.mark.parametrize("impl,interpret,platform,expected", [
    ("auto", None, "cpu", (False, False)),  # CPU: the jnp reference
    ("auto", True, "cpu", (True, True)),  # explicit interpret: the Pallas kernel, interpreted
    ("pallas", None, "cpu", (True, True)),  # Pallas has no CPU lowering: interpret it
    ("auto", None, "gpu", (True, False)),  # GPU: compiled Triton kernel
    ("auto", None, "tpu", (False, False)),  # TPU lowering unverified: reference unless asked
    ("pallas", None, "tpu", (True, False)),
    ("reference", True, "gpu", (False, False)),
])
def test_dispatch_plan(impl, interpret, platform, expected):
    p = pk_common.plan(impl, interpret, platform)
    assert (p.use_pallas, p.interpret) == expected
    assert (p.compiler_params() is not None) == (platform == "gpu" and not p.interpret)


def test_auto_on_cpu_is_the_reference():
    if jax.default_backend() != "cpu":
        pytest.skip("CPU dispatch only")
    q, kv, s = jnp.ones((1, 5, 2, 8)), jnp.ones((1, 5, 8)), jnp.zeros((2,))
    auto = jax.jit(lambda *a: pk.window_attention(*a, window=3))(q, kv, s)
    assert jnp.array_equal(auto, jax.jit(lambda *a: pk.window_attention_reference(*a, window=3))(q, kv, s))
