"""Lightning indexer (DeepSeek-V4 CSA): scores over compressed entries and a streaming top-k.

    I[t, s] = sum_h w[t, h] * relu(q[t, h] . k[s]) * scale        entry s visible to t iff end_idx[s] <= t
    selected(t) = TopK_s I[t, :]   (at most #visible entries; ties -> lower index, as lax.top_k)

``indexer_scores`` returns the dense [B, T, N] scores (-inf where hidden). ``indexer_topk`` never forms them:
each query tile streams over entry tiles and keeps a running top-k set per row. A new entry can only enter if
it beats the current minimum (entries arrive in index order, so on equal values the older, lower index
stays); per entry tile the kernel runs as many insertion steps as the most demanding row needs, which is small
once the running minimum is high. The selection gets no gradient (spec 6.7).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import PAD_POS, Impl, cdiv, next_pow2, pad_axis, plan

_CONTRACT_LAST = (((1,), (1,)), ((), ()))
_HIGHEST = jax.lax.Precision.HIGHEST


def _segments(seg, shape):
    return jnp.zeros(shape, jnp.int32) if seg is None else seg.astype(jnp.int32)


def indexer_scores_reference(q, w, k, end_idx, *, scale=None, segment_ids=None, entry_segment_ids=None):
    """q [B, T, Hi, d], w [B, T, Hi], k [B, N, d], end_idx [B, N] -> scores [B, T, N] f32 (-inf = hidden)."""
    b, t, _, d = q.shape
    scale = d**-0.5 if scale is None else scale
    dots = jnp.einsum("bthd,bnd->bthn", q.astype(jnp.float32), k.astype(jnp.float32), precision=_HIGHEST)
    scores = jnp.einsum("bth,bthn->btn", w.astype(jnp.float32), jax.nn.relu(dots), precision=_HIGHEST) * scale
    qseg, eseg = _segments(segment_ids, (b, t)), _segments(entry_segment_ids, end_idx.shape)
    vis = (end_idx[:, None, :] <= jnp.arange(t)[None, :, None]) & (qseg[:, :, None] == eseg[:, None, :])
    return jnp.where(vis, scores, -jnp.inf)


def indexer_topk_reference(q, w, k, end_idx, *, top_k, scale=None, segment_ids=None, entry_segment_ids=None):
    """Dense scores + lax.top_k -> (indices [B, T, top_k] i32 with -1 where invalid, valid [B, T, top_k])."""
    scores = indexer_scores_reference(q, w, k, end_idx, scale=scale, segment_ids=segment_ids,
                                      entry_segment_ids=entry_segment_ids)
    scores = pad_axis(lax.stop_gradient(scores), 2, max(top_k, scores.shape[2]), -jnp.inf)
    vals, idx = lax.top_k(scores, top_k)
    valid = vals > -jnp.inf
    return jnp.where(valid, idx, -1).astype(jnp.int32), valid


def _tile_scores(q_ref, w_ref, kblk, scale):
    """Scores of a query tile against an entry tile: [tq, tn] f32, one head at a time (no [tq, H, tn])."""
    tq, heads, _ = q_ref.shape

    def head(h, acc):
        s = lax.dot_general(q_ref[:, h, :], kblk, _CONTRACT_LAST, preferred_element_type=jnp.float32)
        return acc + w_ref[:, h].astype(jnp.float32)[:, None] * jnp.maximum(s, 0.0)

    return lax.fori_loop(0, heads, head, jnp.zeros((tq, kblk.shape[0]), jnp.float32)) * scale


def _visible(end, eseg, qpos, qseg):
    return (end[None, :] <= qpos[:, None]) & (eseg[None, :] == qseg[:, None])


def _scores_kernel(q_ref, w_ref, k_ref, end_ref, eseg_ref, qseg_ref, o_ref, *, scale):
    i = pl.program_id(1)
    tq = q_ref.shape[0]
    s = _tile_scores(q_ref, w_ref, k_ref[...], scale)
    vis = _visible(end_ref[...], eseg_ref[...], i * tq + jnp.arange(tq, dtype=jnp.int32), qseg_ref[...])
    o_ref[...] = jnp.where(vis, s, -jnp.inf)


def _topk_kernel(hi_ref, q_ref, w_ref, k_ref, end_ref, eseg_ref, qseg_ref, val_ref, idx_ref, *, top_k, tn, scale):
    i = pl.program_id(1)
    tq = q_ref.shape[0]
    kp = val_ref.shape[1]
    qpos = i * tq + jnp.arange(tq, dtype=jnp.int32)
    qseg = qseg_ref[...]
    slot = jnp.arange(kp, dtype=jnp.int32)[None, :]
    # Slots past top_k (power-of-two padding) hold +inf so they are never the minimum; empty slots hold -inf
    # with distinct negative indices so exactly one slot is replaced per insertion.
    vals = jnp.broadcast_to(jnp.where(slot < top_k, -jnp.inf, jnp.inf), (tq, kp)).astype(jnp.float32)
    idxs = jnp.broadcast_to(-1 - slot, (tq, kp))

    def block(nb, carry):
        vals, idxs = carry
        n0 = nb * tn
        s = _tile_scores(q_ref, w_ref, k_ref[pl.ds(n0, tn), :], scale)
        s = jnp.where(_visible(end_ref[pl.ds(n0, tn)], eseg_ref[pl.ds(n0, tn)], qpos, qseg), s, -jnp.inf)
        entry = n0 + jnp.arange(tn, dtype=jnp.int32)[None, :]
        above = jnp.sum(jnp.where(s > jnp.min(vals, axis=1, keepdims=True), 1, 0), axis=1)
        steps = jnp.minimum(jnp.max(above), top_k)

        def insert(_, c):
            vals, idxs, s = c
            best = jnp.max(s, axis=1, keepdims=True)
            best_idx = jnp.min(jnp.where(s == best, entry, PAD_POS), axis=1, keepdims=True)
            low = jnp.min(vals, axis=1, keepdims=True)
            evict = jnp.max(jnp.where(vals == low, idxs, -PAD_POS), axis=1, keepdims=True)
            take = best > low
            hit = (vals == low) & (idxs == evict) & take
            s = jnp.where((entry == best_idx) & take, -jnp.inf, s)
            return jnp.where(hit, best, vals), jnp.where(hit, best_idx, idxs), s

        vals, idxs, _ = lax.fori_loop(0, steps, insert, (vals, idxs, s))
        return vals, idxs

    vals, idxs = lax.fori_loop(0, hi_ref[i], block, (vals, idxs))
    val_ref[...] = vals
    idx_ref[...] = idxs


class _Layout:
    def __init__(self, q, k, block_q, block_n, p):
        self.b, self.t, self.h, self.d = q.shape
        self.n = k.shape[1]
        self.dp = max(next_pow2(self.d), p.min_dot_dim)
        self.tq = max(min(next_pow2(block_q), next_pow2(self.t)), p.min_dot_dim)
        self.tn = max(min(next_pow2(block_n), next_pow2(max(self.n, 1))), p.min_dot_dim)
        self.tp, self.np = cdiv(self.t, self.tq) * self.tq, cdiv(max(self.n, 1), self.tn) * self.tn

    def inputs(self, q, w, k, end_idx, segment_ids, entry_segment_ids):
        q_p = pad_axis(pad_axis(q, 1, self.tp), 3, self.dp)
        w_p = pad_axis(w, 1, self.tp)
        k_p = pad_axis(pad_axis(k, 1, self.np), 2, self.dp)
        end_p = pad_axis(end_idx.astype(jnp.int32), 1, self.np, PAD_POS)
        eseg = pad_axis(_segments(entry_segment_ids, end_idx.shape), 1, self.np, -1)
        qseg = pad_axis(_segments(segment_ids, (self.b, self.t)), 1, self.tp, -2)
        return q_p, w_p, k_p, end_p, eseg, qseg


def _scores_pallas_impl(q, w, k, end_idx, segment_ids, entry_segment_ids, scale, block_q, block_n, interpret,
                        platform):
    p = plan("pallas", interpret, platform)
    lay = _Layout(q, k, block_q, block_n, p)
    qtile = lambda *s: pl.BlockSpec((None, lay.tq, *s), lambda b, i, j: (b, i) + (0,) * len(s))
    ntile = lambda *s: pl.BlockSpec((None, lay.tn, *s), lambda b, i, j: (b, j) + (0,) * len(s))
    out = pl.pallas_call(
        functools.partial(_scores_kernel, scale=scale),
        grid=(lay.b, lay.tp // lay.tq, lay.np // lay.tn),
        in_specs=[qtile(lay.h, lay.dp), qtile(lay.h), ntile(lay.dp), ntile(), ntile(), qtile()],
        out_specs=pl.BlockSpec((None, lay.tq, lay.tn), lambda b, i, j: (b, i, j)),
        out_shape=jax.ShapeDtypeStruct((lay.b, lay.tp, lay.np), jnp.float32),
        interpret=p.interpret, compiler_params=p.compiler_params(), name="indexer_scores",
    )(*lay.inputs(q, w, k, end_idx, segment_ids, entry_segment_ids))
    return out[:, : lay.t, : lay.n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def _scores_pallas(q, w, k, end_idx, segment_ids, entry_segment_ids, scale, block_q, block_n, interpret, platform):
    return _scores_pallas_impl(q, w, k, end_idx, segment_ids, entry_segment_ids, scale, block_q, block_n,
                               interpret, platform)


def _scores_fwd(q, w, k, end_idx, segment_ids, entry_segment_ids, scale, block_q, block_n, interpret, platform):
    out = _scores_pallas_impl(q, w, k, end_idx, segment_ids, entry_segment_ids, scale, block_q, block_n,
                              interpret, platform)
    return out, (q, w, k, end_idx, segment_ids, entry_segment_ids)


def _scores_bwd(scale, block_q, block_n, interpret, platform, res, ct):
    # The output is already [B, T, N], so recomputing through the reference costs no extra asymptotic memory.
    q, w, k, end_idx, seg, eseg = res
    f = lambda q, w, k: indexer_scores_reference(q, w, k, end_idx, scale=scale, segment_ids=seg,
                                                 entry_segment_ids=eseg)
    return (*jax.vjp(f, q, w, k)[1](ct), None, None, None)


_scores_pallas.defvjp(_scores_fwd, _scores_bwd)


def indexer_scores(q: jax.Array, w: jax.Array, k: jax.Array, end_idx: jax.Array, *, scale: float | None = None,
                   segment_ids: jax.Array | None = None, entry_segment_ids: jax.Array | None = None,
                   block_q: int = 32, block_n: int = 64, impl: Impl = "auto",
                   interpret: bool | None = None) -> jax.Array:
    """Dense indexer scores. q [B, T, Hi, d], w [B, T, Hi], k [B, N, d], end_idx [B, N] -> [B, T, N] f32.

    ``scale`` defaults to d**-0.5. Hidden entries (end_idx > t, or other segment) are -inf.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    p = plan(impl, interpret)
    if not p.use_pallas:
        return indexer_scores_reference(q, w, k, end_idx, scale=scale, segment_ids=segment_ids,
                                        entry_segment_ids=entry_segment_ids)
    b, t = q.shape[:2]
    return _scores_pallas(q, w, k, end_idx.astype(jnp.int32), _segments(segment_ids, (b, t)),
                          _segments(entry_segment_ids, end_idx.shape), scale, block_q, block_n, p.interpret, p.platform)


