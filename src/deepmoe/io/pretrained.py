"""`load_pretrained` / `save_pretrained` for HF-layout DeepSeek-V4 checkpoints (config.json + safetensors).

Tensors are read one at a time, converted to our layout and checked against the parameter description, so
a missing, unexpected or mis-shaped tensor is reported by name with the expected and actual shapes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from deepmoe.config import ModelConfig, SCORE_MOE, SLIDING
from deepmoe.io.hf_names import gate_up_name, global_entries, join_gate_up, layer_entries, split_gate_up, to_hf, to_ours
from deepmoe.io.safetensors_io import CheckpointError, CheckpointReader, save_file
from deepmoe.io.sources import TensorSource
from deepmoe.params import is_spec, layer_segments, layer_specs, param_specs

MTP_PREFIX = "mtp.0."


def _get(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _layer_slots(cfg: ModelConfig) -> Iterator[tuple[int, int, int, int, tuple[str, str]]]:
    """(layer index, segment, position, repeat, kind) for every decoder layer."""
    for s, segment in enumerate(layer_segments(cfg)):
        for r in range(segment.repeats):
            for p, kind in enumerate(segment.kinds):
                yield segment.layer_index(r, p), s, p, r, kind


def _read_layer(source: TensorSource, cfg: ModelConfig, kind: tuple[str, str], prefix: str, used: set[str],
                store: Callable[[tuple, np.ndarray], None]) -> None:
    """Read one decoder layer's tensors and hand each (path inside the layer, our-layout array) to `store`."""
    specs = layer_specs(cfg, kind)

    def take(name: str) -> np.ndarray:
        if name not in source:
            raise CheckpointError(f"checkpoint is missing tensor {name!r}")
        used.update(source.consumed(name))
        return source.get(name)

    for path, name, transform in layer_entries(kind[0], kind[1], prefix):
        shape = _get(specs, path).shape
        array = take(name)
        value = to_ours(transform, array, shape) if array.size == np.prod(shape) else None
        if value is None or value.shape != shape:
            raise CheckpointError(f"tensor {name!r} has shape {tuple(array.shape)}; the config expects "
                                  f"{to_hf(transform, np.zeros(shape, np.int8)).shape}")
        store(path, value)
    name = gate_up_name(prefix)
    gate_up = take(name)
    e, i, d = cfg.num_experts, cfg.expert_hidden_dim, cfg.hidden_size
    if gate_up.shape != (e, 2 * i, d):
        raise CheckpointError(f"tensor {name!r} has shape {tuple(gate_up.shape)}; the config expects {(e, 2 * i, d)}")
    gate, up = split_gate_up(gate_up)
    store(("moe", "experts", "w_gate"), gate)
    store(("moe", "experts", "w_up"), up)


def params_from_reader(reader: CheckpointReader, cfg: ModelConfig, *, strict: bool = True) -> dict:
    """Assemble our parameter tree (numpy, host memory) from a checkpoint in HF or official layout.

    Every leaf is preallocated at its final dtype and filled one checkpoint tensor at a time, so peak host
    memory stays near the size of the result (plus one tensor), not the checkpoint twice over."""
    source = TensorSource(reader)
    used: set[str] = set()
    specs = param_specs(cfg)
    params = jax.tree.map(lambda s: np.empty(s.shape, jnp.dtype(s.dtype or cfg.param_dtype)), specs,
                          is_leaf=is_spec)
    for path, name, transform in global_entries(cfg):
        if name not in source:
            hint = " (MTP weights; load with num_mtp_layers=0 to skip them)" if name.startswith(MTP_PREFIX) else ""
            raise CheckpointError(f"checkpoint is missing tensor {name!r}{hint}")
        target = _get(params, path)
        value = to_ours(transform, source.get(name), target.shape)
        if value.shape != target.shape:
            raise CheckpointError(f"tensor {name!r} has shape {tuple(source.shape(name))}; the config expects "
                                  f"{to_hf(transform, np.zeros(target.shape, np.int8)).shape}")
        used.update(source.consumed(name))
        target[...] = value
    for index, s, p, r, kind in _layer_slots(cfg):
        layer = params["segments"][s][p]
        _read_layer(source, cfg, kind, f"model.layers.{index}.", used,
                    lambda path, value: _get(layer, path).__setitem__(r, value))
    if cfg.num_mtp_layers:
        block = params["mtp"]["block"]
        _read_layer(source, cfg, (SLIDING, SCORE_MOE), MTP_PREFIX, used,
                    lambda path, value: _get(block, path).__setitem__(Ellipsis, value))
    unexpected = sorted(set(reader.keys()) - used)
    if not cfg.num_mtp_layers:
        unexpected = [n for n in unexpected if not n.startswith(MTP_PREFIX)]
    if strict and unexpected:
        raise CheckpointError(f"checkpoint has {len(unexpected)} tensors the config does not use, e.g. "
                              f"{unexpected[:5]} (pass strict=False to ignore them)")
    return params


