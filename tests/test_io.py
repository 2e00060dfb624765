"""HF-layout safetensors: exact round trips, sharding, and errors that name the tensor and the problem."""

import json

import jax
import numpy as np
import pytest

import deepmoe as dm
from deepmoe.io.safetensors_io import CheckpointError, CheckpointReader, SafetensorsFile, save_file


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_cfg):
    params = dm.init_params(tiny_cfg, jax.random.key(5))
    path = tmp_path_factory.mktemp("ckpt")
    dm.save_pretrained(path, params, tiny_cfg)
    return path, params


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_exact_including_mtp(saved, tiny_cfg):
    path, params = saved
    cfg, loaded = dm.load_pretrained(path, "float32")
    assert cfg == tiny_cfg
    _assert_trees_equal(params, loaded)
    names = CheckpointReader(path).keys()
    assert any(n.startswith("mtp.0.") for n in names) and "lm_head.weight" in names


def test_sharded_round_trip(tmp_path, saved, tiny_cfg):
    _, params = saved
    dm.save_pretrained(tmp_path, params, tiny_cfg, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    _assert_trees_equal(params, dm.load_pretrained(tmp_path, "float32")[1])


def test_bfloat16_load_keeps_float32_islands(saved):
    cfg, params = dm.load_pretrained(saved[0], "bfloat16")
    assert cfg.param_dtype == "bfloat16"
    assert params["embed"].dtype == np.dtype("bfloat16")
    assert params["segments"][0][1]["attn"]["sinks"].dtype == np.float32  # spec §10.2: sinks stay fp32
    assert params["hc_head"]["fn"].dtype == np.float32


def _rewrite(src, dst, edit):
    reader = CheckpointReader(src)
    tensors = {n: reader.get(n) for n in reader.keys()}
    edit(tensors)
    dst.mkdir(exist_ok=True)
    save_file(tensors, dst / "model.safetensors")
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


def test_missing_tensor_is_named(saved, tmp_path):
    name = "model.layers.1.self_attn.compressor.indexer.q_b_proj.weight"
    bad = _rewrite(saved[0], tmp_path / "bad", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=f"missing tensor '{name}'"):
        dm.load_pretrained(bad)


def test_misshaped_tensor_reports_expected_and_actual(saved, tmp_path):
    name = "model.layers.2.self_attn.kv_proj.weight"
    bad = _rewrite(saved[0], tmp_path / "bad", lambda t: t.__setitem__(name, t[name][:-1]))
    with pytest.raises(CheckpointError, match=r"kv_proj.weight' has shape \(63, 64\); the config expects \(64, 64\)"):
        dm.load_pretrained(bad)


def test_unexpected_tensor_in_strict_mode(saved, tmp_path):
    bad = _rewrite(saved[0], tmp_path / "bad", lambda t: t.__setitem__("model.extra.weight", np.zeros(3, np.float32)))
    with pytest.raises(CheckpointError, match="model.extra.weight"):
        dm.load_pretrained(bad)
    dm.load_pretrained(bad, strict=False)  # loads when asked to ignore extras


def test_truncated_file_is_reported(saved, tmp_path):
    data = (saved[0] / "model.safetensors").read_bytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    (bad / "config.json").write_text((saved[0] / "config.json").read_text())
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        dm.load_pretrained(bad)
    (bad / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        SafetensorsFile(bad / "model.safetensors")


def test_wrong_model_type(saved, tmp_path):
    bad = _rewrite(saved[0], tmp_path / "bad", lambda t: None)
    config = json.loads((bad / "config.json").read_text())
    config["model_type"] = "deepseek_v3"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_type is 'deepseek_v3'"):
        dm.load_pretrained(bad)


def test_safetensors_dtypes_match_the_reference_library(tmp_path):
    """Files we write are read by the `safetensors` library, and vice versa (independent implementation)."""
    from safetensors.numpy import load_file, save_file as reference_save

    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, -2], np.int64),
              "c": np.ones((4,), np.float16)}
    save_file(arrays, tmp_path / "ours.safetensors")
    for k, v in load_file(str(tmp_path / "ours.safetensors")).items():
        np.testing.assert_array_equal(v, arrays[k])
    reference_save(arrays, str(tmp_path / "theirs.safetensors"))
    theirs = SafetensorsFile(tmp_path / "theirs.safetensors")
    for k in arrays:
        np.testing.assert_array_equal(theirs.get(k), arrays[k])


def test_load_places_each_leaf_onto_a_mesh(saved, tiny_cfg):
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    specs = dm.abstract_params(tiny_cfg)
    # shard the vocabulary rows of the embedding, replicate the rest
    shardings = jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), specs)
    shardings["embed"] = NamedSharding(mesh, PartitionSpec("data", None))
    _, params = dm.load_pretrained(saved[0], "float32", shardings=shardings)
    assert params["embed"].sharding == shardings["embed"]
    assert params["embed"].addressable_shards[0].data.shape == (tiny_cfg.vocab_size // 8, tiny_cfg.hidden_size)
    np.testing.assert_array_equal(np.asarray(params["embed"]), np.asarray(saved[1]["embed"]))
