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
    b, t, d = x.shape
    k = expert_ids.shape[-1]
    rows = x.reshape(b * t, d)[jnp.repeat(jnp.arange(b * t), k)]  # one row per (token, chosen expert)

    def one(args):
        # Slicing one expert out of the stacked weights feeds the matvec directly; gathering [B, T, K, D, I]
        # copies up front cost a transposing copy of every chosen matrix (measured 2.3x slower decode MoE).
        row, expert, weight = args
        w_gate, w_up, w_down = (jax.lax.dynamic_index_in_dim(params[name], expert, keepdims=False)
                                for name in ("w_gate", "w_up", "w_down"))
        hidden = swiglu(cfg, einsum(cfg, "d,di->i", row, w_gate), einsum(cfg, "d,di->i", row, w_up))
        return einsum(cfg, "i,id->d", hidden * weight, w_down)  # weighted before w_down, as the official code

    out = jax.lax.map(one, (rows, expert_ids.reshape(-1), weights.reshape(-1)))
    return out.reshape(b, t, k, d).astype(jnp.float32).sum(axis=2)


def decode_strategy(cfg, tokens: int, requested="auto"):
    """The MoE strategy for a cached step over `tokens` tokens: an explicit request is kept; "auto" becomes
    "gather" when those tokens touch fewer expert matrices than there are experts, else stays "auto"."""
    if requested != "auto":
        return requested
    return "gather" if tokens * cfg.experts_per_token < cfg.num_experts else "auto"
