"""`load_pretrained` / `save_pretrained` for HF-layout DeepSeek-V4 checkpoints (config.json + safetensors).

Tensors are read one at a time, converted to our layout and checked against the parameter description, so
a missing, unexpected or mis-shaped tensor is reported by name with the expected and actual shapes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from deepmoe.config import ModelConfig, SCORE_MOE, SLIDING
from deepmoe.io.hf_names import gate_up_name, global_entries, join_gate_up, layer_entries, split_gate_up, to_hf, to_ours
from deepmoe.io.safetensors_io import CheckpointError, CheckpointReader, save_file
from deepmoe.io.sources import TensorSource
from deepmoe.params import layer_segments, param_specs

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


class _Read(NamedTuple):
    name: str  # HF tensor name
    transform: str  # hf_names transform kind, or "gate_up" (one HF tensor -> the gate and up leaves)
    targets: tuple[tuple[tuple, int | None], ...]  # (leaf path in the full tree, index on the stacked axis)


def _reads(cfg: ModelConfig) -> list[_Read]:
    """Every checkpoint tensor the config needs and where it goes."""
    reads = [_Read(name, transform, ((path, None),)) for path, name, transform in global_entries(cfg)]
    layers = [(f"model.layers.{index}.", kind, ("segments", s, p), r) for index, s, p, r, kind in _layer_slots(cfg)]
    if cfg.num_mtp_layers:
        layers.append((MTP_PREFIX, (SLIDING, SCORE_MOE), ("mtp", "block"), None))
    for prefix, kind, root, r in layers:
        for path, name, transform in layer_entries(kind[0], kind[1], prefix):
            reads.append(_Read(name, transform, (((*root, *path), r),)))
        experts = (*root, "moe", "experts")
        reads.append(_Read(gate_up_name(prefix), "gate_up", (((*experts, "w_gate"), r), ((*experts, "w_up"), r))))
    return reads


def _convert(read: _Read, array: np.ndarray, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """A checkpoint tensor in HF layout -> our layout for each target (shape errors name the tensor)."""
    if read.transform == "gate_up":
        e, d, i = shapes[0]
        if array.shape != (e, 2 * i, d):
            raise CheckpointError(f"tensor {read.name!r} has shape {tuple(array.shape)}; the config expects "
                                  f"{(e, 2 * i, d)}")
        return list(split_gate_up(array))
    shape = shapes[0]
    if array.size == np.prod(shape):
        value = to_ours(read.transform, array, shape)
        if value.shape == shape:
            return [value]
    raise CheckpointError(f"tensor {read.name!r} has shape {tuple(array.shape)}; the config expects "
                          f"{to_hf(read.transform, np.zeros(shape, np.int8)).shape}")


def params_from_reader(reader: CheckpointReader, cfg: ModelConfig, *, strict: bool = True,
                       place: Callable[[tuple, np.ndarray], Any] = lambda path, array: array) -> dict:
    """Assemble our parameter tree from a checkpoint in HF or official layout.

    Leaves are built one at a time (all layers of a stacked leaf, then the next leaf): each is preallocated at
    its final dtype, filled from the checkpoint tensors, then handed to `place` (e.g. device_put onto a mesh)
    and its host copy dropped, so peak host memory stays near the size of the result plus one leaf."""
    source = TensorSource(reader)
    specs = param_specs(cfg)
    used: set[str] = set()
    by_leaf: dict[tuple, list[_Read]] = {}
    for read in _reads(cfg):
        by_leaf.setdefault(tuple(path for path, _ in read.targets), []).append(read)
    params: dict = {}
    for leaves, reads in by_leaf.items():
        leaf_specs = [_get(specs, path) for path in leaves]
        buffers = [np.empty(s.shape, jnp.dtype(s.dtype or cfg.param_dtype)) for s in leaf_specs]
        stacked = reads[0].targets[0][1] is not None  # a scanned leaf: one read per layer
        unstacked = [s.shape[1:] if stacked else s.shape for s in leaf_specs]
        for read in reads:
            if read.name not in source:
                hint = " (MTP weights; load with num_mtp_layers=0 to skip them)" \
                    if read.name.startswith(MTP_PREFIX) else ""
                raise CheckpointError(f"checkpoint is missing tensor {read.name!r}{hint}")
            used.update(source.consumed(read.name))
            for buffer, (_, index), value in zip(buffers, read.targets, _convert(read, source.get(read.name),
                                                                                 unstacked)):
                buffer[... if index is None else index] = value
        for path, buffer in zip(leaves, buffers):
            _set(params, path, place(path, buffer))
        del buffers
    unexpected = sorted(set(reader.keys()) - used)
    if not cfg.num_mtp_layers:
        unexpected = [n for n in unexpected if not n.startswith(MTP_PREFIX)]
    if strict and unexpected:
        raise CheckpointError(f"checkpoint has {len(unexpected)} tensors the config does not use, e.g. "
                              f"{unexpected[:5]} (pass strict=False to ignore them)")
    return _as_lists(params)


def _as_lists(tree: Any) -> Any:
    """`_set` builds dicts keyed by segment / position indices; the parameter tree uses lists there."""
    if isinstance(tree, dict):
        if tree and all(isinstance(k, int) for k in tree):
            return [_as_lists(tree[k]) for k in range(len(tree))]
        return {k: _as_lists(v) for k, v in tree.items()}
    return tree


def load_pretrained(path: str | os.PathLike, dtype: Any = jnp.bfloat16, *, strict: bool = True,
                    shardings: Any = None, **config_overrides: Any) -> tuple[ModelConfig, dict]:
    """Load `config.json` + safetensors from `path` -> (cfg, params as jax.Array).

    Reads HF names or the official release names (detected), sharded checkpoints through
    `model.safetensors.index.json`, FP8 (128x128 ue8m0 blocks) and MXFP4 experts (dequantized on load).
    `dtype` is the storage dtype of the matrices (norms, mHC, sinks and router stay float32). A checkpoint
    without `mtp.0.*` tensors (e.g. saved by transformers) loads with `num_mtp_layers=0`. `shardings`: an
    optional pytree of `jax.sharding.Sharding` (e.g. from `deepmoe.sharding`) to place each leaf onto a mesh
    as soon as it is read.
    """
    path = Path(path)
    cfg = ModelConfig.from_hf(path, **config_overrides).replace(param_dtype=jnp.dtype(dtype).name)
    reader = CheckpointReader(path)
    try:
        has_mtp = any(k.startswith(MTP_PREFIX) for k in reader.keys())
        if cfg.num_mtp_layers and not has_mtp and "num_mtp_layers" not in config_overrides:
            cfg = cfg.replace(num_mtp_layers=0)

        def place(path, array):  # device_put, not jnp.asarray: that compiled a program per distinct tensor shape
            return jax.device_put(array, None if shardings is None else _get(shardings, path))

        params = params_from_reader(reader, cfg, strict=strict, place=place)
    finally:
        reader.close()
    return cfg, params


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