def indexer_topk(q: jax.Array, w: jax.Array, k: jax.Array, end_idx: jax.Array, *, top_k: int,
                 scale: float | None = None, segment_ids: jax.Array | None = None,
                 entry_segment_ids: jax.Array | None = None, block_q: int = 32, block_n: int = 64,
                 impl: Impl = "auto", interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """Top-k entries per query. q [B, T, Hi, d], w [B, T, Hi], k [B, N, d], end_idx [B, N] (non-decreasing)
    -> (indices [B, T, top_k] i32, by descending score, -1 where invalid; valid [B, T, top_k] bool).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    p = plan(impl, interpret)
    kwargs = dict(scale=scale, segment_ids=segment_ids, entry_segment_ids=entry_segment_ids)
    if not p.use_pallas:
        return indexer_topk_reference(q, w, k, end_idx, top_k=top_k, **kwargs)
    q, w, k = (lax.stop_gradient(x) for x in (q, w, k))
    lay = _Layout(q, k, block_q, block_n, p)
    q_p, w_p, k_p, end_p, eseg, qseg = lay.inputs(q, w, k, end_idx, segment_ids, entry_segment_ids)
    nqt = lay.tp // lay.tq
    last = jnp.minimum((jnp.arange(nqt, dtype=jnp.int32) + 1) * lay.tq, lay.t) - 1
    count = jax.vmap(lambda e: jnp.searchsorted(e, last, side="right"))(end_p)  # entries seen by the tile
    hi = ((count + lay.tn - 1) // lay.tn).astype(jnp.int32)
    kp = next_pow2(top_k)
    qtile = lambda *s: pl.BlockSpec((None, lay.tq, *s), lambda b, i: (b, i) + (0,) * len(s))
    per_b = lambda *s: pl.BlockSpec((None, *s), lambda b, i: (b,) + (0,) * len(s))
    vals, idx = pl.pallas_call(
        functools.partial(_topk_kernel, top_k=top_k, tn=lay.tn, scale=scale),
        grid=(lay.b, nqt),
        in_specs=[per_b(nqt), qtile(lay.h, lay.dp), qtile(lay.h), per_b(lay.np, lay.dp), per_b(lay.np),
                  per_b(lay.np), qtile()],
        out_specs=[qtile(kp), qtile(kp)],
        out_shape=[jax.ShapeDtypeStruct((lay.b, lay.tp, kp), jnp.float32),
                   jax.ShapeDtypeStruct((lay.b, lay.tp, kp), jnp.int32)],
        interpret=p.interpret, compiler_params=p.compiler_params(), name="indexer_topk",
    )(hi, q_p, w_p, k_p, end_p, eseg, qseg)
    vals, idx = vals[:, : lay.t, :top_k], idx[:, : lay.t, :top_k]
    # The kernel keeps an unordered set; order it like lax.top_k (score desc, then index asc).
    neg, idx = lax.sort((-vals, idx), dimension=2, num_keys=2)
    valid = neg < jnp.inf
    return jnp.where(valid, idx, -1).astype(jnp.int32), valid
