"""Sharded forward and gradients on 8 simulated CPU devices equal the single-device run; the compiled programs
communicate the way the design says (expert all-to-all, no gathered routed experts, FSDP gathered per layer);
every misfit raises an error that says what to change."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

import deepmoe as dm
from deepmoe.config import CSA, HCA
from deepmoe.params import layer_segments, param_specs
from deepmoe.sharding import ShardingError, ShardingRules, make_mesh, shard_batch, shard_params

# CSA + hash MoE as an unscanned prefix, then HCA + score MoE scanned twice (so FSDP has a stack to gather
# per layer), MTP on; 3 Sinkhorn iterations keep the compile short. fp32 compute for 1e-5 comparisons.
CFG = dm.preset("tiny").replace(compute_dtype="float32", num_layers=3, layer_types=(CSA, HCA, HCA),
                                sinkhorn_iterations=3)
BATCH, SEQ = 8, 48  # SEQ != expert_hidden_dim, so activation shapes never look like expert weights

MESHES = {
    "data8": dict(data=8),
    "data2_expert4": dict(data=2, expert=4),
    "expert8": dict(expert=8),
    "data2_expert2_tensor2": dict(data=2, expert=2, tensor=2),
    "data4_tensor2": dict(data=4, tensor=2),
    "fsdp2_expert2_tensor2": dict(fsdp=2, expert=2, tensor=2),
}


def _loss_fn(mesh):
    def loss(params, ids):
        out = dm.forward(params, CFG, ids, mesh=mesh)
        logp = jax.nn.log_softmax(out.logits[:, :-1])
        mtp_logp = jax.nn.log_softmax(out.mtp_logits[:, :-2])
        ce = -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], -1))
        mtp_ce = -jnp.mean(jnp.take_along_axis(mtp_logp, ids[:, 2:, None], -1))
        return ce + 0.3 * mtp_ce, out

    return jax.value_and_grad(loss, has_aux=True, allow_int=True)  # tid2eid is an int table: float0 grads


@pytest.fixture(scope="module")
def setup():
    params = dm.init_params(CFG, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (BATCH, SEQ), 0, CFG.vocab_size)
    (loss, out), grads = jax.jit(_loss_fn(None)).lower(params, ids).compile()(params, ids)
    return params, ids, (loss, out, grads)


_RUNS = {}


@pytest.fixture(scope="module")
def sharded_run(setup):
    """Compile once per mesh (shared by the numeric and the HLO tests): (mesh, outputs, compiled HLO text)."""
    params, ids, _ = setup

    def run(name):
        if name not in _RUNS:
            mesh = make_mesh(**MESHES[name])
            placed, placed_ids = shard_params(params, CFG, mesh), shard_batch(ids, mesh)
            compiled = jax.jit(_loss_fn(mesh)).lower(placed, placed_ids).compile()
            _RUNS[name] = (mesh, compiled(placed, placed_ids), compiled.as_text())
        return _RUNS[name]

    return run


def _float_leaves(tree):
    return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
            if x.dtype != jax.dtypes.float0]


@pytest.mark.parametrize("name", list(MESHES))
def test_logits_and_gradients_match_single_device(setup, sharded_run, name):
    _, _, (ref_loss, ref_out, ref_grads) = setup
    _, ((loss, out), grads), _ = sharded_run(name)
    scale = float(jnp.abs(ref_out.logits).max())
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref_out.logits), rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(np.asarray(out.mtp_logits), np.asarray(ref_out.mtp_logits), rtol=0,
                               atol=1e-5 * float(jnp.abs(ref_out.mtp_logits).max()))
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    # Gradients: reductions run in another order on another layout, so compare against the largest gradient
    # (the mHC parameters' gradients are ~1e-6 and are sums of cancelling ~1e-3 terms).
    got, want = _float_leaves(grads), _float_leaves(ref_grads)
    top = max(float(np.abs(np.asarray(g)).max()) for _, g in want)  # numpy: no program per leaf shape
    for (path, g), (_, r) in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=2e-6 * top, err_msg=path)
    assert out.aux["dropped_tokens"].shape == (CFG.num_layers,) and float(out.aux["dropped_tokens"].sum()) == 0
    assert out.aux["mtp_dropped_tokens"].shape == ()


def _all_gather_shapes(hlo: str) -> set[tuple[int, ...]]:
    shapes = set()
    for line in hlo.splitlines():
        m = re.search(r"=\s*\(?\w+\[([\d,]*)\][^=]*?\ball-gather(-start)?\(", line)
        if m:
            shapes.add(tuple(int(d) for d in m.group(1).split(",") if d))
    return shapes


def _routed_expert_shapes():
    shapes = set()
    for seg, seg_specs in zip(layer_segments(CFG), param_specs(CFG)["segments"]):
        for layer in seg_specs:
            for spec in layer["moe"]["experts"].values():
                shapes |= {spec.shape, spec.shape[1:]}  # the stack, and one layer of it
    return shapes


@pytest.mark.parametrize("name", ["data2_expert4", "expert8", "data2_expert2_tensor2", "fsdp2_expert2_tensor2"])
def test_expert_parallel_program_uses_all_to_all(sharded_run, name):
    _, _, hlo = sharded_run(name)
    assert "all-to-all" in hlo
    gathered = _all_gather_shapes(hlo)
    assert gathered, "expected some all-gathers (activations / FSDP) to parse"
    assert not gathered & _routed_expert_shapes(), "routed experts were all-gathered"


def test_fsdp_gathers_one_layer_at_a_time(sharded_run):
    _, _, hlo = sharded_run("fsdp2_expert2_tensor2")
    rules = ShardingRules()
    stacked = set()
    for seg, seg_specs in zip(layer_segments(CFG), param_specs(CFG)["segments"]):
        if seg.repeats < 2:
            continue
        for spec in jax.tree.leaves(seg_specs, is_leaf=lambda s: hasattr(s, "axes")):
            if "fsdp" in jax.tree.leaves(tuple(rules.spec(spec.axes))):
                stacked.add(spec.shape)
    assert stacked
    gathered = _all_gather_shapes(hlo)
    assert not gathered & stacked, "a whole layer stack was gathered"
    one_layer = {(1, *s[1:]) for s in stacked} | {s[1:] for s in stacked}
    assert gathered & one_layer, "no per-layer parameter gather found"


# ----- placement and API ------------------------------------------------------------------------------------

def test_make_mesh_axes_and_exports():
    mesh = dm.make_mesh(data=2, expert=2, tensor=2)
    assert mesh.axis_names == ("data", "fsdp", "expert", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "expert": 2, "tensor": 2}
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    assert dm.shard_params is shard_params and dm.ShardingRules is ShardingRules


def test_shard_params_places_by_logical_axes(setup):
    params, _, _ = setup
    placed = shard_params(params, CFG, make_mesh(fsdp=2, expert=2, tensor=2))
    layer = placed["segments"][1][0]
    assert layer["moe"]["experts"]["w_gate"].sharding.spec == P(None, "expert", "fsdp", "tensor")
    assert layer["moe"]["experts"]["w_down"].sharding.spec == P(None, "expert", "tensor", "fsdp")
    assert layer["attn"]["q_up"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert layer["attn"]["o_group_proj"].sharding.spec == P(None, "tensor", "fsdp", None)
    assert layer["attn"]["kv_proj"].sharding.spec == P(None, "fsdp", None)  # the shared KV head: replicated
    assert placed["segments"][0][0]["attn"]["indexer"]["q_up"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert placed["embed"].sharding.spec == P("tensor", "fsdp")
    shard = layer["moe"]["experts"]["w_gate"].addressable_shards[0].data
    assert shard.shape == (2, CFG.num_experts // 2, CFG.hidden_size // 2, CFG.expert_hidden_dim // 2)


# ----- errors that say what to change -----------------------------------------------------------------------

def test_device_count_mismatch():
    with pytest.raises(ShardingError, match=r"3 positions but there are 8 devices.*product is 8"):
        make_mesh(data=3)
    with pytest.raises(ShardingError, match="positive integer"):
        make_mesh(data=0)


def test_batch_not_divisible(setup):
    params, ids, _ = setup
    with pytest.raises(ShardingError, match=r"batch size 4 is not divisible by the batch mesh axes .*= 8"):
        dm.forward(params, CFG, ids[:4], mesh=make_mesh(data=2, expert=4))


@pytest.mark.parametrize("cfg_changes, mesh, field", [
    (dict(num_experts=4), dict(expert=8), "num_experts"),
    (dict(num_heads=6, output_groups=3), dict(data=2, tensor=4), "num_heads"),
    (dict(num_heads=8, output_groups=2), dict(data=2, tensor=4), "output_groups"),
    (dict(num_heads=8, output_groups=4, indexer_heads=6), dict(data=2, tensor=4), "indexer_heads"),
])
def test_config_not_divisible(setup, cfg_changes, mesh, field):
    cfg = CFG.replace(**cfg_changes)
    with pytest.raises(ShardingError, match=rf"ModelConfig\.{field}=\d+ is not divisible"):
        shard_params(dm.abstract_params(cfg), cfg, make_mesh(**mesh))


def test_leaf_error_names_parameter_dim_and_axis(setup):
    params, _, _ = setup
    with pytest.raises(ShardingError, match=r"parameter segments/\d/\d/\S+: dimension 0 \('layers', size \d\) is "
                                            r"not divisible by mesh axis data \(size 8\)"):
        shard_params(params, CFG, make_mesh(data=8), ShardingRules(layers="data"))


def test_abstract_params_get_shardings():
    mesh = make_mesh(data=2, expert=2, tensor=2)
    placed = shard_params(dm.abstract_params(CFG), CFG, mesh)
    w = placed["segments"][1][0]["moe"]["experts"]["w_up"]
    assert isinstance(w, jax.ShapeDtypeStruct) and w.sharding.spec == P(None, "expert", "fsdp", "tensor")


def test_unknown_logical_axis():
    with pytest.raises(ShardingError, match="unknown logical axis 'bogus'"):
        ShardingRules().spec(("bogus",))


# ----- the train step on a mesh with an expert axis ---------------------------------------------------------

def test_train_step_loss_on_expert_mesh_matches_single_device():
    train = pytest.importorskip("deepmoe.train")
    cfg = dm.preset("tiny").replace(compute_dtype="float32", num_layers=1, layer_types=("swa",), num_hash_layers=0,
                                    sinkhorn_iterations=3, num_mtp_layers=0)
    tcfg = train.TrainConfig(batch_size=8, seq_len=16, optimizer="adamw")
    ids = np.asarray(jax.random.randint(jax.random.key(2), (8, 16), 3, cfg.vocab_size))
    state = train.init_state(cfg, tcfg, jax.random.key(0))
    _, single = train.make_train_step(cfg, tcfg)(state, {"input_ids": jnp.asarray(ids)})
    mesh = make_mesh(data=2, expert=4)
    from deepmoe.train.step import replicate
    from deepmoe.train.step import shard_batch as train_shard_batch

    _, sharded = train.make_train_step(cfg, tcfg, mesh=mesh)(replicate(state, mesh),
                                                           train_shard_batch({"input_ids": ids}, mesh))
    np.testing.assert_allclose(float(sharded["loss"]), float(single["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(sharded["grad_norm"]), float(single["grad_norm"]), rtol=1e-4)
