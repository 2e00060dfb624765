"""Mesh-bound MoE strategies on 8 simulated CPU devices, against the single-device dropless `sorted` strategy:
ep_all_to_all (dropless and with a capacity that drops), ep_ragged through its emulated collective, tokens
split over the expert axis when the batch is not, and the dropped-copy counts; with the Pallas grouped matmul
inside the shard_map too."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepmoe as dm
from deepmoe.moe_dispatch import MoEStrategy, bind, run_experts
from deepmoe.moe_dispatch.ep_ragged import receive_rows
from deepmoe.moe_dispatch.sort_ragged import run as run_sorted
from deepmoe.sharding import ShardingError, ShardingRules, make_mesh

CFG = dm.preset("tiny").replace(compute_dtype="float32")  # 8 experts, top-2, D=64, I=32
B, T = 8, 12


@pytest.fixture(scope="module")
def moe_inputs():
    keys = jax.random.split(jax.random.key(7), 5)
    e, d, i, k = CFG.num_experts, CFG.hidden_size, CFG.expert_hidden_dim, CFG.experts_per_token
    params = {"w_gate": 0.1 * jax.random.normal(keys[0], (e, d, i)),
              "w_up": 0.1 * jax.random.normal(keys[1], (e, d, i)),
              "w_down": 0.1 * jax.random.normal(keys[2], (e, i, d))}
    x = jax.random.normal(keys[3], (B, T, d))
    # Skewed routing (experts 0 and 1 popular) so that small capacities really drop copies.
    logits = jax.random.normal(keys[4], (B, T, e)) + jnp.array([2.0, 1.5] + [0.0] * (e - 2))
    _, ids = jax.lax.top_k(logits, k)
    weights = jax.random.uniform(keys[4], (B, T, k), minval=0.5, maxval=1.5)
    return params, x, ids.astype(jnp.int32), weights


def _run(strategy, mesh, rules, inputs):
    params, x, ids, weights = inputs
    bound = bind(strategy, mesh, rules)
    return jax.jit(lambda p, x, i, w: bound.run(p, CFG, x, i, w, return_extras=True))(params, x, ids, weights)


def _expected_a2a_drops(ids, shards, capacity):
    """Kept mask [B, T, K] for ep_all_to_all: per source shard (contiguous rows of the batch), the first
    `capacity` copies of each expert in (token, k) order are kept."""
    ids = np.asarray(ids)
    keep = np.ones(ids.shape, bool)
    for rows in np.split(np.arange(ids.shape[0]), shards):
        seen = {}
        for b in rows:
            for t in range(ids.shape[1]):
                for j, e in enumerate(ids[b, t]):
                    seen[e] = seen.get(e, 0) + 1
                    keep[b, t, j] = seen[e] <= capacity
    return keep


def _expected_ragged_drops(ids, shards, expert_size, buffer_rows):
    """Kept mask for ep_ragged with a bounded receive buffer: receiver j accepts rows in (local expert,
    source) order, each source's rows of an expert in (token, k) order, until its buffer is full."""
    ids = np.asarray(ids)
    e = CFG.num_experts
    local = e // expert_size
    row_groups = np.split(np.arange(ids.shape[0]), shards)
    keep = np.zeros(ids.shape, bool)
    for j in range(expert_size):
        room = buffer_rows
        for expert in range(j * local, (j + 1) * local):
            for rows in row_groups:
                for b in rows:
                    for t in range(ids.shape[1]):
                        for slot in np.nonzero(ids[b, t] == expert)[0]:
                            if room > 0:
                                keep[b, t, slot], room = True, room - 1
    return keep


MESHES = {
    "data2_expert4": (dict(data=2, expert=4), ShardingRules()),
    "expert4_tensor2": (dict(expert=4, tensor=2), ShardingRules()),
    # batch not over the expert axis: each expert rank dispatches a quarter of the (replicated) tokens
    "split_tokens": (dict(data=2, expert=4), ShardingRules(batch=("data",))),
}


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
@pytest.mark.parametrize("strategy", ["ep_all_to_all", MoEStrategy("ep_ragged", collective="emulated"), "sorted"],
                         ids=["ep_all_to_all", "ep_ragged_emulated", "sorted"])
def test_dropless_matches_single_device(moe_inputs, mesh_name, strategy):
    shape, rules = MESHES[mesh_name]
    params, x, ids, weights = moe_inputs
    y, extras = _run(strategy, make_mesh(**shape), rules, moe_inputs)
    ref = run_sorted(params, CFG, x, ids, weights)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))
    assert float(extras["dropped_tokens"]) == 0


@pytest.mark.parametrize("strategy", [MoEStrategy("ep_ragged", collective="emulated"), "sorted"],
                         ids=["ep_ragged_emulated", "sorted"])
