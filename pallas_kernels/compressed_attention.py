"""Window + compressed-entry attention with a sink over ONE shared key=value head (DeepSeek-V4 CSA / HCA core).

Query t attends to the union of its window keys (t - window < s <= t, as in window_attention) and a set of
compressed entries ``ckv`` [B, N, D], with one softmax over the union plus the per-head sink (spec 6.4, 6.8):

* HCA (``end_idx`` given, ``topk_idx`` None): every entry n with ``end_idx[b, n] <= t`` (whole window of the
  entry seen) and, when ``entry_segment_ids`` is given, the same segment. ``end_idx`` must be non-decreasing.
* CSA (``topk_idx`` [B, T, k] given): exactly the selected entries; -1 or ``topk_valid`` False = no entry.
  The selection is trusted (the indexer already applied causality); valid indices of one query must be distinct.

Pallas path: the window part and the compressed part are computed as two partial softmaxes, merged with
their log-sum-exps; the backward runs each part's kernels with the TOTAL log-sum-exp, so the gradients of the
union are the sums of the parts. HCA's part is the shared flash core (``_flash``) with key position = end
index. CSA's part is a per-token kernel that gathers the k selected rows of ``ckv`` chunk by chunk (heads share
the selection, so one gathered chunk feeds an [H, kc] score tile); its backward scatters d(ckv) with atomic adds.
Memory stays O(T * (window + k)) per head; nothing of size [T, T] or [T, N] is formed (HCA's compute is O(T*N)).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _flash
from pallas_kernels._common import NEG_INF, Impl, next_pow2, pad_axis, plan, round_up
from pallas_kernels.window_attention import (_HIGHEST, _segments, _token_positions, blocked_window_apply,
                                             blocked_window_scores, default_block_k, default_block_q,
                                             softmax_with_sink)

try:  # atomics live in the Triton module; a jaxlib without it can still run the kernels interpreted
    from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover
    pltriton = None

_CONTRACT_LAST = (((1,), (1,)), ((), ()))
_CONTRACT_FIRST = (((0,), (0,)), ((), ()))


def _valid_selection(topk_idx, topk_valid):
    valid = topk_idx >= 0
    return valid if topk_valid is None else valid & topk_valid


def _compressed_scores(q, ckv, end_idx, topk_idx, topk_valid, qseg, eseg, scale):
    """Scores of the compressed part, -inf where hidden, and the values they weight (reference path)."""
    qf, cf = q.astype(jnp.float32), ckv.astype(jnp.float32)
    if topk_idx is None:
        s = jnp.einsum("bthd,bnd->bthn", qf, cf, precision=_HIGHEST) * scale
        vis = (end_idx[:, None, :] <= jnp.arange(q.shape[1])[None, :, None]) & (qseg[:, :, None] == eseg[:, None, :])
        return jnp.where(vis[:, :, None, :], s, -jnp.inf), cf
    valid = _valid_selection(topk_idx, topk_valid)
    cf = pad_axis(cf, 1, cf.shape[1] + 1)  # a zero row for invalid slots (and N = 0)
    rows = jax.vmap(lambda c, i: c[i])(cf, jnp.where(valid, topk_idx, 0))  # [B, T, k, D]
    s = jnp.einsum("bthd,btkd->bthk", qf, rows, precision=_HIGHEST) * scale
    return jnp.where(valid[:, :, None, :], s, -jnp.inf), rows


def compressed_attention_reference(q, kv, sinks, ckv, *, window, end_idx=None, topk_idx=None, topk_valid=None,
                                   segment_ids=None, entry_segment_ids=None) -> jax.Array:
    """Pure-jnp fallback: blocked window scores + HCA [T, N] scores or CSA gathered [T, k, D] rows."""
    b, t, _, d = q.shape
    scale = d**-0.5
    qseg, eseg = _compressed_segments(segment_ids, entry_segment_ids, b, t, ckv.shape[1])
    ws, keys = blocked_window_scores(q, kv, segment_ids, window, scale)
    cs, values = _compressed_scores(q, ckv, end_idx, topk_idx, topk_valid, qseg, eseg, scale)
    pw, pc = softmax_with_sink([ws[:, :t], cs], sinks)
    out = blocked_window_apply(pad_axis(pw, 1, ws.shape[1]), keys, t)
    eq = "bthn,bnd->bthd" if topk_idx is None else "bthk,btkd->bthd"
    return (out + jnp.einsum(eq, pc, values, precision=_HIGHEST)).astype(q.dtype)


def compressed_attention_dense(q, kv, sinks, ckv, *, window, end_idx=None, topk_idx=None, topk_valid=None,
                               segment_ids=None, entry_segment_ids=None) -> jax.Array:
    """Naive oracle over [T, T + N] masks (tests, benchmark baseline)."""
    b, t, _, d = q.shape
    n = ckv.shape[1]
    qseg, eseg = _compressed_segments(segment_ids, entry_segment_ids, b, t, n)
    seg = _segments(segment_ids, b, t)
    pos = jnp.arange(t)
    wvis = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)
    wvis = wvis[None] & (seg[:, :, None] == seg[:, None, :])
    if topk_idx is None:
        cvis = (end_idx[:, None, :] <= pos[None, :, None]) & (qseg[:, :, None] == eseg[:, None, :])
    else:
        valid = _valid_selection(topk_idx, topk_valid)
        bi, ti = jnp.arange(b)[:, None, None], jnp.arange(t)[None, :, None]
        cvis = jnp.zeros((b, t, n + 1), bool).at[bi, ti, jnp.where(valid, topk_idx, n)].set(True)[..., :n]
    keys = jnp.concatenate([kv, ckv], axis=1).astype(jnp.float32)
    s = jnp.einsum("bthd,bsd->bths", q.astype(jnp.float32), keys, precision=_HIGHEST) * d**-0.5
    s = jnp.where(jnp.concatenate([wvis, cvis], axis=-1)[:, :, None, :], s, -jnp.inf)
    (probs,) = softmax_with_sink([s], sinks)
    return jnp.einsum("bths,bsd->bthd", probs, keys, precision=_HIGHEST).astype(q.dtype)


def _compressed_segments(segment_ids, entry_segment_ids, b, t, n):
    """Segments only restrict compressed entries when the entries' own ids are given."""
    if entry_segment_ids is None:
        return jnp.zeros((b, t), jnp.int32), jnp.zeros((b, n), jnp.int32)
    return _segments(segment_ids, b, t), entry_segment_ids.astype(jnp.int32)


