"""The blocked MoE (CPU default) equals the dense reference in values and in every gradient, whatever the
routing: balanced, one expert taking every copy (the most padding), experts left empty, blocks that straddle;
whatever the split between the batched lanes and the overflow loop (all copies in the loop, lanes so short
that most copies overflow, the default); over per-expert weight arrays (the inference layout) too, and every
strategy accepts those. The loop's static block count covers every possible routing (brute force). Rows are
written to distinct slots, so their writes differentiate as plain scatters. The sorted MoE on the Pallas grouped
matmul (GPU default with Pallas kernels; interpreted here) equals it too."""

import functools
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepmoe as dm
from deepmoe.moe_dispatch import blocked, dense, run_experts

CFG = dm.preset("tiny").replace(compute_dtype="float32", num_experts=6, experts_per_token=2)


def _routing(kind: str, b: int, t: int, rng: np.random.Generator) -> np.ndarray:
    e, k = CFG.num_experts, CFG.experts_per_token
    if kind == "balanced":
        return np.stack([rng.permutation(e)[:k] for _ in range(b * t)]).reshape(b, t, k)
    if kind == "skewed":  # expert 0 in every token, experts 3..5 never chosen
        return np.stack([[0, 1 + rng.integers(2)] for _ in range(b * t)]).reshape(b, t, k)
    raise ValueError(kind)


def _experts_and_input(seed: int, b: int, t: int, scale: float) -> tuple[dict, jax.Array]:
    """Random routed-expert stacks (entries ~ N(0, scale^2)) and an input x [b, t, D]."""
    keys = jax.random.split(jax.random.key(seed), 4)
    d, i, e = CFG.hidden_size, CFG.expert_hidden_dim, CFG.num_experts
    params = {"w_gate": jax.random.normal(keys[0], (e, d, i)) * scale,
              "w_up": jax.random.normal(keys[1], (e, d, i)) * scale,
              "w_down": jax.random.normal(keys[2], (e, i, d)) * scale}
    return params, jax.random.normal(keys[3], (b, t, d))