def test_grouped_matmul_kernel_inside_shard_map(moe_inputs, strategy):
    """kernels="pallas": the per-device grouped matmuls run the Pallas gmm kernel (interpreted here) inside the
    strategy's shard_map, which then does not check varying axes; values and routing-weight gradients as the
    single-device run."""
    params, x, ids, weights = moe_inputs
    bound = bind(strategy, make_mesh(data=2, expert=4), ShardingRules())
    cfg = CFG.replace(kernels="pallas")
    loss = lambda run, c: lambda w: jnp.sum(jnp.sin(run(params, c, x, ids, w)))
    assert "pallas_call" in str(jax.make_jaxpr(loss(bound.run, cfg))(weights))
    got, grad = jax.jit(jax.value_and_grad(loss(bound.run, cfg)))(weights)
    want, want_grad = jax.value_and_grad(loss(run_sorted, CFG))(weights)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(want_grad), rtol=1e-4, atol=1e-5)


def test_all_to_all_capacity_drops_exactly_the_overflow(moe_inputs):
    params, x, ids, weights = moe_inputs
    mesh = make_mesh(data=2, expert=4)  # batch over data x expert: 8 shards of one sequence each
    factor = 0.5
    capacity = math.ceil(factor * T * CFG.experts_per_token / CFG.num_experts)
    y, extras = _run(MoEStrategy("ep_all_to_all", capacity_factor=factor), mesh, ShardingRules(), moe_inputs)
    keep = _expected_a2a_drops(ids, 8, capacity)
    assert 0 < (~keep).sum() == int(extras["dropped_tokens"])
    ref = run_sorted(params, CFG, x, ids, jnp.where(keep, weights, 0.0))
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))


def test_ragged_bounded_buffer_drops_exactly_the_overflow(moe_inputs):
    params, x, ids, weights = moe_inputs
    mesh = make_mesh(data=2, expert=4)
    factor = 0.6
    rows = receive_rows(T, CFG, 4, factor)
    y, extras = _run(MoEStrategy("ep_ragged", capacity_factor=factor, collective="emulated"), mesh,
                     ShardingRules(), moe_inputs)
    # the expert axis is the minor batch axis: data rank r, expert rank j holds row 4r + j; receiver j
    # serves the 4 sources of its data rank
    keep = np.concatenate([_expected_ragged_drops(ids[4 * r:4 * r + 4], 4, 4, rows) for r in range(2)])
    assert 0 < (~keep).sum() == int(extras["dropped_tokens"])
    ref = run_sorted(params, CFG, x, ids, jnp.where(keep, weights, 0.0))
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))


def test_ep_gradients_match_sorted(moe_inputs):
    """d(loss)/d(expert weights, x, routing weights) through both all_to_alls equals the single-device one."""
    params, x, ids, weights = moe_inputs
    bound = bind("ep_all_to_all", make_mesh(expert=4, tensor=2), ShardingRules())

    def loss(run):
        return lambda p, x, w: jnp.sum(jnp.sin(run(p, CFG, x, ids, w)))

    got = jax.jit(jax.grad(loss(bound.run), argnums=(0, 1, 2)))(params, x, weights)
    want = jax.grad(loss(run_sorted), argnums=(0, 1, 2))(params, x, weights)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5 * float(jnp.abs(r).max()))


def test_ragged_refused_on_cpu():
    with pytest.raises(ShardingError, match="ragged_all_to_all.*XLA:CPU.*ep_all_to_all"):
        bind("ep_ragged", make_mesh(data=2, expert=4), ShardingRules())


def test_auto_picks_per_platform():
    assert bind("auto", make_mesh(data=2, expert=4)).name == "ep_all_to_all"  # CPU: fixed-capacity all_to_all
    assert bind("auto", make_mesh(data=8)).name == "sorted"  # no expert axis: local dropless sort


def test_ep_strategy_needs_a_mesh(moe_inputs):
    params, x, ids, weights = moe_inputs
    with pytest.raises(ValueError, match="pass mesh= to forward"):
        run_experts("ep_all_to_all", params, CFG, x, ids, weights)


def test_ragged_native_lowers_to_ragged_all_to_all(moe_inputs):
    """The GPU/TPU path: forward and backward lower to two ragged-all-to-alls each (XLA:CPU cannot compile
    them, which is why bind refuses the strategy on CPU)."""
    from deepmoe.moe_dispatch.ep_all_to_all import MeshStrategy

    params, x, ids, weights = moe_inputs
    strategy = MeshStrategy("ep_ragged", make_mesh(data=2, expert=4), ShardingRules())
    forward = jax.jit(lambda p, x, w: strategy.run(p, CFG, x, ids, w)).lower(params, x, weights).as_text()
    assert forward.count("@ragged_all_to_all") == 2
    grad = jax.jit(jax.grad(lambda p, x, w: strategy.run(p, CFG, x, ids, w).sum(), argnums=(0, 1, 2)))
    assert grad.lower(params, x, weights).as_text().count("@ragged_all_to_all") >= 4
