"""Fine-grained MoE (spec §7): sqrt-softplus router with a selection-only bias, hash-routed first layers,
renormalised weights x routed_scaling_factor, clamped SwiGLU experts and one shared expert."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from deepmoe.config import ModelConfig
from deepmoe.layers.precision import einsum, einsum_f32


class Routing(NamedTuple):
    experts: jax.Array  # [B, T, K] int32 chosen experts
    weights: jax.Array  # [B, T, K] float32, renormalised and scaled
    affinities: jax.Array  # [B, T, E] float32 sqrt-softplus scores (differentiable)


def route(params: dict, cfg: ModelConfig, x: jax.Array, token_ids: jax.Array) -> Routing:
    """x [B, T, D] -> Routing. Hash layers look experts up in `tid2eid`; score layers take the top-k of
    affinity + bias, where the bias only steers selection and never the weights."""
    affinities = jnp.sqrt(jax.nn.softplus(einsum_f32("btd,de->bte", x, params["router"])))
    if "tid2eid" in params:
        experts = params["tid2eid"][token_ids].astype(jnp.int32)
    else:
        biased = jax.lax.stop_gradient(affinities) + params["router_bias"].astype(jnp.float32)
        _, experts = jax.lax.top_k(biased, cfg.experts_per_token)
    chosen = jnp.take_along_axis(affinities, experts, axis=-1)
    weights = chosen / (jnp.sum(chosen, axis=-1, keepdims=True) + 1e-20) * cfg.routed_scaling_factor
    return Routing(experts=experts, weights=weights, affinities=affinities)


def swiglu(cfg: ModelConfig, gate: jax.Array, up: jax.Array) -> jax.Array:
    return clamped_swiglu(cfg.swiglu_limit, gate, up)


def clamped_swiglu(limit: float, gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(min(gate, limit)) * clip(up, -limit, limit), in float32."""
    gate = jnp.minimum(gate.astype(jnp.float32), limit)
    return jax.nn.silu(gate) * jnp.clip(up.astype(jnp.float32), -limit, limit)


def shared_expert(params: dict, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    hidden = swiglu(cfg, einsum(cfg, "btd,di->bti", x, params["w_gate"]), einsum(cfg, "btd,di->bti", x, params["w_up"]))
    return einsum(cfg, "bti,id->btd", hidden, params["w_down"])


def router_stats(cfg: ModelConfig, routing: Routing) -> dict[str, jax.Array]:
    """Per-sequence statistics training needs: token counts per expert and the mean normalised affinity."""
    counts = jnp.sum(jax.nn.one_hot(routing.experts, cfg.num_experts, dtype=jnp.float32), axis=(1, 2))  # [B, E]
    normalised = routing.affinities / jnp.sum(routing.affinities, axis=-1, keepdims=True)
    return {"expert_counts": counts, "mean_affinity": jnp.mean(normalised, axis=1)}


EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")  # the routed experts' matrices, [E, ...] each


def per_expert(experts: dict) -> bool:
    """Whether routed-expert weights are tuples of per-expert arrays (the inference layout of
    `params.unstack_layers`) rather than [E, ...] stacks."""
    return isinstance(experts["w_gate"], (tuple, list))


def expert_matrices(experts: dict) -> list[tuple]:
    """Per-expert layout -> [(w_gate, w_up, w_down) of expert 0, of expert 1, ...]."""
    return list(zip(*(experts[name] for name in EXPERT_WEIGHTS)))


def moe(params: dict, cfg: ModelConfig, x: jax.Array, token_ids: jax.Array, strategy: str = "sorted"
        ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """x [B, T, D] -> (y [B, T, D], router statistics)."""
    from deepmoe.moe_dispatch import run_experts

    routing = route(params, cfg, x, token_ids)
    routed = run_experts(strategy, params["experts"], cfg, x, routing.experts, routing.weights)
    y = routed.astype(jnp.float32) + shared_expert(params["shared"], cfg, x).astype(jnp.float32)
    return y.astype(x.dtype), router_stats(cfg, routing)
