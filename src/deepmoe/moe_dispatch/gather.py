"""A decode-time MoE execution strategy: gather each token's K experts' weights and apply them directly.

With few tokens (decode: B x S tokens, S = 1 or 2) it reads only the chosen experts' weights, B*S*K expert
matrices instead of all E of them (`dense`) or XLA:CPU's slow `ragged_dot` (`sorted`). Once B*S*K approaches
E, reading every expert once (`sorted`) is cheaper; `decode_strategy` makes that choice for cached steps.
Over per-expert weight arrays (`params.unstack_layers` on CPU) each chosen expert is a `lax.switch` branch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from deepmoe.layers.moe import EXPERT_WEIGHTS, expert_matrices, per_expert, swiglu
from deepmoe.layers.precision import einsum


def run(params: dict, cfg, x: jax.Array, expert_ids: jax.Array, weights: jax.Array) -> jax.Array:
    b, t, d = x.shape
    k = expert_ids.shape[-1]
    rows = x.reshape(b * t, d)
    flat_ids, flat_weights = expert_ids.reshape(b * t, k), weights.reshape(b * t, k)
    out = []
    # One matvec per (token, chosen expert), unrolled (decode_strategy keeps their number below E): each expert
    # is sliced straight out of the weights, and inside the scan over layers XLA folds that slice into the
    # layer's, so only the chosen matrices are read. Gathering [B, T, K, D, I] up front made a transposed copy
    # of each (decode MoE 2.3x slower); a lax.map over the pairs made the scan copy every layer's whole
    # expert stack (small: 80 % of the decode step).
    # Per-expert arrays (params.unstack_layers): a lax.switch picks the expert and its branch reads the matrices
    # in place, where the slice out of a stack is a copy on XLA:CPU (small decode 81 -> 96 tok/s).
    split = per_expert(params)
    branches = [functools.partial(_expert, cfg, *matrices) for matrices in expert_matrices(params)] if split else []
    for n in range(b * t):
        total = jnp.zeros((d,), jnp.float32)
        for j in range(k):
            if split:
                total = total + jax.lax.switch(flat_ids[n, j], branches, rows[n], flat_weights[n, j])
            else:
                chosen = (jax.lax.dynamic_index_in_dim(params[name], flat_ids[n, j], keepdims=False)
                          for name in EXPERT_WEIGHTS)
                total = total + _expert(cfg, *chosen, rows[n], flat_weights[n, j])
        out.append(total)
    return jnp.stack(out).reshape(b, t, d)


def _expert(cfg, w_gate, w_up, w_down, row, weight):
    """One token row through one expert, scaled by its routing weight -> [D] float32."""
    hidden = swiglu(cfg, einsum(cfg, "d,di->i", row, w_gate), einsum(cfg, "d,di->i", row, w_up))
    # weighted before w_down, as the official code does
    return einsum(cfg, "i,id->d", hidden * weight, w_down).astype(jnp.float32)


def decode_strategy(cfg, tokens: int, requested="auto"):
    """The MoE strategy for a cached step over `tokens` tokens: an explicit request is kept; "auto" becomes
    "gather" when those tokens touch fewer expert matrices than there are experts, else stays "auto"."""
    if requested != "auto":
        return requested
    return "gather" if tokens * cfg.experts_per_token < cfg.num_experts else "auto"
