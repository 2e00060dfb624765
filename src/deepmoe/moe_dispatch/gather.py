"""A decode-time MoE execution strategy: gather each token's K experts' weights and apply them directly.

With few tokens (decode: B x S tokens, S = 1 or 2) it reads only the chosen experts' weights, B*S*K expert
matrices instead of all E of them (`dense`) or XLA:CPU's slow `ragged_dot` (`sorted`). Once B*S*K approaches
E, reading every expert once (`sorted`) is cheaper; `decode_strategy` makes that choice for cached steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepmoe.layers.moe import swiglu
from deepmoe.layers.precision import einsum


def run(params: dict, cfg, x: jax.Array, expert_ids: jax.Array, weights: jax.Array) -> jax.Array:
    w_gate = params["w_gate"][expert_ids]  # [B, T, K, D, I]
    w_up = params["w_up"][expert_ids]
    w_down = params["w_down"][expert_ids]  # [B, T, K, I, D]
    hidden = swiglu(cfg, einsum(cfg, "btd,btkdi->btki", x, w_gate), einsum(cfg, "btd,btkdi->btki", x, w_up))
    hidden = hidden * weights[..., None]  # weight before the down projection, as the official code does
    return einsum(cfg, "btki,btkid->btd", hidden, w_down).astype(jnp.float32)


def decode_strategy(cfg, tokens: int, requested="auto"):
    """The MoE strategy for a cached step over `tokens` tokens: an explicit request is kept; "auto" becomes
    "gather" when those tokens touch fewer expert matrices than there are experts, else stays "auto"."""
    if requested != "auto":
        return requested
    return "gather" if tokens * cfg.experts_per_token < cfg.num_experts else "auto"
