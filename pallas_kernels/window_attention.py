"""Sliding-window attention with a per-head sink over ONE shared key=value head (DeepSeek-V4 SWA core).

For query token t and head h (spec section 6.8)::

    z_s = (q[t, h] . kv[s]) * D**-0.5          for t - window < s <= t (and same segment id)
    p_s = exp(z_s) / (sum_s' exp(z_s') + exp(sink[h]))
    out[t, h] = sum_s p_s * kv[s]              the keys are also the values

Three implementations with one signature:

* ``window_attention_dense``: the naive O(T^2) oracle (tests, benchmark baseline).
* ``window_attention_reference``: pure jnp, blocked into chunks of ``window`` queries that see the previous and
  their own chunk of keys, so memory is O(T * window * H); autodiff gives the backward. It is the fallback.
* the Pallas kernel (``_flash``): online softmax, never forms [T, T]; custom_vjp with dq and dkv kernels.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp

from pallas_kernels import _flash
from pallas_kernels._common import Impl, cdiv, next_pow2, pad_axis, plan

_HIGHEST = jax.lax.Precision.HIGHEST


def _segments(segment_ids, b, t):
    return jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)


def softmax_with_sink(scores: list[jax.Array], sinks: jax.Array | None) -> list[jax.Array]:
    """One softmax over the concatenation of ``scores`` ([B, T, H, N_i] each, -inf = hidden) plus a sink column.

    Returns the probabilities split like ``scores`` (the sink's own probability is dropped).
    """
    b, t, h = scores[0].shape[:3]
    cols = list(scores)
    if sinks is not None:
        cols.append(jnp.broadcast_to(sinks.astype(jnp.float32)[None, None, :, None], (b, t, h, 1)))
    z = jnp.concatenate(cols, axis=-1)
    m = jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(z - m)
    probs = e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), 1e-30)
    splits = list(itertools.accumulate(s.shape[-1] for s in scores))
    return jnp.split(probs[..., : splits[-1]], splits[:-1], axis=-1)


def blocked_window_scores(q, kv, segment_ids, window, scale):
    """Window scores without [T, T]: chunks of C = min(window, T) queries see keys of the previous + own chunk.

    q [B, T, H, D], kv [B, T, D] -> (scores [B, Tp, H, 2C] f32 with -inf where hidden, keys [B, n, 2C, D] f32)
    with Tp = n * C >= T.
    """
    b, t, h, d = q.shape
    c = min(window, t)
    n = cdiv(t, c)
    tp = n * c
    qc = pad_axis(q.astype(jnp.float32), 1, tp).reshape(b, n, c, h, d)
    own = pad_axis(kv.astype(jnp.float32), 1, tp).reshape(b, n, c, d)
    keys = jnp.concatenate([jnp.pad(own[:, :-1], ((0, 0), (1, 0), (0, 0), (0, 0))), own], axis=2)
    seg = pad_axis(_segments(segment_ids, b, t), 1, tp, -1).reshape(b, n, c)
    kseg = jnp.concatenate([jnp.pad(seg[:, :-1], ((0, 0), (1, 0), (0, 0)), constant_values=-1), seg], axis=2)
    start = jnp.arange(n)[:, None] * c
    qpos = start + jnp.arange(c)[None, :]  # [n, C]
    kpos = start - c + jnp.arange(2 * c)[None, :]  # [n, 2C]
    vis = (kpos[:, None, :] <= qpos[:, :, None]) & (kpos[:, None, :] > qpos[:, :, None] - window)
    vis = vis[None] & (kpos >= 0)[None, :, None, :] & (seg[..., :, None] == kseg[..., None, :])  # [B, n, C, 2C]
    s = jnp.einsum("bnchd,bnkd->bnchk", qc, keys, precision=_HIGHEST) * scale
    s = jnp.where(vis[:, :, :, None, :], s, -jnp.inf)
    return s.reshape(b, tp, h, 2 * c), keys


def blocked_window_apply(probs, keys, t):
    """probs [B, Tp, H, 2C], keys [B, n, 2C, D] -> [B, T, H, D] f32."""
    b, tp, h, c2 = probs.shape
    n = keys.shape[1]
    out = jnp.einsum("bnchk,bnkd->bnchd", probs.reshape(b, n, tp // n, h, c2), keys, precision=_HIGHEST)
    return out.reshape(b, tp, h, -1)[:, :t]


def window_attention_reference(q, kv, sinks, *, window: int, segment_ids=None) -> jax.Array:
    """Blocked pure-jnp window attention. q [B, T, H, D], kv [B, T, D], sinks [H] -> [B, T, H, D]."""
    scale = q.shape[-1] ** -0.5
    scores, keys = blocked_window_scores(q, kv, segment_ids, window, scale)
    (probs,) = softmax_with_sink([scores], sinks)
    return blocked_window_apply(probs, keys, q.shape[1]).astype(q.dtype)


def window_attention_dense(q, kv, sinks, *, window: int, segment_ids=None) -> jax.Array:
    """Naive O(T^2) oracle. q [B, T, H, D], kv [B, T, D], sinks [H] -> [B, T, H, D]."""
    b, t = q.shape[:2]
    s = jnp.einsum("bthd,bsd->bths", q.astype(jnp.float32), kv.astype(jnp.float32), precision=_HIGHEST)
    pos = jnp.arange(t)
    seg = _segments(segment_ids, b, t)
    vis = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)
    vis = vis[None] & (seg[:, :, None] == seg[:, None, :])  # [B, T, T]
    s = jnp.where(vis[:, :, None, :], s * q.shape[-1] ** -0.5, -jnp.inf)
    (probs,) = softmax_with_sink([s], sinks)
    return jnp.einsum("bths,bsd->bthd", probs, kv.astype(jnp.float32), precision=_HIGHEST).astype(q.dtype)


def _token_positions(b, t):
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _window_pallas(q, kv, sinks, seg, window, block_q, block_k, interpret, platform):
    return _window_fwd(q, kv, sinks, seg, window, block_q, block_k, interpret, platform)[0]


def _window_fwd(q, kv, sinks, seg, window, block_q, block_k, interpret, platform):
    b, t = q.shape[:2]
    o, lse = _flash.flash_forward(
        q, kv, _token_positions(b, t), sinks, qseg=seg, kseg=seg, window=window, scale=q.shape[-1] ** -0.5,
        block_q=block_q, block_k=block_k, plan=plan("pallas", interpret, platform))
    return o, (q, kv, sinks, seg, o, lse)


def _window_bwd(window, block_q, block_k, interpret, platform, res, do):
    q, kv, sinks, seg, o, lse = res
    b, t = q.shape[:2]
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)  # [B, T, H]
    dq, dkv = _flash.flash_backward(
        q, kv, _token_positions(b, t), do, lse, delta, qseg=seg, kseg=seg, window=window,
        scale=q.shape[-1] ** -0.5, block_q=block_q, block_k=block_k, plan=plan("pallas", interpret, platform))
    # d out / d sink_h = -p_sink * o, so dL/dsink_h = -sum_t p_sink(t, h) * delta(t, h).
    dsinks = -jnp.sum(jnp.exp(sinks.astype(jnp.float32) - lse) * delta, axis=(0, 1))
    return dq.astype(q.dtype), dkv.astype(kv.dtype), dsinks.astype(sinks.dtype), None


_window_pallas.defvjp(_window_fwd, _window_bwd)


def default_block_q(heads: int) -> int:
    """Query tokens per tile so that a tile holds ~64 (token, head) rows."""
    return max(1, 64 // next_pow2(heads))


def default_block_k(head_dim: int) -> int:
    """Keys per tile: smaller for wide heads (512 in V4) to bound the per-tile working set."""
    return 64 if head_dim <= 128 else 32


def window_attention(
    q: jax.Array,
    kv: jax.Array,
    sinks: jax.Array,
    *,
    window: int,
    segment_ids: jax.Array | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    impl: Impl = "auto",
    interpret: bool | None = None,
) -> jax.Array:
    """Window + sink attention. q [B, T, H, D], kv [B, T, D] (keys = values), sinks [H] -> [B, T, H, D].

    ``window`` counts the query itself (key s visible to t iff t - window < s <= t); ``segment_ids`` [B, T]
    (packed documents) additionally requires equal ids. ``block_q`` (query tokens per tile, default ~64 rows of
    token x head) and ``block_k`` (keys per tile) are Pallas tiles; they do not change results.
    """
    b, t, h, d = q.shape
    if kv.shape != (b, t, d) or sinks.shape != (h,) or window < 1:
        raise ValueError(f"bad shapes q {q.shape}, kv {kv.shape}, sinks {sinks.shape}, window {window}")
    p = plan(impl, interpret)
    if not p.use_pallas:
        return window_attention_reference(q, kv, sinks, window=window, segment_ids=segment_ids)
    seg = _segments(segment_ids, b, t)
    tiles = (block_q or default_block_q(h), block_k or default_block_k(d))
    return _window_pallas(q, kv, sinks, seg, int(window), *tiles, p.interpret, p.platform)
