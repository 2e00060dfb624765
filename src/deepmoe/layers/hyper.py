"""Manifold-constrained hyper-connections (mHC, spec §5), all mixing math in float32.

The residual is `n` parallel streams X [B, T, n, D]. Each sub-block reads a sigmoid-weighted mix of the streams
(`pre`), writes its output into every stream with a gain (`post`), and mixes the streams through a doubly
stochastic matrix (`comb`, Sinkhorn-normalised) so the residual map is non-expansive.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepmoe.config import ModelConfig
from deepmoe.layers.precision import einsum_f32


def mix_logits(params: dict, cfg: ModelConfig, streams: jax.Array) -> jax.Array:
    """Linear(UnweightedRMSNorm(flattened streams)) -> [B, T, outputs] float32."""
    streams = streams.astype(jnp.float32)
    # The mean reduces the streams' own [n, D] axes, not the flattened view the dot reads: with both reading that
    # view, XLA:CPU fused the previous hc_post's sum into every reshaped reader and the train step wrote it four
    # times per sub-block, in four shapes (this way `small`'s train step is 3 % faster).
    inv_rms = jax.lax.rsqrt(jnp.mean(streams * streams, axis=(-2, -1))[..., None] + cfg.rms_norm_eps)
    flat = streams.reshape(*streams.shape[:-2], -1)
    return einsum_f32("...i,io->...o", flat, params["fn"]) * inv_rms


def sinkhorn(logits: jax.Array, iterations: int, eps: float) -> jax.Array:
    """Row softmax, then a column normalisation, then `iterations - 1` (row, column) rounds. [..., n, n]."""
    m = jax.nn.softmax(logits, axis=-1) + eps
    m = m / (m.sum(-2, keepdims=True) + eps)

    def round_(m, _):
        m = m / (m.sum(-1, keepdims=True) + eps)
        return m / (m.sum(-2, keepdims=True) + eps), None

    # A loop, not an unrolled chain: XLA:CPU fuses the unrolled chain into reductions that recompute every earlier
    # round (run time and compile time grow quadratically with the rounds; backward 5x slower at 20 rounds).
    return jax.lax.scan(round_, m, None, length=iterations - 1)[0] if iterations > 1 else m


def _weighted_sum_unrolled(weights: jax.Array, streams: jax.Array) -> jax.Array:
    """out[..., m, :] = sum_j weights[..., j, m] * streams[..., j, :], as n * m multiply-adds."""
    n, m = weights.shape[-2:]
    return jnp.stack([sum(weights[..., j, k, None] * streams[..., j, :] for j in range(n)) for k in range(m)], -2)


# Why not an einsum: it becomes a dot batched over tokens with a 4-long contraction, which XLA:CPU runs as one tiny
# GEMM per token (forward 2x, backward 4x slower than multiply-adds; in the train step its backward took ~3 ms per
# sub-block at small's width). The weights' cotangent contracts over D and stays a dot.
@jax.custom_vjp
def weighted_stream_sum(weights: jax.Array, streams: jax.Array) -> jax.Array:
    """Mix n streams with per-token weights: weights [..., n, m], streams [..., n, D] -> [..., m, D] (float32)."""
    return _weighted_sum_unrolled(weights, streams)


def _weighted_stream_sum_fwd(weights, streams):
    return _weighted_sum_unrolled(weights, streams), (weights, streams)


def _weighted_stream_sum_bwd(residuals, grad):
    weights, streams = residuals
    return (einsum_f32("...jd,...md->...jm", streams, grad),
            _weighted_sum_unrolled(jnp.swapaxes(weights, -1, -2), grad))


weighted_stream_sum.defvjp(_weighted_stream_sum_fwd, _weighted_stream_sum_bwd)


def hc_pre(params: dict, cfg: ModelConfig, streams: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """streams [B,T,n,D] -> (sub-block input [B,T,D], post gains [B,T,n], comb matrix [B,T,n,n])."""
    n = cfg.residual_streams
    mix = mix_logits(params, cfg, streams)
    scale, base = params["scale"].astype(jnp.float32), params["base"].astype(jnp.float32)
    pre = jax.nn.sigmoid(mix[..., :n] * scale[0] + base[:n]) + cfg.hc_eps
    post = 2.0 * jax.nn.sigmoid(mix[..., n:2 * n] * scale[1] + base[n:2 * n])
    comb_logits = (mix[..., 2 * n:] * scale[2] + base[2 * n:]).reshape(*mix.shape[:-1], n, n)
    comb = sinkhorn(comb_logits, cfg.sinkhorn_iterations, cfg.hc_eps)
    x_in = weighted_stream_sum(pre[..., None], streams.astype(jnp.float32))[..., 0, :]
    return x_in.astype(streams.dtype), post, comb


def hc_post(output: jax.Array, streams: jax.Array, post: jax.Array, comb: jax.Array) -> jax.Array:
    """X_new[k] = post[k] * F(x) + sum_j comb[j, k] * X[j]  (the sum runs over comb's first index)."""
    mixed = weighted_stream_sum(comb, streams.astype(jnp.float32))
    new = post[..., None] * output.astype(jnp.float32)[..., None, :] + mixed
    return new.astype(streams.dtype)


def hc_head(params: dict, cfg: ModelConfig, streams: jax.Array) -> jax.Array:
    """Final reduction of the streams: sigmoid-weighted sum, no Sinkhorn. -> [B, T, D]."""
    mix = mix_logits(params, cfg, streams)
    weights = jax.nn.sigmoid(mix * params["scale"].astype(jnp.float32) + params["base"]) + cfg.hc_eps
    return weighted_stream_sum(weights[..., None], streams.astype(jnp.float32))[..., 0, :].astype(streams.dtype)
