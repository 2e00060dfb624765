"""Muon / AdamW: hybrid Newton-Schulz vs numpy SVD, per-expert orthogonalisation, leaf assignment, update RMS,
the LR schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import deepmoe as dm
from deepmoe.train import TrainConfig, init_state
from deepmoe.train.optim import (MuonDimensionNumbers, lr_schedule, make_optimizer, muon_dimension_numbers,
                                 newton_schulz_scalar_map, orthogonalize, param_labels)
from deepmoe.params import is_spec, param_specs


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)])
def test_newton_schulz_singular_values(shape):
    rng = np.random.default_rng(sum(shape))
    m = rng.normal(size=shape) * np.linspace(0.2, 3.0, shape[1])[None, :]  # spread-out spectrum
    out = np.asarray(orthogonalize(jnp.asarray(m, jnp.float32)), np.float64)
    s_in = np.linalg.svd(m, compute_uv=False)
    s_out = np.linalg.svd(out, compute_uv=False)
    # documented band: every singular value >= 1e-4 ||M||_F comes out within [0.99, 1.01]
    assert s_in.min() / np.linalg.norm(m) > 1e-4
    assert s_out.min() > 0.99 and s_out.max() < 1.01
    # the iteration acts on each singular value of M/||M||_F by the scalar polynomial
    np.testing.assert_allclose(s_out, np.sort(newton_schulz_scalar_map(s_in / np.linalg.norm(m)))[::-1], atol=3e-3)
    # and keeps the singular vectors: out = U V^T of M
    u, _, vt = np.linalg.svd(m, full_matrices=False)
    np.testing.assert_allclose(out, u @ vt, atol=1e-2)


def test_each_expert_is_orthogonalised_alone():
    rng = np.random.default_rng(0)
    layers, experts, d, i = 2, 4, 16, 24
    w = rng.normal(size=(layers, experts, d, i)) * (10.0 ** np.arange(experts))[None, :, None, None]
    w = jnp.asarray(w, jnp.float32)
    cfg = dm.preset("tiny")
    path_spec = [(p, s) for p, s in jax.tree_util.tree_flatten_with_path(param_specs(cfg), is_leaf=is_spec)[0]
                 if jax.tree_util.keystr(p).endswith("['experts']['w_gate']") and "segments" in jax.tree_util.keystr(p)]
    dims = muon_dimension_numbers(*path_spec[0])
    assert dims == MuonDimensionNumbers(reduction_axis=2, output_axis=3)  # layers and experts are batch axes
    stacked = np.asarray(orthogonalize(w, dims))
    for layer in range(layers):
        for e in range(experts):
            alone = np.asarray(orthogonalize(w[layer, e]))
            np.testing.assert_allclose(stacked[layer, e], alone, atol=1e-5)
            s = np.linalg.svd(stacked[layer, e], compute_uv=False)
            assert s.min() > 0.99 and s.max() < 1.01  # even the expert 1000x smaller than the largest
    # orthogonalising the experts as one big matrix would be something else
    joint = np.asarray(orthogonalize(w[0].reshape(experts * d, i))).reshape(experts, d, i)
    assert np.abs(joint[0] - stacked[0, 0]).max() > 0.1


def test_leaf_assignment():
    cfg = dm.preset("tiny")
    labels = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(param_labels(cfg))}
    by = lambda suffix: {v for k, v in labels.items() if k.endswith(suffix)}  # noqa: E731
    assert by("['tid2eid']") == by("['router_bias']") == {"frozen"}
    assert labels["['embed']"] == labels["['lm_head']"] == "adamw"
    assert by("norm']") == by("['base']") == by("['scale']") == by("['sinks']") == by("['position_bias']") == {"adamw"}
    assert by("['w_gate']") == by("['q_up']") == by("['o_proj']") == by("['fn']") == by("['router']") == {"muon"}
    assert set(jax.tree.leaves(param_labels(cfg, "adamw"))) == {"adamw", "frozen"}


def test_update_sizes_and_frozen_leaves():
    cfg = dm.preset("tiny")
    tcfg = TrainConfig(lr=1e-2, warmup_steps=0, weight_decay=0.0, steps=10)
    state = init_state(cfg, tcfg, jax.random.key(0))
    opt = make_optimizer(cfg, tcfg)
    rng = np.random.default_rng(1)  # numpy: a jax.random draw compiled a program per leaf shape
    grads = jax.tree.map(lambda p: rng.standard_normal(p.shape, np.float32)
                         if jnp.issubdtype(p.dtype, jnp.floating) else np.zeros(p.shape, p.dtype), state.params)
    updates, _ = jax.jit(opt.update)(grads, state.opt_state, state.params)
    seg_moe = updates["segments"][0][1]["moe"]
    assert not np.any(np.asarray(seg_moe["router_bias"]))
    assert not np.any(np.asarray(updates["segments"][0][0]["moe"]["tid2eid"]))
    # Muon: each expert's update has RMS lr * 0.18 (orthogonal matrix x 0.18 sqrt(max(n, m)))
    per_expert_rms = np.sqrt(np.mean(np.asarray(seg_moe["experts"]["w_down"]) ** 2, axis=(-2, -1)))
    np.testing.assert_allclose(per_expert_rms, 1e-2 * 0.18, rtol=0.02)
    # AdamW, first step: |update| = lr for every element with a non-zero gradient
    np.testing.assert_allclose(np.abs(np.asarray(updates["final_norm"])), 1e-2, rtol=1e-3)


def test_schedule_warmup_hold_cosine():
    tcfg = TrainConfig(lr=1.0, warmup_steps=10, steps=100, decay_start=0.5, min_lr_ratio=0.1)
    lr = lr_schedule(tcfg)
    values = np.array([float(lr(s)) for s in range(101)])
    np.testing.assert_allclose(values[:10], np.arange(1, 11) / 10)
    np.testing.assert_allclose(values[10:51], 1.0)
    assert np.all(np.diff(values[50:]) <= 1e-7) and values[100] == pytest.approx(0.1)
    np.testing.assert_allclose(values[75], 0.1 + 0.45 * (1 + np.cos(np.pi * 0.5)))
    assert isinstance(make_optimizer(dm.preset("tiny"), tcfg), optax.GradientTransformation)
