"""Dropless MoE: sort token copies by expert, grouped matmuls, unsort, combine.

The grouped matmul is `pallas_kernels.gmm` where cfg.kernels let the Pallas kernels run, else
`jax.lax.ragged_dot`. Only TPU lowers ragged_dot to a grouped matmul: XLA:GPU (without its experimental cuDNN
fusion) and XLA:CPU expand it into a dense product over every group, a group-masked copy of the rows per expert
contracted against all E matrices: E times the FLOPs, and for the weight gradients both operands expanded.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import pallas_kernels as pk

from deepmoe.layers.kernels import native_pallas, use_pallas_kernels
from deepmoe.layers.moe import swiglu
from deepmoe.layers.precision import compute_dtype


def grouped_matmul(cfg, lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """lhs [M, K] (rows sorted by group) x rhs [G, K, N] -> [M, N] in the compute dtype; rows past
    sum(group_sizes) give zeros."""
    dtype = compute_dtype(cfg)
    impl = "pallas" if use_pallas_kernels(cfg) else "reference"
    if impl == "reference" and native_pallas():
        warnings.warn(f"the MoE's grouped matmul runs as lax.ragged_dot on GPU, which XLA expands into a product over "
                      f"all {rhs.shape[0]} experts' matrices ({rhs.shape[0]}x the FLOPs): set kernels='auto' (the "
                      "Pallas grouped matmul), or on one device moe_strategy='blocked'", stacklevel=2)
    return pk.gmm(lhs.astype(dtype), rhs.astype(dtype), group_sizes, impl=impl)


def run(params: dict, cfg, x: jax.Array, expert_ids: jax.Array, weights: jax.Array) -> jax.Array:
    b, t, d = x.shape
    k = expert_ids.shape[-1]
    flat_experts = expert_ids.reshape(-1)  # [B*T*K]
    order = jnp.argsort(flat_experts, stable=True)
    token_of_copy = order // k
    group_sizes = jnp.bincount(flat_experts, length=cfg.num_experts).astype(jnp.int32)
    rows = x.reshape(b * t, d).astype(compute_dtype(cfg))[token_of_copy]  # [B*T*K, D] sorted by expert

    def grouped(lhs, rhs):
        return grouped_matmul(cfg, lhs, rhs, group_sizes)

    hidden = swiglu(cfg, grouped(rows, params["w_gate"]), grouped(rows, params["w_up"]))
    hidden = hidden * weights.reshape(-1)[order][:, None]
    out_sorted = grouped(hidden, params["w_down"]).astype(jnp.float32)
    inverse = jnp.argsort(order)
    return out_sorted[inverse].reshape(b, t, k, d).sum(axis=2)
