"""Flash-style attention over ONE shared key=value head with positional visibility (shared kernel core).

Used by window attention (keys = tokens, key position = token index, sliding window) and by the dense (HCA)
part of compressed attention (keys = compressed entries, key position = entry end index, no window).

Visibility of key s for query token t: ``kpos[s] <= t``, ``kpos[s] > t - window`` (when a window is given) and
equal segment ids. Key positions must be non-decreasing along the key axis: the loop bounds of each tile come
from a binary search over them (the mask alone decides correctness, the bounds only skip work).

Layout: the H query heads share the single K=V head (MQA), so a query tile is ``tq`` tokens x all H heads =
``tq*H`` rows of ``[B, T*H, D]`` (a free reshape of [B, T, H, D]); each key tile is loaded once for all heads.
Nothing of size [T, S] is ever formed: the forward keeps the online-softmax state (m, l, acc) per row, the
backward recomputes probabilities from the saved log-sum-exp. Grid programs never share an output tile, which
is what Triton's parallel grid requires: dq is computed per query tile, dk=dv per key tile.

A per-head sink logit enters only the denominator; it is simply the initial state (m = sink, l = 1, acc = 0).
Without a sink the partial result of a row with no visible key is o = 0, lse = -inf (callers merge partials).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import NEG_INF, PAD_POS, Plan, cdiv, next_pow2, pad_axis

_CONTRACT_LAST = (((1,), (1,)), ((), ()))  # a @ b.T
_CONTRACT_FIRST = (((0,), (0,)), ((), ()))  # a.T @ b


def _visible(qpos, qseg, kpos, kseg, window):
    vis = (kpos[None, :] <= qpos[:, None]) & (qseg[:, None] == kseg[None, :])
    if window is not None:
        vis &= kpos[None, :] > qpos[:, None] - window
    return vis


def _fwd_kernel(lo_ref, hi_ref, q_ref, k_ref, kpos_ref, kseg_ref, qseg_ref, sink_ref, o_ref, lse_ref, *,
                heads, tk, window, scale, has_sink):
    i = pl.program_id(1)
    rows, _ = q_ref.shape
    tq = rows // heads
    local = jnp.arange(rows, dtype=jnp.int32) // heads
    qpos = i * tq + local
    qseg = qseg_ref[local]
    q = q_ref[...]
    if has_sink:
        m0 = sink_ref[jnp.arange(rows, dtype=jnp.int32) % heads]
        l0 = jnp.ones((rows,), jnp.float32)
    else:
        m0 = jnp.full((rows,), NEG_INF, jnp.float32)
        l0 = jnp.zeros((rows,), jnp.float32)

    def body(kb, carry):
        m, l, acc = carry
        k = k_ref[pl.ds(kb * tk, tk), :]
        s = lax.dot_general(q, k, _CONTRACT_LAST, preferred_element_type=jnp.float32) * scale
        vis = _visible(qpos, qseg, kpos_ref[pl.ds(kb * tk, tk)], kseg_ref[pl.ds(kb * tk, tk)], window)
        s = jnp.where(vis, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + jnp.dot(p.astype(k.dtype), k, preferred_element_type=jnp.float32)
        return m_new, l, acc

    init = (m0, l0, jnp.zeros(o_ref.shape, jnp.float32))
    m, l, acc = lax.fori_loop(lo_ref[i], hi_ref[i], body, init)
    o_ref[...] = (acc / jnp.where(l > 0, l, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)


def _dq_kernel(lo_ref, hi_ref, q_ref, k_ref, kpos_ref, kseg_ref, qseg_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               heads, tk, window, scale):
    i = pl.program_id(1)
    rows, _ = q_ref.shape
    local = jnp.arange(rows, dtype=jnp.int32) // heads
    qpos = i * (rows // heads) + local
    qseg = qseg_ref[local]
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

    def body(kb, dq):
        k = k_ref[pl.ds(kb * tk, tk), :]
        s = lax.dot_general(q, k, _CONTRACT_LAST, preferred_element_type=jnp.float32) * scale
        vis = _visible(qpos, qseg, kpos_ref[pl.ds(kb * tk, tk)], kseg_ref[pl.ds(kb * tk, tk)], window)
        p = jnp.where(vis, jnp.exp(s - lse[:, None]), 0.0)
        dp = lax.dot_general(do, k, _CONTRACT_LAST, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[:, None])
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    dq = lax.fori_loop(lo_ref[i], hi_ref[i], body, jnp.zeros(dq_ref.shape, jnp.float32))
    dq_ref[...] = dq * scale


def _dkv_kernel(lo_ref, hi_ref, k_ref, kpos_ref, kseg_ref, q_ref, qseg_ref, do_ref, lse_ref, delta_ref, dk_ref, *,
                heads, tq, window, scale):
    j = pl.program_id(1)
    rows = tq * heads
    k, kpos, kseg = k_ref[...], kpos_ref[...], kseg_ref[...]
    local = jnp.arange(rows, dtype=jnp.int32) // heads

    def body(qt, carry):
        dk, dv = carry
        r = pl.ds(qt * rows, rows)
        q, do, lse, delta = q_ref[r, :], do_ref[r, :], lse_ref[r], delta_ref[r]
        qpos = qt * tq + local
        s = lax.dot_general(q, k, _CONTRACT_LAST, preferred_element_type=jnp.float32) * scale
        p = jnp.where(_visible(qpos, qseg_ref[qpos], kpos, kseg, window), jnp.exp(s - lse[:, None]), 0.0)
        dp = lax.dot_general(do, k, _CONTRACT_LAST, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[:, None])
        dk = dk + lax.dot_general(ds.astype(q.dtype), q, _CONTRACT_FIRST, preferred_element_type=jnp.float32)
        dv = dv + lax.dot_general(p.astype(do.dtype), do, _CONTRACT_FIRST, preferred_element_type=jnp.float32)
        return dk, dv

    zeros = jnp.zeros(dk_ref.shape, jnp.float32)
    dk, dv = lax.fori_loop(lo_ref[j], hi_ref[j], body, (zeros, zeros))
    dk_ref[...] = dk * scale + dv  # keys are the values: one gradient


class _Layout:
    """Padded sizes: heads and head_dim to powers of two, T and S to whole tiles."""

    def __init__(self, q_shape, s_len, block_q, block_k, plan: Plan):
        b, t, h, d = q_shape
        self.b, self.t, self.h, self.d, self.s = b, t, h, d, s_len
        self.hp = next_pow2(h)
        self.dp = max(next_pow2(d), plan.min_dot_dim)
        rows_min = cdiv(plan.min_dot_dim, self.hp)  # Triton: >= 16 rows per tile
        self.tq = max(min(next_pow2(block_q), next_pow2(t)), next_pow2(rows_min))
        self.tk = max(min(next_pow2(block_k), next_pow2(max(s_len, 1))), plan.min_dot_dim)
        self.nqt, self.nkt = cdiv(t, self.tq), cdiv(max(s_len, 1), self.tk)
        self.tp, self.sp = self.nqt * self.tq, self.nkt * self.tk
        self.num_warps = 8 if self.dp >= 256 else 4  # wide heads: more threads for the [rows, D] accumulator

    def rows(self, x, fill=0):  # [B, T, H, ...] -> [B, Tp*Hp, ...]
        x = pad_axis(pad_axis(x, 1, self.tp, fill), 2, self.hp, fill)
        if x.ndim == 4:
            x = pad_axis(x, 3, self.dp)
        return x.reshape(self.b, self.tp * self.hp, *x.shape[3:])

    def unrows(self, x):  # [B, Tp*Hp, ...] -> [B, T, H, ...]
        x = x.reshape(self.b, self.tp, self.hp, *x.shape[2:])[:, : self.t, : self.h]
        return x[..., : self.d] if x.ndim == 4 else x

    def keys(self, keys, kpos, kseg):
        keys = pad_axis(pad_axis(keys, 1, self.sp), 2, self.dp)
        return keys, pad_axis(kpos, 1, self.sp, PAD_POS), pad_axis(kseg, 1, self.sp, -1)


def _query_tile_bounds(kpos, lay: _Layout, window):
    """Key-tile range [lo, hi) per (batch, query tile): keys with t0 - window < kpos <= t1 - 1."""
    t0 = jnp.arange(lay.nqt, dtype=jnp.int32) * lay.tq
    last = jnp.minimum(t0 + lay.tq, lay.t) - 1
    count = jax.vmap(lambda kp: jnp.searchsorted(kp, last, side="right"))(kpos)
    first = 0 if window is None else jax.vmap(lambda kp: jnp.searchsorted(kp, t0 - window, side="right"))(kpos)
    lo = (first // lay.tk) * jnp.ones_like(count)
    hi = jnp.maximum((count + lay.tk - 1) // lay.tk, lo)
    return lo.astype(jnp.int32), hi.astype(jnp.int32)


def _key_tile_bounds(kpos, lay: _Layout, window):
    """Query-tile range [lo, hi) per (batch, key tile): query tokens t with kmin <= t < kmax + window, t < T."""
    tiles = kpos.reshape(lay.b, lay.nkt, lay.tk)
    kmin = tiles[..., 0]
    kmax = jnp.max(jnp.where(tiles < PAD_POS, tiles, -1), axis=-1)
    nq = cdiv(lay.t, lay.tq)
    lo = jnp.minimum(kmin // lay.tq, nq)
    hi = jnp.full_like(lo, nq) if window is None else jnp.minimum(nq, (kmax + window + lay.tq - 1) // lay.tq)
    hi = jnp.where(kmax >= 0, jnp.maximum(hi, lo), lo)
    return lo.astype(jnp.int32), hi.astype(jnp.int32)


def _segments(seg, b, n):
    return jnp.zeros((b, n), jnp.int32) if seg is None else seg.astype(jnp.int32)


def flash_forward(q, keys, kpos, sinks, *, qseg=None, kseg=None, window, scale, block_q, block_k, plan: Plan):
    """q [B, T, H, D], keys [B, S, D], kpos [B, S] i32, sinks [H] f32 or None -> (o [B, T, H, D], lse [B, T, H])."""
    lay = _Layout(q.shape, keys.shape[1], block_q, block_k, plan)
    qseg, kseg = _segments(qseg, lay.b, lay.t), _segments(kseg, lay.b, lay.s)
    keys_p, kpos_p, kseg_p = lay.keys(keys, kpos.astype(jnp.int32), kseg)
    lo, hi = _query_tile_bounds(kpos_p, lay, window)
    has_sink = sinks is not None
    sinks_p = pad_axis(sinks.astype(jnp.float32) if has_sink else jnp.zeros((lay.h,), jnp.float32), 0, lay.hp)
    rows = lay.tq * lay.hp
    per_b = lambda n: pl.BlockSpec((None, n), lambda b, i: (b, 0))
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, heads=lay.hp, tk=lay.tk, window=window, scale=scale, has_sink=has_sink),
        grid=(lay.b, lay.nqt),
        in_specs=[per_b(lay.nqt), per_b(lay.nqt),
                  pl.BlockSpec((None, rows, lay.dp), lambda b, i: (b, i, 0)),
                  pl.BlockSpec((None, lay.sp, lay.dp), lambda b, i: (b, 0, 0)),
                  per_b(lay.sp), per_b(lay.sp),
                  pl.BlockSpec((None, lay.tq), lambda b, i: (b, i)),
                  pl.BlockSpec((lay.hp,), lambda b, i: (0,))],
        out_specs=[pl.BlockSpec((None, rows, lay.dp), lambda b, i: (b, i, 0)),
                   pl.BlockSpec((None, rows), lambda b, i: (b, i))],
        out_shape=[jax.ShapeDtypeStruct((lay.b, lay.tp * lay.hp, lay.dp), q.dtype),
                   jax.ShapeDtypeStruct((lay.b, lay.tp * lay.hp), jnp.float32)],
        interpret=plan.interpret,
        compiler_params=plan.compiler_params(lay.num_warps),
        name="flash_shared_kv_fwd",
    )(lo, hi, lay.rows(q), keys_p, kpos_p, kseg_p, pad_axis(qseg, 1, lay.tp, -2), sinks_p)
    return lay.unrows(o), lay.unrows(lse)


def flash_backward(q, keys, kpos, do, lse, delta, *, qseg=None, kseg=None, window, scale, block_q, block_k,
                   plan: Plan):
    """Gradients given the TOTAL softmax statistics of each query row (so partial key sets can be summed).

    q, do [B, T, H, D]; keys [B, S, D]; kpos [B, S]; lse, delta = rowsum(do * o) [B, T, H]
    -> (dq [B, T, H, D] f32, dkeys [B, S, D] f32).
    """
    lay = _Layout(q.shape, keys.shape[1], block_q, block_k, plan)
    qseg, kseg = _segments(qseg, lay.b, lay.t), _segments(kseg, lay.b, lay.s)
    keys_p, kpos_p, kseg_p = lay.keys(keys, kpos.astype(jnp.int32), kseg)
    qseg_p = pad_axis(qseg, 1, lay.tp, -2)
    # Padded rows: lse 0 and do = 0 make their probabilities finite and their gradients zero.
    q_r, do_r, lse_r, delta_r = lay.rows(q), lay.rows(do.astype(q.dtype)), lay.rows(lse), lay.rows(delta)
    rows = lay.tq * lay.hp
    per_b = lambda n: pl.BlockSpec((None, n), lambda b, i: (b, 0))
    row_tile = pl.BlockSpec((None, rows, lay.dp), lambda b, i: (b, i, 0))
    row_vec = pl.BlockSpec((None, rows), lambda b, i: (b, i))
    common = dict(interpret=plan.interpret, compiler_params=plan.compiler_params(lay.num_warps))

    lo, hi = _query_tile_bounds(kpos_p, lay, window)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, heads=lay.hp, tk=lay.tk, window=window, scale=scale),
        grid=(lay.b, lay.nqt),
        in_specs=[per_b(lay.nqt), per_b(lay.nqt), row_tile,
                  pl.BlockSpec((None, lay.sp, lay.dp), lambda b, i: (b, 0, 0)),
                  per_b(lay.sp), per_b(lay.sp), pl.BlockSpec((None, lay.tq), lambda b, i: (b, i)),
                  row_tile, row_vec, row_vec],
        out_specs=row_tile,
        out_shape=jax.ShapeDtypeStruct((lay.b, lay.tp * lay.hp, lay.dp), jnp.float32),
        name="flash_shared_kv_dq", **common,
    )(lo, hi, q_r, keys_p, kpos_p, kseg_p, qseg_p, do_r, lse_r, delta_r)

    qlo, qhi = _key_tile_bounds(kpos_p, lay, window)
    all_rows = lay.tp * lay.hp
    key_tile = lambda *shape: pl.BlockSpec((None, lay.tk, *shape), lambda b, j: (b, j) + (0,) * len(shape))
    dkeys = pl.pallas_call(
        functools.partial(_dkv_kernel, heads=lay.hp, tq=lay.tq, window=window, scale=scale),
        grid=(lay.b, lay.nkt),
        in_specs=[per_b(lay.nkt), per_b(lay.nkt), key_tile(lay.dp), key_tile(), key_tile(),
                  pl.BlockSpec((None, all_rows, lay.dp), lambda b, j: (b, 0, 0)), per_b(lay.tp),
                  pl.BlockSpec((None, all_rows, lay.dp), lambda b, j: (b, 0, 0)), per_b(all_rows), per_b(all_rows)],
        out_specs=key_tile(lay.dp),
        out_shape=jax.ShapeDtypeStruct((lay.b, lay.sp, lay.dp), jnp.float32),
        name="flash_shared_kv_dkv", **common,
    )(qlo, qhi, keys_p, kpos_p, kseg_p, q_r, qseg_p, do_r, lse_r, delta_r)
    return lay.unrows(dq), dkeys[:, : lay.s, : lay.d]
