"""deepmoe: a purely functional JAX reimplementation of DeepSeek-V4."""

from deepmoe.config import ConfigError, ModelConfig, preset
from deepmoe.model import ModelOutput, forward
from deepmoe.params import abstract_params, count_params, init_params, param_specs

__all__ = ["ConfigError", "ModelConfig", "ModelOutput", "abstract_params", "count_params", "forward",
           "init_params", "param_specs", "preset"]
