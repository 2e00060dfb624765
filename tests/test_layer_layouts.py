"""The two parameter layouts: stacked `segments` (scanned per segment) and per-layer `layers` (unrolled).

The stacked layout is the reference: the per-layer forward, its gradients and whole train steps over it must
match it; conversions round-trip exactly; checkpoints of one layout refuse to resume as the other."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepmoe as dm
from deepmoe.config import CSA, HCA, SLIDING
from deepmoe.params import Segment, layer_segments, stack_layers, unstack_layers
from deepmoe.train import TrainConfig, init_state, make_train_step
from deepmoe.train.checkpoint import FORMAT_VERSION, CheckpointError, Checkpointer, check_compatible
from deepmoe.train.step import UNROLL_MAX_LAYERS, layers_scanned

# tiny's widths with a schedule that repeats: one prefix layer, then (CSA, HCA) twice -> a scan of length 2
REPEATING = dm.preset("tiny").replace(num_layers=5, layer_types=(SLIDING,) + (CSA, HCA) * 2)
TCFG = TrainConfig(steps=10, batch_size=2, seq_len=64, lr=3e-3, warmup_steps=2, compute_dtype="float32")


def leaves_close(a, b, rtol, atol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))


def grads_close(got, want):
    """Floating leaves within 1e-4 relative (the two layouts sum in different orders); integer leaves (the hash
    tables' float0 cotangents) skipped."""
    floating = lambda g: g if jnp.issubdtype(g.dtype, jnp.floating) else jnp.zeros(g.shape)  # noqa: E731
    leaves_close(jax.tree.map(floating, got), jax.tree.map(floating, want), rtol=1e-4, atol=1e-7)


@pytest.fixture(scope="module")
def setup():
    cfg = REPEATING.replace(param_dtype="float32", compute_dtype="float32")
    assert [s.repeats for s in layer_segments(cfg)] == [1, 2]
    params = dm.init_params(cfg, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (2, 64), 3, cfg.vocab_size)
    return cfg, params, ids


def test_conversions_round_trip(setup):
    cfg, params, _ = setup
    for split in (False, True):
        per_layer = unstack_layers(params, cfg, split_experts=split)
        assert len(per_layer["layers"]) == cfg.num_layers and "segments" not in per_layer
        back = stack_layers(per_layer, cfg)
        assert jax.tree.structure(back) == jax.tree.structure(params)
        for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # per-layer params split later equal the slices of the stacks: layer 3 = repeat 1, position 0 of segment 1
    split = unstack_layers(unstack_layers(params, cfg, split_experts=False), cfg, split_experts=True)
    w = split["layers"][3]["moe"]["experts"]["w_up"]
    assert isinstance(w, tuple) and len(w) == cfg.num_experts
    stacked = params["segments"][1][0]["moe"]["experts"]["w_up"]
    np.testing.assert_array_equal(np.asarray(w[2]), np.asarray(stacked[1, 2]))
    assert stack_layers(params, cfg) is params


def test_per_layer_forward_matches_the_scan(setup):
    cfg, params, ids = setup
    want = dm.forward(params, cfg, ids)
    got = dm.forward(unstack_layers(params, cfg, split_experts=False), cfg, ids)
    leaves_close(dataclasses.asdict(got), dataclasses.asdict(want), rtol=1e-5, atol=1e-6)  # logits, MTP, aux


def test_a_segment_that_does_not_repeat_is_called_not_scanned(monkeypatch):
    """A segment of one repeat (here the whole schedule, as in `tiny` and `mini`) runs its layers once, with no
    one-step scan to trace and differentiate; its logits are those of the lax.scan over the same stacks."""
    cfg = dm.preset("tiny").replace(num_layers=2, layer_types=(CSA, HCA), sinkhorn_iterations=3,
                                    param_dtype="float32", compute_dtype="float32")
    assert [s.repeats for s in layer_segments(cfg)] == [1]
    params = dm.init_params(cfg, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (1, 32), 3, cfg.vocab_size)

    def loss(p):
        out = dm.forward(p, cfg, ids)
        return jnp.mean(out.logits ** 2), out.logits

    def scan_lengths():  # of every scan in the gradient's program (Sinkhorn's rounds among them)
        text = str(jax.make_jaxpr(jax.grad(loss, has_aux=True, allow_int=True))(params))
        return {int(n) for n in re.findall(r"\blength=(\d+)", text)}

    direct_logits, direct_lengths = jax.jit(loss)(params)[1], scan_lengths()
    assert cfg.sinkhorn_iterations - 1 in direct_lengths and 1 not in direct_lengths
    monkeypatch.setattr(Segment, "scan", lambda self, body, carry, stacked: jax.lax.scan(body, carry, stacked))
    assert scan_lengths() == direct_lengths | {1}  # the same model through a one-step scan
    np.testing.assert_allclose(np.asarray(jax.jit(loss)(params)[1]), np.asarray(direct_logits), rtol=1e-6, atol=1e-6)


def test_train_steps_match_across_layouts(setup):
    cfg, _, ids = setup
    batch = {"input_ids": ids}
    states, steps = {}, {}
    for scan in (True, False):
        # Muon for the matrices: its per-layer dimension numbers too. The per-layer path with remat: it wraps
        # each layer in its own checkpoint, whose gradients must be the scan's as well.
        tcfg = TCFG.replace(scan_layers=scan, remat="none" if scan else "full")
        states[scan], steps[scan] = init_state(cfg, tcfg, jax.random.key(0)), make_train_step(cfg, tcfg)
        assert ("segments" in states[scan].params) == scan and ("layers" in states[scan].params) != scan
    # The two halves apart: the same gradients, and given the same gradients the same update. (Whole steps
    # cannot be compared leaf by leaf: Muon and Adam scale the rounding-level gradients of the mHC maps at
    # init up to full steps, so those leaves differ by ~10 % of their movement between summation orders.)
    grads, stats = steps[True].gradients(states[True].params, states[True].step, batch)
    unrolled_grads, unrolled_stats = steps[False].gradients(states[False].params, states[False].step, batch)
    np.testing.assert_allclose(unrolled_stats.total, stats.total, rtol=1e-6)
    grads_close(stack_layers(unrolled_grads, cfg), grads)
    same_grads = jax.tree.map(jnp.copy, unstack_layers(grads, cfg, split_experts=False))  # update donates grads
    unrolled, _ = steps[False].update(states[False], same_grads, stats)
    scanned, _ = steps[True].update(states[True], grads, stats)
    leaves_close(stack_layers(unrolled.params, cfg), scanned.params, rtol=1e-5, atol=1e-6)
    # and whole steps report the same losses, loads and router-bias drift
    rows = {True: [], False: []}
    for scan, state in ((True, scanned), (False, unrolled)):
        for _ in range(2):
            state, metrics = steps[scan](state, batch)
            rows[scan].append(jax.device_get(metrics))
    for a, b in zip(rows[True], rows[False]):
        for key in ("loss", "total_loss", "expert_load", "bias_abs_mean"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-7, err_msg=key)
    assert np.any(rows[True][-1]["bias_abs_mean"] > 0)  # the router-bias rule ran on both layouts


def test_which_layout_trains():
    auto = TrainConfig()
    assert not layers_scanned(REPEATING, auto)  # a repeating schedule of few layers: per-layer
    assert layers_scanned(dm.preset("tiny"), auto)  # nothing repeats: the scan is no loop, keep the stacks
    deep = REPEATING.replace(num_layers=UNROLL_MAX_LAYERS + 3, layer_types=(SLIDING,) + (CSA, HCA) * 9)
    assert layers_scanned(deep, auto)  # too many layers to unroll by default
    assert not layers_scanned(deep, auto.replace(scan_layers=False))
    assert layers_scanned(REPEATING, auto.replace(scan_layers=True))
    with pytest.raises(ValueError, match="scan_layers must be True, False or None"):
        TrainConfig(scan_layers="yes")


def test_sharded_forward_refuses_per_layer_params(setup):
    cfg, params, ids = setup
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    with pytest.raises(ValueError, match="stacked parameter layout.*stack_layers"):
        dm.forward(unstack_layers(params, cfg, split_experts=False), cfg, ids, mesh=mesh)


def test_checkpoint_keeps_the_layout_and_refuses_the_other(setup, tmp_path):
    cfg, _, _ = setup
    tcfg = TCFG.replace(scan_layers=False)
    state = init_state(cfg, tcfg, jax.random.key(0))
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(state, {"position": 0}, cfg, tcfg)
    restored, _ = ckpt.restore(cfg, tcfg)
    for x, y in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with pytest.raises(CheckpointError, match="scan_layers: saved False vs now True"):
        ckpt.restore(cfg, tcfg.replace(scan_layers=True))
    ckpt.close()
    # a checkpoint from before the setting existed holds the stacked layout
    legacy = {"format": FORMAT_VERSION, "model": dataclasses.asdict(cfg),
              "train": {k: v for k, v in TCFG.to_dict().items() if k != "scan_layers"}}
    check_compatible(legacy, cfg, TCFG.replace(scan_layers=True), "legacy")
    with pytest.raises(CheckpointError, match="scan_layers: saved True vs now False"):
        check_compatible(legacy, cfg, TCFG, "legacy")  # auto picks per-layer for this schedule
