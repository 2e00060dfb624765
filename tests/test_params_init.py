"""`init_params` against its description (`param_specs`): every leaf's shape, dtype and initializer; the normal
leaves, cut from shared draws, at their std and independent of each other (against the statistics of
independent N(0, std^2) samples); hash tables of distinct experts, different per layer."""

import itertools

import jax
import numpy as np
import pytest

import deepmoe as dm
from deepmoe import params as params_module
from deepmoe.params import draw_groups, is_spec, param_specs


def _assert_normal_samples(leaves: list[np.ndarray], stds: list[float], sigmas: float = 6.0):
    """Each leaf's mean and std as those of its size's N(0, std^2) sample (within `sigmas` of their standard
    errors, std / sqrt(n) and ~std / sqrt(2n)), and every two leaves uncorrelated over their common length
    (|r| within sigmas / sqrt(n)): a leaf cut twice from the same values would correlate fully."""
    for x, std in zip(leaves, stds):
        n = x.size
        assert abs(x.mean()) < sigmas * std / np.sqrt(n)
        assert abs(x.std() / std - 1) < sigmas / np.sqrt(2 * n)
    for (a, _), (b, _) in itertools.combinations(zip(leaves, stds), 2):
        n = min(a.size, b.size)
        r = np.corrcoef(a.ravel()[:n], b.ravel()[:n])[0, 1]
        assert abs(r) < sigmas / np.sqrt(n)


def test_every_leaf_follows_its_spec(tiny_cfg, tiny_params):
    specs = jax.tree_util.tree_leaves_with_path(param_specs(tiny_cfg), is_leaf=is_spec)
    leaves = jax.tree.leaves(tiny_params)
    assert jax.tree.structure(tiny_params) == jax.tree.structure(param_specs(tiny_cfg), is_leaf=is_spec)
    normal, stds = [], []
    for (path, spec), x in zip(specs, leaves):
        name = jax.tree_util.keystr(path)
        x = np.asarray(x)
        assert x.shape == spec.shape and x.dtype == np.dtype(spec.dtype or tiny_cfg.param_dtype), name
        if spec.init == "ones":
            assert np.all(x == 1), name
        elif spec.init == "zeros":
            assert np.all(x == 0), name
        elif spec.init == "hash_table":  # k distinct experts per token
            assert x.min() >= 0 and x.max() < tiny_cfg.num_experts, name
            assert np.all(np.sort(x, axis=-1)[..., 1:] != np.sort(x, axis=-1)[..., :-1]), name
        elif x.size >= 256:  # small ones only add noise to the statistics
            normal.append(x.astype(np.float64))
            stds.append(spec.std)
    assert len(normal) > 50
    _assert_normal_samples(normal, stds)


def test_same_key_same_params_another_key_others(tiny_cfg, tiny_params):
    again = dm.init_params(tiny_cfg, jax.random.key(0))  # the fixture's key
    other = dm.init_params(tiny_cfg, jax.random.key(1))
    for x, y, z in zip(jax.tree.leaves(tiny_params), jax.tree.leaves(again), jax.tree.leaves(other)):
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
        if x.size >= 16 and np.asarray(x).std() > 0:
            assert not np.array_equal(np.asarray(z), np.asarray(x))


def test_hash_tables_differ_between_layers(tiny_cfg):
    cfg = tiny_cfg.replace(num_hash_layers=2)
    specs = jax.tree.leaves(param_specs(cfg), is_leaf=is_spec)
    tables = [np.asarray(x) for s, x in zip(specs, jax.tree.leaves(dm.init_params(cfg, jax.random.key(0))))
              if s.init == "hash_table"]
    assert len(tables) == 2 and tables[0].shape == tables[1].shape
    assert np.mean(tables[0] == tables[1]) < 0.5  # chance agreement is ~1 / num_experts per slot


def test_draws_split_at_the_limit(monkeypatch):
    assert draw_groups([300, 500, 2500, 400, 700], 1000) == [[0, 1], [2], [3], [4]]
    assert draw_groups([1000, 1, 999], 1000) == [[0], [1, 2]]
    assert draw_groups([], 1000) == []
    # leaves from several draws (one larger than the limit), each at its std and unrelated to the others
    monkeypatch.setattr(params_module, "DRAW_ELEMENTS", 1000)
    specs = [params_module.ParamSpec(shape, (None,) * len(shape), std=std)
             for shape, std in (((30, 10), 0.5), ((500,), 0.02), ((50, 50), 1.0), ((400,), 3.0), ((7, 100), 0.1))]
    leaves = params_module._normal_leaves(specs, dm.preset("tiny"), jax.random.key(3))
    assert [x.shape for x in leaves] == [s.shape for s in specs]
    _assert_normal_samples([np.asarray(x, np.float64) for x in leaves], [s.std for s in specs])


def test_unknown_initializer_is_named(tiny_cfg):
    spec = params_module.ParamSpec((2,), (None,), init="uniform")
    with pytest.raises(ValueError, match="unknown initializer 'uniform'"):
        params_module._init_leaf(spec, tiny_cfg, jax.random.key(0))
