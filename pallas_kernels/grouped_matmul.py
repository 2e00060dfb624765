"""Grouped (ragged) expert matmul: lhs [M, K] with rows sorted by group x rhs [G, K, N] -> [M, N].

Rows ``[offset[g], offset[g] + group_sizes[g])`` are multiplied by ``rhs[g]``; rows past ``sum(group_sizes)``
give zeros (as ``jax.lax.ragged_dot``, the reference). Backward (custom_vjp):

* ``dlhs = gmm(dout, rhs^T)``                      same kernel, transposed rhs
* ``drhs[g] = lhs[rows of g]^T @ dout[rows of g]``  the "tgmm" kernel

Kernel layout (the idea of megablox's gmm, written so that every output tile has exactly one writer, which is
what Triton's parallel grid needs): the forward grid is (m tiles, n tiles); each program loops over the groups
that intersect its m tile (precomputed bounds) and over K in chunks, masking the rows of other groups. A tile
that straddles a group boundary is multiplied once per group, so the waste is bounded by G extra tiles. tgmm's
grid is (G, k tiles, n tiles); each program loops over the m tiles of its group.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import Impl, block_size, cdiv, pad_axis, plan

Tiling = tuple[int, int, int]  # (tm, tk, tn)


def gmm_reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array,
                  preferred_element_type: jnp.dtype | None = None) -> jax.Array:
    """lhs [M, K], rhs [G, K, N], group_sizes [G] -> [M, N] via jax.lax.ragged_dot (fp32 accumulation)."""
    out_dtype = preferred_element_type or lhs.dtype
    out = lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32), preferred_element_type=jnp.float32)
    return out.astype(out_dtype)


def _group_offsets(group_sizes: jax.Array) -> jax.Array:
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    return jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])  # [G + 1]


def _gmm_kernel(offsets_ref, lo_ref, hi_ref, lhs_ref, rhs_ref, out_ref, *, tk, num_k):
    i = pl.program_id(0)
    tm, tn = out_ref.shape
    row = i * tm + jnp.arange(tm, dtype=jnp.int32)

    def group_body(g, acc):
        start, end = offsets_ref[g], offsets_ref[g + 1]

        def k_body(kk, part):
            a = lhs_ref[:, pl.ds(kk * tk, tk)]
            b = rhs_ref[g, pl.ds(kk * tk, tk), :]
            return part + jnp.dot(a, b, preferred_element_type=jnp.float32)

        part = lax.fori_loop(0, num_k, k_body, jnp.zeros((tm, tn), jnp.float32))
        in_group = (row >= start) & (row < end)
        return acc + jnp.where(in_group[:, None], part, 0.0)

    acc = lax.fori_loop(lo_ref[i], hi_ref[i], group_body, jnp.zeros((tm, tn), jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


def _gmm_pallas(lhs, rhs, group_sizes, out_dtype, tiling, interpret, platform):
    """Forward kernel. lhs [M, K], rhs [G, K, N] -> [M, N] in out_dtype."""
    p = plan("pallas", interpret, platform)
    (m, k), (g, _, n) = lhs.shape, rhs.shape
    tm, tk, tn = (block_size(b, d, p.min_dot_dim) for b, d in zip(tiling, (m, k, n)))
    mp, kp, np_ = cdiv(m, tm) * tm, cdiv(k, tk) * tk, cdiv(n, tn) * tn
    lhs_p = pad_axis(pad_axis(lhs, 0, mp), 1, kp)
    rhs_p = pad_axis(pad_axis(rhs, 1, kp), 2, np_)
    offsets = _group_offsets(group_sizes)
    tile_start = jnp.arange(mp // tm, dtype=jnp.int32) * tm
    # Groups intersecting tile [a, a+tm): skip those ending at or before a and those starting at or after a+tm.
    lo = jnp.searchsorted(offsets[1:], tile_start, side="right").astype(jnp.int32)
    hi = jnp.searchsorted(offsets[:-1], tile_start + tm, side="left").astype(jnp.int32)
    full = lambda shape: pl.BlockSpec(shape, lambda i, j: (0,) * len(shape))
    out = pl.pallas_call(
        functools.partial(_gmm_kernel, tk=tk, num_k=kp // tk),
        grid=(mp // tm, np_ // tn),
        in_specs=[full((g + 1,)), full((mp // tm,)), full((mp // tm,)),
                  pl.BlockSpec((tm, kp), lambda i, j: (i, 0)),
                  pl.BlockSpec((g, kp, tn), lambda i, j: (0, 0, j))],
        out_specs=pl.BlockSpec((tm, tn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        interpret=p.interpret,
        compiler_params=p.compiler_params(),
        name="gmm",
    )(offsets, lo, hi, lhs_p, rhs_p)
    return out[:m, :n]


def _tgmm_kernel(offsets_ref, lhs_ref, dout_ref, out_ref, *, tm):
    g = pl.program_id(0)
    tk, tn = out_ref.shape
    start, end = offsets_ref[g], offsets_ref[g + 1]
    first = start // tm
    last = jnp.where(end > start, (end + tm - 1) // tm, first)  # empty group: no tiles, zero gradient

    def body(mt, acc):
        row = mt * tm + jnp.arange(tm, dtype=jnp.int32)
        in_group = (row >= start) & (row < end)
        a = jnp.where(in_group[:, None], lhs_ref[pl.ds(mt * tm, tm), :], 0)
        d = dout_ref[pl.ds(mt * tm, tm), :]
        return acc + lax.dot_general(a, d, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    out_ref[...] = lax.fori_loop(first, last, body, jnp.zeros((tk, tn), jnp.float32)).astype(out_ref.dtype)


def _tgmm_pallas(lhs, dout, group_sizes, num_groups, out_dtype, tiling, interpret, platform):
    """Per-group lhs^T @ dout. lhs [M, K], dout [M, N] -> [G, K, N] in out_dtype."""
    p = plan("pallas", interpret, platform)
    (m, k), n = lhs.shape, dout.shape[1]
    tm, tk, tn = (block_size(b, d, p.min_dot_dim) for b, d in zip(tiling, (m, k, n)))
    mp, kp, np_ = cdiv(m, tm) * tm, cdiv(k, tk) * tk, cdiv(n, tn) * tn
    lhs_p = pad_axis(pad_axis(lhs, 0, mp), 1, kp)
    dout_p = pad_axis(pad_axis(dout, 0, mp), 1, np_)
    out = pl.pallas_call(
        functools.partial(_tgmm_kernel, tm=tm),
        grid=(num_groups, kp // tk, np_ // tn),
        in_specs=[pl.BlockSpec((num_groups + 1,), lambda g, i, j: (0,)),
                  pl.BlockSpec((mp, tk), lambda g, i, j: (0, i)),
                  pl.BlockSpec((mp, tn), lambda g, i, j: (0, j))],
        out_specs=pl.BlockSpec((None, tk, tn), lambda g, i, j: (g, i, j)),
        out_shape=jax.ShapeDtypeStruct((num_groups, kp, np_), out_dtype),
        interpret=p.interpret,
        compiler_params=p.compiler_params(),
        name="tgmm",
    )(_group_offsets(group_sizes), lhs_p, dout_p)
    return out[:, :k, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _gmm(lhs, rhs, group_sizes, out_dtype, tiling, interpret, platform):
    return _gmm_pallas(lhs, rhs, group_sizes, out_dtype, tiling, interpret, platform)


def _gmm_fwd(lhs, rhs, group_sizes, out_dtype, tiling, interpret, platform):
    return _gmm_pallas(lhs, rhs, group_sizes, out_dtype, tiling, interpret, platform), (lhs, rhs, group_sizes)


def _gmm_bwd(out_dtype, tiling, interpret, platform, res, dout):
    lhs, rhs, group_sizes = res
    dlhs = _gmm_pallas(dout, jnp.swapaxes(rhs, 1, 2), group_sizes, lhs.dtype, tiling, interpret, platform)
    drhs = _tgmm_pallas(lhs, dout, group_sizes, rhs.shape[0], rhs.dtype, tiling, interpret, platform)
    return dlhs, drhs, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    preferred_element_type: jnp.dtype | None = None,
    tiling: Tiling = (128, 128, 128),
    impl: Impl = "auto",
    interpret: bool | None = None,
) -> jax.Array:
    """Grouped matmul. lhs [M, K] (rows sorted by group), rhs [G, K, N], group_sizes [G] int -> [M, N].

    Accumulates in fp32; the result has ``preferred_element_type`` (default lhs.dtype). ``tiling`` = (tm, tk, tn)
    Pallas tiles, rounded to powers of two and shrunk to the problem; they do not change results.
    """
    if lhs.ndim != 2 or rhs.ndim != 3 or lhs.shape[1] != rhs.shape[1] or group_sizes.shape != rhs.shape[:1]:
        raise ValueError(f"bad shapes lhs {lhs.shape}, rhs {rhs.shape}, group_sizes {group_sizes.shape}")
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    p = plan(impl, interpret)
    if not p.use_pallas:
        return gmm_reference(lhs, rhs, group_sizes, out_dtype)
    return _gmm(lhs, rhs, group_sizes.astype(jnp.int32), out_dtype, tuple(tiling), p.interpret, p.platform)