def load_pretrained(path: str | os.PathLike, dtype: Any = jnp.bfloat16, *, strict: bool = True,
                    shardings: Any = None, **config_overrides: Any) -> tuple[ModelConfig, dict]:
    """Load `config.json` + safetensors from `path` -> (cfg, params as jax.Array).

    Reads HF names or the official release names (detected), sharded checkpoints through
    `model.safetensors.index.json`, FP8 (128x128 ue8m0 blocks) and MXFP4 experts (dequantized on load).
    `dtype` is the storage dtype of the matrices (norms, mHC, sinks and router stay float32). A checkpoint
    without `mtp.0.*` tensors (e.g. saved by transformers) loads with `num_mtp_layers=0`. `shardings`: an
    optional pytree of `jax.sharding.Sharding` (e.g. from `deepmoe.sharding`) to place each leaf onto a mesh.
    """
    path = Path(path)
    cfg = ModelConfig.from_hf(path, **config_overrides).replace(param_dtype=jnp.dtype(dtype).name)
    reader = CheckpointReader(path)
    try:
        has_mtp = any(k.startswith(MTP_PREFIX) for k in reader.keys())
        if cfg.num_mtp_layers and not has_mtp and "num_mtp_layers" not in config_overrides:
            cfg = cfg.replace(num_mtp_layers=0)
        params = params_from_reader(reader, cfg, strict=strict)
    finally:
        reader.close()
    if shardings is None:
        return cfg, jax.tree.map(jnp.asarray, params)
    return cfg, jax.tree.map(jax.device_put, params, shardings)


def hf_state_dict(params: dict, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, numpy array) for every tensor, in HF layout."""
    for path, name, transform in global_entries(cfg):
        yield name, to_hf(transform, np.asarray(_get(params, path)))
    blocks = [(f"model.layers.{index}.", kind, s, p, r) for index, s, p, r, kind in _layer_slots(cfg)]
    if cfg.num_mtp_layers:
        blocks.append((MTP_PREFIX, (SLIDING, SCORE_MOE), None, None, None))
    for prefix, kind, s, p, r in blocks:
        layer = params["mtp"]["block"] if s is None else jax.tree.map(lambda x: x[r], params["segments"][s][p])
        for path, name, transform in layer_entries(kind[0], kind[1], prefix):
            yield name, to_hf(transform, np.asarray(_get(layer, path)))
        experts = layer["moe"]["experts"]
        yield gate_up_name(prefix), join_gate_up(np.asarray(experts["w_gate"]), np.asarray(experts["w_up"]))


def save_pretrained(path: str | os.PathLike, params: dict, cfg: ModelConfig, *,
                    max_shard_bytes: int = 4 << 30) -> None:
    """Write config.json + HF-named safetensors (sharded with an index past `max_shard_bytes`).
    Loadable by transformers' DeepseekV4ForCausalLM (which ignores the mtp.0.* tensors)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shards: list[list[tuple[str, np.ndarray]]] = [[]]
    size = 0
    for name, array in hf_state_dict(params, cfg):
        if array.dtype == np.int32 and name.endswith("tid2eid"):
            array = array.astype(np.int64)  # transformers keeps tid2eid as int64
        if size and size + array.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, array))
        size += array.nbytes
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, path / name)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(a.nbytes for s in shards for _, a in s)},
                 "weight_map": {t: f for f, s in zip(names, shards) for t, _ in s}}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    hf = cfg.to_hf()
    hf["torch_dtype"] = {"float32": "float32", "bfloat16": "bfloat16"}[cfg.param_dtype]
    (path / "config.json").write_text(json.dumps(hf, indent=2))

