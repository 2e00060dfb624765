"""Interleaved partial RoPE with two frequency tables: `main` (sliding layers, MTP) and the YaRN
`compress` table (every tensor of CSA / HCA layers). Spec §6.3: no YaRN mscale."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from deepmoe.config import SLIDING, ModelConfig


def inverse_frequencies(cfg: ModelConfig, layer_type: str) -> np.ndarray:
    """[rope_head_dim / 2] float64 frequencies of the table a layer of `layer_type` uses."""
    rd = cfg.rope_head_dim
    base = cfg.rope_theta if layer_type == SLIDING else cfg.compress_rope_theta
    freqs = 1.0 / base ** (np.arange(0, rd, 2, dtype=np.float64) / rd)
    if layer_type == SLIDING or cfg.yarn_factor == 1.0:
        return freqs

    def correction_dim(rotations: float) -> float:
        return rd * math.log(cfg.yarn_original_max_positions / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(cfg.yarn_beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.yarn_beta_slow)), rd - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(rd // 2) - low) / (high - low), 0.0, 1.0)
    return freqs / cfg.yarn_factor * ramp + freqs * (1 - ramp)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, *, inverse: bool = False) -> jax.Array:
    """Rotate channel pairs (2i, 2i+1) of the trailing `2 * len(inv_freq)` channels of x.

    x: [..., S, (heads,) dim]; positions broadcastable to x.shape[:-1] after adding the head axis by the caller.
    `inverse=True` rotates by -pos (the output de-rotation of §6.9).
    """
    rd = 2 * inv_freq.shape[0]
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [..., rd/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if inverse:
        sin = -sin
    rot = x[..., -rd:].astype(jnp.float32).reshape(*x.shape[:-1], rd // 2, 2)
    a, b = rot[..., 0], rot[..., 1]
    rotated = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(*x.shape[:-1], rd)
    return jnp.concatenate([x[..., :-rd], rotated.astype(x.dtype)], axis=-1)
