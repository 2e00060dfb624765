"""MoE routing: sqrt-softplus scores, biased top-k, renormalised weights, expert-sorted permutation.

DeepSeek-V4 router (spec section 7)::

    s   = sqrt(softplus(logits))                    [T, E] fp32
    idx = TopK(s + bias, k)                          bias only influences the selection
    w   = s[idx] / sum(s[idx]) * routed_scaling_factor

plus what a dropless "sorted" MoE needs: the assignments (token t, slot j), flattened as ``t * k + j``,
stably sorted by expert (``sort_idx``), the number of assignments per expert (``group_sizes``), and the inverse
permutation (``inverse_idx``: flat assignment -> sorted position). Tokens for the sorted rows are
``sort_idx // k``.

The Pallas kernel does the per-token work (scores, top-k, weights) and, per token block, the number of
assignments per expert and each assignment's rank inside its block. A tiny jnp prefix sum over
[num_blocks, E] turns those into global positions (a counting sort), so no argsort over T*k is needed.
Gradients flow to the logits through ``scores`` and ``weights`` (never through the selection).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import Impl, cdiv, next_pow2, pad_axis, plan


class Routing(NamedTuple):
    scores: jax.Array  # [T, E] f32, sqrt(softplus(logits))
    weights: jax.Array  # [T, k] f32, renormalised unbiased scores of the selection * routed_scaling_factor
    expert_idx: jax.Array  # [T, k] i32, selected experts, by descending biased score (ties: lower expert)
    sort_idx: jax.Array  # [T*k] i32, sorted position -> flat assignment t*k+j; expert-major, stable
    group_sizes: jax.Array  # [E] i32, assignments per expert
    inverse_idx: jax.Array  # [T*k] i32, flat assignment t*k+j -> sorted position


def sqrt_softplus(logits: jax.Array) -> jax.Array:
    """[..., E] -> [..., E] f32. Stable softplus written out so the kernel and the reference agree bit-wise."""
    x = logits.astype(jnp.float32)
    return jnp.sqrt(jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x))))


def _weights(scores: jax.Array, expert_idx: jax.Array, routed_scaling_factor: float) -> jax.Array:
    picked = jnp.take_along_axis(scores, expert_idx, axis=-1)
    # 1e-20 as in HF: keeps an all-zero selection finite.
    return picked / (jnp.sum(picked, axis=-1, keepdims=True) + 1e-20) * routed_scaling_factor


def _permutation(expert_idx: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    flat = expert_idx.reshape(-1)
    sort_idx = jnp.argsort(flat, stable=True).astype(jnp.int32)
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    inverse_idx = jnp.zeros_like(sort_idx).at[sort_idx].set(jnp.arange(flat.size, dtype=jnp.int32))
    return sort_idx, group_sizes, inverse_idx


def route_reference(
    logits: jax.Array, bias: jax.Array | None, *, top_k: int, routed_scaling_factor: float = 1.0
) -> Routing:
    """Pure-jnp router. logits [T, E], bias [E] or None -> Routing."""
    scores = sqrt_softplus(logits)
    biased = scores if bias is None else scores + bias.astype(jnp.float32)
    _, expert_idx = lax.top_k(lax.stop_gradient(biased), top_k)
    expert_idx = expert_idx.astype(jnp.int32)
    weights = _weights(scores, expert_idx, routed_scaling_factor)
    return Routing(scores, weights, expert_idx, *_permutation(expert_idx, logits.shape[-1]))


def _route_kernel(logits_ref, bias_ref, scores_ref, idx_ref, w_ref, rank_ref, count_ref, *,
                  top_k, num_tokens, num_experts, routed_scaling_factor):
    bt, ep = logits_ref.shape
    kp = idx_ref.shape[1]
    scores = sqrt_softplus(logits_ref[...])
    scores_ref[...] = scores
    biased = scores + bias_ref[...][None, :]
    expert = jnp.arange(ep, dtype=jnp.int32)[None, :]
    slot = jnp.arange(kp, dtype=jnp.int32)[None, :]
    idx_acc = jnp.full((bt, kp), num_experts, jnp.int32)
    picked_acc = jnp.zeros((bt, kp), jnp.float32)
    hits = []
    # Repeated argmax: k is small (<= 16 in V4) and this is exactly lax.top_k's order and tie rule.
    for j in range(top_k):
        best = jnp.max(biased, axis=1, keepdims=True)
        choice = jnp.min(jnp.where(biased == best, expert, ep), axis=1, keepdims=True)
        hit = expert == choice
        hits.append(hit)
        picked = jnp.sum(jnp.where(hit, scores, 0.0), axis=1, keepdims=True)
        biased = jnp.where(hit, -jnp.inf, biased)
        idx_acc = jnp.where(slot == j, choice, idx_acc)
        picked_acc = jnp.where(slot == j, picked, picked_acc)
    idx_ref[...] = idx_acc
    w_ref[...] = picked_acc / (jnp.sum(picked_acc, axis=1, keepdims=True) + 1e-20) * routed_scaling_factor

    token = pl.program_id(0) * bt + jnp.arange(bt, dtype=jnp.int32)
    valid = (token < num_tokens)[:, None]
    member = jnp.zeros((bt, ep), jnp.float32)
    for hit in hits:
        member = member + jnp.where(hit & valid, 1.0, 0.0)
    # An expert appears at most once per token, so an assignment's rank among same-expert assignments of
    # this block = how many earlier tokens of the block chose it: a strictly-lower-triangular matmul.
    row = jnp.arange(bt, dtype=jnp.int32)
    earlier = jnp.where(row[:, None] > row[None, :], 1.0, 0.0)
    before = jnp.dot(earlier, member, preferred_element_type=jnp.float32)  # [bt, ep], exact small ints
    rank_acc = jnp.zeros((bt, kp), jnp.int32)
    for j, hit in enumerate(hits):
        rank_j = jnp.sum(jnp.where(hit, before, 0.0), axis=1, keepdims=True).astype(jnp.int32)
        rank_acc = jnp.where(slot == j, rank_j, rank_acc)
    rank_ref[...] = rank_acc
    count_ref[...] = jnp.sum(member, axis=0, keepdims=True).astype(jnp.int32)


def _route_pallas_fwd(logits, bias, top_k, routed_scaling_factor, block_tokens, interpret, platform):
    p = plan("pallas", interpret, platform)
    t, e = logits.shape
    ep = max(next_pow2(e), p.min_dot_dim)
    kp = next_pow2(top_k)
    bt = max(min(next_pow2(block_tokens), next_pow2(t)), p.min_dot_dim)
    nb = cdiv(t, bt)
    logits_p = pad_axis(pad_axis(logits.astype(jnp.float32), 0, nb * bt), 1, ep)
    # Padded experts get -inf bias: never selected as long as top_k <= E.
    bias_p = pad_axis(bias.astype(jnp.float32), 0, ep, -jnp.inf)
    kernel = functools.partial(_route_kernel, top_k=top_k, num_tokens=t, num_experts=e,
                               routed_scaling_factor=routed_scaling_factor)
    row_spec = lambda width: pl.BlockSpec((bt, width), lambda i: (i, 0))
    scores, idx, weights, rank, counts = pl.pallas_call(
        kernel,
        grid=(nb,),
        in_specs=[row_spec(ep), pl.BlockSpec((ep,), lambda i: (0,))],
        out_specs=[row_spec(ep), row_spec(kp), row_spec(kp), row_spec(kp),
                   pl.BlockSpec((1, ep), lambda i: (i, 0))],
        out_shape=[jax.ShapeDtypeStruct((nb * bt, ep), jnp.float32),
                   jax.ShapeDtypeStruct((nb * bt, kp), jnp.int32),
                   jax.ShapeDtypeStruct((nb * bt, kp), jnp.float32),
                   jax.ShapeDtypeStruct((nb * bt, kp), jnp.int32),
                   jax.ShapeDtypeStruct((nb, ep), jnp.int32)],
        interpret=p.interpret,
        compiler_params=p.compiler_params(),
        name="moe_route",
    )(logits_p, bias_p)
    scores, idx, weights, rank = scores[:t, :e], idx[:t, :top_k], weights[:t, :top_k], rank[:t, :top_k]
    counts = counts[:, :e]
    # Counting sort: position = start of the expert's group + assignments of that expert in earlier blocks
    # + rank inside this block. Stable in t*k+j order because experts are distinct within a token.
    group_sizes = jnp.sum(counts, axis=0)
    group_start = jnp.cumsum(group_sizes) - group_sizes
    block_start = jnp.cumsum(counts, axis=0) - counts
    offsets = group_start[None, :] + block_start  # [nb, E]
    block_of_token = jnp.arange(t, dtype=jnp.int32) // bt
    inverse_idx = (offsets[block_of_token[:, None], idx] + rank).reshape(-1).astype(jnp.int32)
    sort_idx = jnp.zeros_like(inverse_idx).at[inverse_idx].set(jnp.arange(t * top_k, dtype=jnp.int32))
    return Routing(scores, weights, idx, sort_idx, group_sizes.astype(jnp.int32), inverse_idx)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _route_pallas(logits, bias, top_k, routed_scaling_factor, block_tokens, interpret, platform):
    return _route_pallas_fwd(logits, bias, top_k, routed_scaling_factor, block_tokens, interpret, platform)


def _route_vjp_fwd(logits, bias, top_k, routed_scaling_factor, block_tokens, interpret, platform):
    out = _route_pallas_fwd(logits, bias, top_k, routed_scaling_factor, block_tokens, interpret, platform)
    return out, (logits, bias, out.expert_idx)


def _route_vjp_bwd(top_k, routed_scaling_factor, block_tokens, interpret, platform, res, ct):
    logits, bias, expert_idx = res

    # Backward of the differentiable part only (scores and weights, selection fixed): elementwise over [T, E].
    def differentiable(lg):
        scores = sqrt_softplus(lg)
        return scores, _weights(scores, expert_idx, routed_scaling_factor)

    _, vjp = jax.vjp(differentiable, logits)
    (dlogits,) = vjp((ct.scores, ct.weights))
    return dlogits.astype(logits.dtype), jnp.zeros_like(bias)  # the bias only steers the selection


_route_pallas.defvjp(_route_vjp_fwd, _route_vjp_bwd)


def route(
    logits: jax.Array,
    bias: jax.Array | None = None,
    *,
    top_k: int,
    routed_scaling_factor: float = 1.0,
    block_tokens: int = 128,
    impl: Impl = "auto",
    interpret: bool | None = None,
) -> Routing:
    """Route tokens. logits [T, E] (any float dtype; computed in fp32), bias [E] or None -> Routing.

    ``block_tokens`` is the Pallas token tile (rounded to a power of two); it does not change results.
    """
    if not 1 <= top_k <= logits.shape[-1]:
        raise ValueError(f"top_k={top_k} must be in [1, {logits.shape[-1]}]")
    p = plan(impl, interpret)
    if not p.use_pallas:
        return route_reference(logits, bias, top_k=top_k, routed_scaling_factor=routed_scaling_factor)
    if bias is None:
        bias = jnp.zeros((logits.shape[-1],), jnp.float32)
    return _route_pallas(logits, bias, top_k, float(routed_scaling_factor), block_tokens, p.interpret, p.platform)