# ----------------------------------------------------------------------------------------------------------------
# CSA: per-token gather kernels.


def _gather_fwd_kernel(q_ref, idx_ref, ckv_ref, o_ref, lse_ref, *, kc, scale):
    hp, _ = q_ref.shape
    q = q_ref[...]

    def body(c, carry):
        m, l, acc = carry
        idx = idx_ref[pl.ds(c * kc, kc)]
        valid = idx >= 0
        k = ckv_ref[jnp.where(valid, idx, 0), :]  # gather [kc, D]
        s = lax.dot_general(q, k, _CONTRACT_LAST, preferred_element_type=jnp.float32) * scale
        s = jnp.where(valid[None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        acc = acc * alpha[:, None] + jnp.dot(p.astype(k.dtype), k, preferred_element_type=jnp.float32)
        return m_new, l * alpha + jnp.sum(p, axis=1), acc

    init = (jnp.full((hp,), NEG_INF, jnp.float32), jnp.zeros((hp,), jnp.float32), jnp.zeros(o_ref.shape, jnp.float32))
    m, l, acc = lax.fori_loop(0, idx_ref.shape[0] // kc, body, init)
    o_ref[...] = (acc / jnp.where(l > 0, l, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)


def _gather_bwd_kernel(q_ref, idx_ref, ckv_ref, do_ref, lse_ref, delta_ref, _, dq_ref, dckv_ref, *, kc, scale):
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    trash = dckv_ref.shape[0] - 1  # invalid slots add their (zero) gradient to a spare row
    cols = jnp.arange(dckv_ref.shape[1], dtype=jnp.int32)

    def body(c, dq):
        idx = idx_ref[pl.ds(c * kc, kc)]
        valid = idx >= 0
        k = ckv_ref[jnp.where(valid, idx, 0), :]
        s = lax.dot_general(q, k, _CONTRACT_LAST, preferred_element_type=jnp.float32) * scale
        p = jnp.where(valid[None, :], jnp.exp(s - lse[:, None]), 0.0)
        dp = lax.dot_general(do, k, _CONTRACT_LAST, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[:, None])
        dk = lax.dot_general(ds.astype(q.dtype), q, _CONTRACT_FIRST, preferred_element_type=jnp.float32) * scale
        dk = dk + lax.dot_general(p.astype(do.dtype), do, _CONTRACT_FIRST, preferred_element_type=jnp.float32)
        # Different queries select the same entry: accumulate with atomics (order-dependent rounding on GPU).
        target = (jnp.where(valid, idx, trash)[:, None], cols[None, :])
        if pltriton is not None:
            pltriton.atomic_add(dckv_ref, target, dk)
        else:  # interpreted grids run sequentially, so a plain read-modify-write is exact
            dckv_ref[target] = dckv_ref[target] + dk
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    dq = lax.fori_loop(0, idx_ref.shape[0] // kc, body, jnp.zeros(dq_ref.shape, jnp.float32))
    dq_ref[...] = dq * scale


def _num_warps(head_dim):
    return 8 if head_dim >= 256 else 4  # wide heads: more threads to hold the [H, D] accumulator


def _gather_layout(q, ckv, topk_idx, block_n, p):
    b, t, h, d = q.shape
    hp, dp = max(next_pow2(h), p.min_dot_dim), max(next_pow2(d), p.min_dot_dim)
    kc = max(min(next_pow2(block_n), next_pow2(topk_idx.shape[-1])), p.min_dot_dim)
    idx = pad_axis(topk_idx, 2, round_up(topk_idx.shape[-1], kc), -1)
    ckv_p = pad_axis(pad_axis(ckv, 2, dp), 1, ckv.shape[1] + 1)  # + spare row for invalid slots
    token = lambda *shape: pl.BlockSpec((None, None, *shape), lambda bi, ti: (bi, ti) + (0,) * len(shape))
    specs = dict(q=token(hp, dp), idx=token(idx.shape[-1]), vec=token(hp),
                 ckv=pl.BlockSpec((None, *ckv_p.shape[1:]), lambda bi, ti: (bi, 0, 0)))
    pad_q = lambda x: pad_axis(pad_axis(x, 2, hp), 3, dp) if x.ndim == 4 else pad_axis(x, 2, hp)
    return (b, t, h, d, hp, dp, kc), idx, ckv_p, specs, pad_q


def _gather_forward(q, ckv, topk_idx, *, block_n, p):
    (b, t, h, d, hp, dp, kc), idx, ckv_p, specs, pad_q = _gather_layout(q, ckv, topk_idx, block_n, p)
    o, lse = pl.pallas_call(
        functools.partial(_gather_fwd_kernel, kc=kc, scale=d**-0.5),
        grid=(b, t),
        in_specs=[specs["q"], specs["idx"], specs["ckv"]],
        out_specs=[specs["q"], specs["vec"]],
        out_shape=[jax.ShapeDtypeStruct((b, t, hp, dp), q.dtype), jax.ShapeDtypeStruct((b, t, hp), jnp.float32)],
        interpret=p.interpret, compiler_params=p.compiler_params(_num_warps(dp)), name="csa_gather_fwd",
    )(pad_q(q), idx, ckv_p)
    return o[:, :, :h, :d], lse[:, :, :h]


def _gather_backward(q, ckv, topk_idx, do, lse, delta, *, block_n, p):
    (b, t, h, d, hp, dp, kc), idx, ckv_p, specs, pad_q = _gather_layout(q, ckv, topk_idx, block_n, p)
    zeros = jnp.zeros(ckv_p.shape, jnp.float32)
    dq, dckv = pl.pallas_call(
        functools.partial(_gather_bwd_kernel, kc=kc, scale=d**-0.5),
        grid=(b, t),
        in_specs=[specs["q"], specs["idx"], specs["ckv"], specs["q"], specs["vec"], specs["vec"], specs["ckv"]],
        out_specs=[specs["q"], specs["ckv"]],
        out_shape=[jax.ShapeDtypeStruct((b, t, hp, dp), jnp.float32), jax.ShapeDtypeStruct(ckv_p.shape, jnp.float32)],
        input_output_aliases={6: 1},  # d(ckv) accumulates into a zeroed buffer across the whole grid
        interpret=p.interpret, compiler_params=p.compiler_params(_num_warps(dp)), name="csa_gather_bwd",
    )(pad_q(q), idx, ckv_p, pad_q(do.astype(q.dtype)), pad_q(lse), pad_q(delta), zeros)
    return dq[:, :, :h, :d], dckv[:, :-1, :d]


# ----------------------------------------------------------------------------------------------------------------
# Pallas path: window partial (with sink) + compressed partial, merged by log-sum-exp.


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _compressed_pallas(q, kv, sinks, ckv, aux, cfg):
    return _compressed_fwd(q, kv, sinks, ckv, aux, cfg)[0]


def _compressed_fwd(q, kv, sinks, ckv, aux, cfg):
    window, block_q, block_k, block_n, interpret, platform = cfg
    entry_key, seg, qseg, eseg = aux  # entry_key: end_idx [B, N] (HCA) or selected indices [B, T, k] (CSA)
    p = plan("pallas", interpret, platform)
    b, t = q.shape[:2]
    tiles = dict(block_q=block_q, block_k=block_k, plan=p)
    o_w, lse_w = _flash.flash_forward(q, kv, _token_positions(b, t), sinks, qseg=seg, kseg=seg, window=window,
                                      scale=q.shape[-1] ** -0.5, **tiles)
    if entry_key.ndim == 2:
        o_c, lse_c = _flash.flash_forward(q, ckv, entry_key, None, qseg=qseg, kseg=eseg, window=None,
                                          scale=q.shape[-1] ** -0.5, **tiles)
    else:
        o_c, lse_c = _gather_forward(q, ckv, entry_key, block_n=block_n, p=p)
    lse = jnp.logaddexp(lse_w, lse_c)  # lse_w is finite: a query always sees itself
    weigh = lambda part, part_lse: part.astype(jnp.float32) * jnp.exp(part_lse - lse)[..., None]
    o = (weigh(o_w, lse_w) + weigh(o_c, lse_c)).astype(q.dtype)
    return o, (q, kv, sinks, ckv, aux, o, lse)


def _compressed_bwd(cfg, res, do):
    window, block_q, block_k, block_n, interpret, platform = cfg
    q, kv, sinks, ckv, aux, o, lse = res
    entry_key, seg, qseg, eseg = aux
    p = plan("pallas", interpret, platform)
    b, t = q.shape[:2]
    tiles = dict(block_q=block_q, block_k=block_k, plan=p)
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
    dq_w, dkv = _flash.flash_backward(q, kv, _token_positions(b, t), do, lse, delta, qseg=seg, kseg=seg,
                                      window=window, scale=q.shape[-1] ** -0.5, **tiles)
    if entry_key.ndim == 2:
        dq_c, dckv = _flash.flash_backward(q, ckv, entry_key, do, lse, delta, qseg=qseg, kseg=eseg, window=None,
                                           scale=q.shape[-1] ** -0.5, **tiles)
    else:
        dq_c, dckv = _gather_backward(q, ckv, entry_key, do, lse, delta, block_n=block_n, p=p)
    dsinks = -jnp.sum(jnp.exp(sinks.astype(jnp.float32) - lse) * delta, axis=(0, 1))
    return ((dq_w + dq_c).astype(q.dtype), dkv.astype(kv.dtype), dsinks.astype(sinks.dtype),
            dckv.astype(ckv.dtype), jax.tree.map(lambda _: None, aux))


_compressed_pallas.defvjp(_compressed_fwd, _compressed_bwd)


def compressed_attention(
    q: jax.Array,
    kv: jax.Array,
    sinks: jax.Array,
    ckv: jax.Array,
    *,
    window: int,
    end_idx: jax.Array | None = None,
    topk_idx: jax.Array | None = None,
    topk_valid: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    entry_segment_ids: jax.Array | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    block_n: int = 64,
    impl: Impl = "auto",
    interpret: bool | None = None,
) -> jax.Array:
    """Window + compressed attention with sink. q [B, T, H, D], kv [B, T, D], sinks [H], ckv [B, N, D] -> [B, T, H, D].

    HCA: ``end_idx`` [B, N] (entry n visible to t iff end_idx <= t). CSA: ``topk_idx`` [B, T, k] (-1 = none) and
    optional ``topk_valid`` [B, T, k]. ``segment_ids`` [B, T] restrict the window keys; ``entry_segment_ids``
    [B, N] (if given) restrict the compressed entries too. ``block_q``/``block_k`` tile the flash kernels and
    ``block_n`` is the CSA gather chunk; none of them change results.
    """
    b, t, h, d = q.shape
    if kv.shape != (b, t, d) or sinks.shape != (h,) or ckv.shape[0] != b or ckv.shape[2] != d:
        raise ValueError(f"bad shapes q {q.shape}, kv {kv.shape}, sinks {sinks.shape}, ckv {ckv.shape}")
    if (topk_idx is None) == (end_idx is None):
        raise ValueError("give exactly one of end_idx (HCA: all visible entries) or topk_idx (CSA: selected entries)")
    kwargs = dict(window=window, end_idx=end_idx, topk_idx=topk_idx, topk_valid=topk_valid,
                  segment_ids=segment_ids, entry_segment_ids=entry_segment_ids)
    p = plan(impl, interpret)
    if not p.use_pallas:
        return compressed_attention_reference(q, kv, sinks, ckv, **kwargs)
    qseg, eseg = _compressed_segments(segment_ids, entry_segment_ids, b, t, ckv.shape[1])
    if topk_idx is None:
        entry_key = end_idx.astype(jnp.int32)
    else:
        entry_key = jnp.where(_valid_selection(topk_idx, topk_valid), topk_idx, -1).astype(jnp.int32)
    aux = (entry_key, _segments(segment_ids, b, t), qseg, eseg)
    tiles = (block_q or default_block_q(h), block_k or default_block_k(d), block_n)
    cfg = (int(window), *tiles, p.interpret, p.platform)
    return _compressed_pallas(q, kv, sinks, ckv, aux, cfg)
