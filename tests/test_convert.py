"""`deepmoe convert`: safetensors -> orbax -> safetensors is exact; bad inputs are named."""

import jax
import numpy as np
import pytest

import deepmoe as dm
from deepmoe import cli
from deepmoe.io.orbax_io import load_orbax
from deepmoe.io.safetensors_io import CheckpointError


def test_convert_round_trip(tmp_path, tiny_cfg):
    params = dm.init_params(tiny_cfg, jax.random.key(9))
    dm.save_pretrained(tmp_path / "hf", params, tiny_cfg)
    assert cli.main(["convert", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "orbax"),
                     "--dtype", "float32"]) == 0
    cfg, restored = load_orbax(tmp_path / "orbax")
    assert cfg == tiny_cfg
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert cli.main(["convert", "--orbax", str(tmp_path / "orbax"), "--out", str(tmp_path / "back"),
                     "--dtype", "float32"]) == 0
    _, back = dm.load_pretrained(tmp_path / "back", "float32")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_orbax_restore_onto_a_mesh(tmp_path, tiny_cfg):
    from jax.sharding import NamedSharding, PartitionSpec

    params = dm.init_params(tiny_cfg, jax.random.key(9))
    from deepmoe.io.orbax_io import save_orbax

    save_orbax(tmp_path / "o", params, tiny_cfg)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    replicated = jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), params)
    _, restored = load_orbax(tmp_path / "o", shardings=replicated)
    assert len(restored["embed"].sharding.device_set) == 8


def test_convert_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not a deepmoe orbax checkpoint"):
        load_orbax(tmp_path)
    with pytest.raises(SystemExit):
        cli.main(["convert", "--out", str(tmp_path)])  # a source is required
