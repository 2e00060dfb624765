"""deepmoe: a purely functional JAX reimplementation of DeepSeek-V4.

Names are imported lazily: JAX imports `deepmoe.backend.ascend_plugin` during plugin discovery, so importing
this package must stay cheap and must not touch JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ConfigError": "deepmoe.config",
    "ModelConfig": "deepmoe.config",
    "preset": "deepmoe.config",
    "ModelOutput": "deepmoe.model",
    "forward": "deepmoe.model",
    "abstract_params": "deepmoe.params",
    "count_params": "deepmoe.params",
    "init_params": "deepmoe.params",
    "param_specs": "deepmoe.params",
    "unstack_layers": "deepmoe.params",
    "stack_layers": "deepmoe.params",
    "load_pretrained": "deepmoe.io.pretrained",
    "generate": "deepmoe.infer.generate",
    "save_pretrained": "deepmoe.io.pretrained",
    "ShardingError": "deepmoe.sharding",
    "ShardingRules": "deepmoe.sharding",
    "make_mesh": "deepmoe.sharding",
    "param_shardings": "deepmoe.sharding",
    "shard_batch": "deepmoe.sharding",
    "shard_params": "deepmoe.sharding",
}
_SUBMODULES = ("train", "infer", "backend", "io", "layers", "moe_dispatch", "sharding", "plan")

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"deepmoe.{name}")
    raise AttributeError(f"module 'deepmoe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*__all__, *_SUBMODULES])
