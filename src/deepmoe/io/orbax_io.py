"""Orbax checkpoints of model parameters: fast, sharded reload of converted weights.

Layout: DIR/config.json (HF fields, as save_pretrained writes) and DIR/params/ (an orbax PyTree checkpoint).
Orbax writes to a temporary directory and renames it when complete, so an interrupted save never leaves a
readable-but-partial `params/`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from deepmoe.config import ModelConfig
from deepmoe.io.safetensors_io import CheckpointError
from deepmoe.params import abstract_params, stack_layers


def save_orbax(path: str | os.PathLike, params: dict, cfg: ModelConfig) -> None:
    """Write `params` (either layout; saved stacked, as `load_orbax` reads them) and the HF config.json."""
    import orbax.checkpoint as ocp

    params = stack_layers(params, cfg)
    path = Path(path).absolute()
    if (path / "params").exists():
        raise CheckpointError(f"{path / 'params'} already exists; choose an empty output directory")
    path.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path / "params", params)
        checkpointer.wait_until_finished()
    hf = cfg.to_hf()
    hf["torch_dtype"] = cfg.param_dtype
    (path / "config.json").write_text(json.dumps(hf, indent=2))


def load_orbax(path: str | os.PathLike, *, shardings: Any = None, dtype: Any = None) -> tuple[ModelConfig, dict]:
    """-> (cfg, params). `shardings`: optional pytree of shardings to restore each leaf directly onto a mesh."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if not (path / "params").is_dir() or not (path / "config.json").exists():
        raise CheckpointError(f"{path} is not a deepmoe orbax checkpoint (needs config.json and params/)")
    hf = json.loads((path / "config.json").read_text())
    cfg = ModelConfig.from_hf(hf).replace(param_dtype=jnp.dtype(dtype or hf.get("torch_dtype", "float32")).name)
    target = abstract_params(cfg)
    if shardings is not None:
        target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), target, shardings)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            params = checkpointer.restore(path / "params", target)
    except Exception as e:  # orbax raises many types; name the directory and keep the cause
        raise CheckpointError(f"cannot restore {path / 'params'} for this config: {e}") from e
    return cfg, params
