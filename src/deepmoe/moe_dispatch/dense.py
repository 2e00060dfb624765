"""Reference MoE: every expert on every token, combined with the routing weights (tiny configs only)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepmoe.layers.moe import swiglu
from deepmoe.layers.precision import einsum


def run(params: dict, cfg, x: jax.Array, expert_ids: jax.Array, weights: jax.Array) -> jax.Array:
    combine = jnp.sum(jax.nn.one_hot(expert_ids, cfg.num_experts, dtype=jnp.float32) * weights[..., None], axis=-2)
    hidden = swiglu(cfg, einsum(cfg, "btd,edi->btei", x, params["w_gate"]),
                    einsum(cfg, "btd,edi->btei", x, params["w_up"]))
    hidden = hidden * combine[..., None]  # weight before the down projection, as the official code does
    return einsum(cfg, "btei,eid->btd", hidden, params["w_down"]).astype(jnp.float32)
