"""The train step on real text: the loss falls, the bias rule, frozen buffers, non-finite steps; router balancing.

Every test here and in test_train_checkpoint.py uses the same (cfg, TrainConfig), so the step compiles once."""

import sysconfig
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepmoe as dm
from deepmoe.layers.moe import route
from deepmoe.train import TrainConfig, init_state, make_train_step
from deepmoe.train.data import DataState, TextDataset
from deepmoe.train.step import score_layer_indices, update_router_bias

TCFG = TrainConfig(steps=40, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=5, compute_dtype="float32")
CORPUS = Path(sysconfig.get_paths()["stdlib"]) / "email"  # real Python source that nobody edits meanwhile


def host(tree):
    return jax.tree.map(np.asarray, tree)


@pytest.fixture(scope="module")
def setup():
    cfg = dm.preset("tiny")
    ds = TextDataset.from_paths(CORPUS, seq_len=TCFG.seq_len, batch_size=TCFG.batch_size, seed=0)
    return cfg, ds, make_train_step(cfg, TCFG, donate=True)


def test_first_step_rules(setup):
    cfg, ds, step = setup
    state = init_state(cfg, TCFG, jax.random.key(0))
    before = host(state.params)
    batch, _ = ds.batch(DataState())
    state, m = step(state, batch)
    after = host(state.params)
    assert int(state.step) == 1 and int(m["skipped"]) == 0 and int(state.skipped) == 0
    assert float(m["lr"]) == pytest.approx(TCFG.lr / TCFG.warmup_steps)
    assert float(m["mtp_weight"]) == pytest.approx(0.3)
    assert 5.5 < float(m["loss"]) < 7.0  # ~ln(512) at init
    # hash table untouched; router biases moved by exactly -speed * sign(load - mean load)
    load = np.asarray(m["expert_load"])
    assert load.shape == (cfg.num_layers, cfg.num_experts)
    np.testing.assert_allclose(load.sum(-1), TCFG.batch_size * TCFG.seq_len * cfg.experts_per_token)
    layers = after["segments"][0]
    assert np.array_equal(layers[0]["moe"]["tid2eid"], before["segments"][0][0]["moe"]["tid2eid"])
    assert score_layer_indices(cfg) == [1, 2, 3]
    for i in score_layer_indices(cfg):
        want = -TCFG.bias_update_speed * np.sign(load[i] - load[i].mean())
        np.testing.assert_allclose(layers[i]["moe"]["router_bias"][0], want, atol=1e-9)
    mtp_load = np.asarray(m["mtp_expert_load"])
    np.testing.assert_allclose(after["mtp"]["block"]["moe"]["router_bias"],
                               -TCFG.bias_update_speed * np.sign(mtp_load - mtp_load.mean()), atol=1e-9)
    # every trainable matrix moved
    assert not np.array_equal(after["embed"], before["embed"])
    assert not np.array_equal(layers[1]["moe"]["experts"]["w_up"], before["segments"][0][1]["moe"]["experts"]["w_up"])


def test_loss_falls_on_real_text(setup):
    cfg, ds, step = setup
    state = init_state(cfg, TCFG, jax.random.key(0))
    data_state, losses, mtp_losses = DataState(), [], []
    for _ in range(30):
        batch, data_state = ds.batch(data_state)
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
        mtp_losses.append(float(m["mtp_loss"]))
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < losses[0] - 2.0, losses  # from ~6.2 nats (uniform over 512) to < 4.2
    assert np.mean(mtp_losses[-5:]) < mtp_losses[0] - 1.5, mtp_losses


def test_nonfinite_step_changes_nothing(setup):
    cfg, ds, step = setup
    state = init_state(cfg, TCFG, jax.random.key(0))
    params = state.params
    params = {**params, "lm_head": params["lm_head"].at[0, 0].set(jnp.nan)}
    state = state.replace(params=params)
    before = host(state)
    batch, _ = ds.batch(DataState())
    state, m = step(state, batch)
    assert int(m["skipped"]) == 1 and int(state.skipped) == 1 and int(state.step) == 1
    for a, b in zip(jax.tree.leaves(before.params), jax.tree.leaves(host(state.params))):
        assert np.array_equal(a, b, equal_nan=True)
    for a, b in zip(jax.tree.leaves(before.opt_state), jax.tree.leaves(host(state.opt_state))):
        assert np.array_equal(a, b)


def test_bias_rule_on_all_score_layers():
    cfg = dm.preset("tiny")
    params = dm.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    load = rng.integers(0, 50, (cfg.num_layers, cfg.num_experts)).astype(np.float32)
    load[2] = 7.0  # perfectly balanced layer: no change
    mtp_load = rng.integers(0, 50, cfg.num_experts).astype(np.float32)
    new = update_router_bias(params, cfg, jnp.asarray(load), jnp.asarray(mtp_load), 0.01)
    for i, layer in enumerate(new["segments"][0]):
        if i == 0:
            assert "router_bias" not in layer["moe"]  # hash layer
            continue
        np.testing.assert_allclose(layer["moe"]["router_bias"][0], -0.01 * np.sign(load[i] - load[i].mean()))
    np.testing.assert_allclose(new["mtp"]["block"]["moe"]["router_bias"], -0.01 * np.sign(mtp_load - mtp_load.mean()))


def test_bias_update_balances_a_skewed_router():
    """A router whose weights send most tokens to experts 0 and 1: iterating the rule on the real routing code
    drives the load toward uniform (the bias only steers selection, the gate weights are untouched)."""
    cfg = dm.preset("tiny")
    d, e = cfg.hidden_size, cfg.num_experts
    key_w, key_x = jax.random.split(jax.random.key(0))
    w = 0.05 * jax.random.normal(key_w, (d, e))
    w = w.at[:, :2].add(0.15)  # skew: experts 0, 1 get much larger affinities
    x = jax.random.normal(key_x, (1, 512, d)) + 1.0  # inputs aligned with the skew direction
    ids = jnp.zeros((1, 512), jnp.int32)

    @jax.jit
    def loads(bias):
        r = route({"router": w, "router_bias": bias}, cfg, x, ids)
        return jnp.sum(jax.nn.one_hot(r.experts, e), axis=(0, 1, 2))

    def imbalance(load):
        return float(load.max() / load.mean())

    bias = jnp.zeros((e,))
    start = imbalance(loads(bias))
    history = []
    for _ in range(150):
        load = loads(bias)
        history.append(imbalance(load))
        bias = bias - 0.01 * jnp.sign(load - load.mean())
    assert start > 3.0, start  # really skewed (4 = everything on 2 of 8 experts)
    assert np.mean(history[-20:]) < 1.6, history[-20:]
    assert float(bias[0]) < 0 and float(bias[1]) < 0  # the overloaded experts were pushed down
