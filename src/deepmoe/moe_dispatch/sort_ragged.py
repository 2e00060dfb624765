"""Dropless MoE: sort token copies by expert, grouped matmuls with `jax.lax.ragged_dot`, unsort, combine."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepmoe.layers.moe import swiglu
from deepmoe.layers.precision import compute_dtype


def run(params: dict, cfg, x: jax.Array, expert_ids: jax.Array, weights: jax.Array) -> jax.Array:
    b, t, d = x.shape
    k = expert_ids.shape[-1]
    dtype = compute_dtype(cfg)
    flat_experts = expert_ids.reshape(-1)  # [B*T*K]
    order = jnp.argsort(flat_experts, stable=True)
    token_of_copy = order // k
    group_sizes = jnp.bincount(flat_experts, length=cfg.num_experts).astype(jnp.int32)
    rows = x.reshape(b * t, d).astype(dtype)[token_of_copy]  # [B*T*K, D] sorted by expert

    def grouped(lhs, rhs):
        return jax.lax.ragged_dot(lhs.astype(dtype), rhs.astype(dtype), group_sizes)

    hidden = swiglu(cfg, grouped(rows, params["w_gate"]), grouped(rows, params["w_up"]))
    hidden = hidden * weights.reshape(-1)[order][:, None]
    out_sorted = grouped(hidden, params["w_down"]).astype(jnp.float32)
    inverse = jnp.argsort(order)
    return out_sorted[inverse].reshape(b, t, k, d).sum(axis=2)