@pytest.mark.parametrize("lanes", [0, 8, None])
@pytest.mark.parametrize("kind", ["balanced", "skewed"])
@pytest.mark.parametrize("b, t", [(1, 5), (2, 37)])
def test_values_and_gradients_match_dense(kind, b, t, lanes):
    rng = np.random.default_rng(b * 100 + t)
    params, x = _experts_and_input(t, b, t, 0.3)
    expert_ids = jnp.asarray(_routing(kind, b, t, rng), jnp.int32)
    weights = jnp.asarray(rng.uniform(0.1, 1.0, expert_ids.shape), jnp.float32)

    def run(strategy, **options):
        fn = lambda p, x, w: strategy.run(p, CFG, x, expert_ids, w, **options)
        out, vjp = jax.vjp(jax.jit(fn), params, x, weights)
        return out, vjp(jnp.asarray(rng_out, jnp.float32))

    rng_out = np.random.default_rng(0).normal(size=x.shape)
    (ref, ref_grads), (got, got_grads) = run(dense), run(blocked, lanes=lanes)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
    for g, r in zip(jax.tree.leaves(got_grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-4)
    if kind == "skewed":  # unchosen experts get exactly zero gradient
        assert not np.asarray(got_grads[0]["w_up"][3:]).any()


@pytest.mark.parametrize("kind", ["balanced", "skewed"])
def test_sorted_on_the_pallas_grouped_matmul_matches_dense(kind):
    """kernels="pallas": `sorted` multiplies through pallas_kernels.gmm (its custom VJP in the gradients), not
    lax.ragged_dot; values and every gradient as the dense reference, empty experts included."""
    rng = np.random.default_rng(3)
    params, x = _experts_and_input(9, 2, 37, 0.3)
    expert_ids = jnp.asarray(_routing(kind, 2, 37, rng), jnp.int32)
    weights = jnp.asarray(rng.uniform(0.1, 1.0, expert_ids.shape), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

    def run(strategy, cfg):
        fn = lambda p, x, w: run_experts(strategy, p, cfg, x, expert_ids, w)
        out, vjp = jax.vjp(fn, params, x, weights)
        return out, vjp(cotangent), str(jax.make_jaxpr(lambda *a: jax.vjp(fn, *a)[1](cotangent))(params, x, weights))

    ref, ref_grads, _ = run("dense", CFG)
    got, got_grads, program = run("sorted", CFG.replace(kernels="pallas"))
    assert "pallas_call" in program and "ragged_dot" not in program
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
    for g, r in zip(jax.tree.leaves(got_grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-4)


@functools.cache
def _most_blocks(copies: int, experts: int, lane: int, block: int) -> int:
    """max over group sizes n_1..n_E >= 0 summing to `copies` of sum_e ceil(max(n_e - lane, 0) / block)."""
    if experts == 0:
        return 0 if copies == 0 else -1  # -1: copies left over, not a valid split
    best = -1
    for n in range(copies + 1):
        rest = _most_blocks(copies - n, experts - 1, lane, block)
        if rest >= 0:
            best = max(best, rest + -(-max(n - lane, 0) // block))
    return best


def test_static_block_count_covers_every_routing():
    for copies, experts, lane, block in itertools.product([1, 7, 16, 33, 40], [1, 3, 6], [0, 8, 24], [8, 16]):
        bound = blocked.num_blocks(copies, experts, lane, block)
        assert bound >= _most_blocks(copies, experts, lane, block), (copies, experts, lane, block)


def test_lanes_hold_an_average_share_and_a_quarter():
    for copies, experts in [(1024, 16), (1024, 8), (64, 16), (5, 6)]:
        lane = blocked.lane_rows(copies, experts)
        assert lane % 8 == 0 and lane >= 1.25 * copies / experts > lane - 8


def test_blocks_past_the_used_count_are_not_multiplied():
    """Only blocks holding copies go through an expert: the loop's trip count is the number of used blocks.
    Identity-like experts (silu(x) * x on the ones input) make each block's output name its expert."""
    x = jnp.ones((4, 2, 3))
    eye = jnp.eye(3)
    w_gate = jnp.stack([eye, eye])
    w_down = jnp.stack([eye, 2 * eye])
    out = blocked.expert_ffn(10.0, x, jnp.ones((4, 2)), w_gate, w_gate, w_down, jnp.array([0, 1, 1, 1]), jnp.int32(2))
    silu_one = 1 / (1 + np.exp(-1.0))
    np.testing.assert_allclose(np.asarray(out[:, 0, 0]), [silu_one, 2 * silu_one, 0.0, 0.0], rtol=1e-6)


@pytest.mark.parametrize("lanes", [0, 8, None])
def test_rows_are_written_to_distinct_slots(lanes):
    """Every row written into the lanes or the loop's blocks has a slot of its own (the rows a buffer does not
    take too, past its end), so JAX differentiates the writes as plain scatters. Writes that may repeat an index
    would differentiate through a scatter of unsigned ids, one per element, to find which write won."""
    rng = np.random.default_rng(3)
    params, x = _experts_and_input(3, 1, 37, 0.3)
    expert_ids = jnp.asarray(_routing("skewed", 1, 37, rng), jnp.int32)  # lanes overflow into the loop
    weights = jnp.ones(expert_ids.shape, jnp.float32)
    loss = lambda p, x, w: blocked.run(p, CFG, x, expert_ids, w, lanes=lanes).sum()
    jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(params, x, weights))
    scattered = re.findall(r"\w+:(\w+)\[[\d,]*\] = scatter\b", jaxpr)
    assert "f32" in scattered  # the rows' writes themselves
    assert not [dtype for dtype in scattered if dtype.startswith("u")], scattered


@pytest.mark.parametrize("kind", ["balanced", "skewed"])
def test_per_expert_arrays_match_dense(kind):
    """params.unstack_layers holds the routed experts as one array each: blocked switches between them, gather
    too, the other strategies stack them back; all give the dense reference over the stacks."""
    rng = np.random.default_rng(7)
    params, x = _experts_and_input(3, 2, 37, 0.3)
    per_expert = {name: tuple(w) for name, w in params.items()}
    expert_ids = jnp.asarray(_routing(kind, 2, 37, rng), jnp.int32)
    weights = jnp.asarray(rng.uniform(0.1, 1.0, expert_ids.shape), jnp.float32)
    ref = np.asarray(jax.jit(dense.run, static_argnums=1)(params, CFG, x, expert_ids, weights))
    for strategy in ("blocked", "gather", "sorted", "dense", "auto"):
        got = jax.jit(lambda p, x, w: run_experts(strategy, p, CFG, x, expert_ids, w))(per_expert, x, weights)
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5, err_msg=strategy)


@pytest.mark.parametrize("lanes", [0, 8, None])
def test_bfloat16_compute_stays_near_the_float32_reference(lanes):
    """bf16 matmuls with fp32 accumulation in the lanes and in the loop: within bf16 rounding of fp32 dense."""
    rng = np.random.default_rng(11)
    params, x = _experts_and_input(5, 2, 37, 0.1)
    expert_ids = jnp.asarray(_routing("balanced", 2, 37, rng), jnp.int32)
    weights = jnp.asarray(rng.uniform(0.1, 1.0, expert_ids.shape), jnp.float32)
    ref = np.asarray(dense.run(params, CFG, x, expert_ids, weights))
    got = blocked.run(params, CFG.replace(compute_dtype="bfloat16"), x, expert_ids, weights, lanes=lanes)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), ref, rtol=0.05, atol=0.05 * np.abs(ref).max())
