"""Queries in chunks (layers.query_chunks): the attention core and the CSA indexer give the same results, in a
chunk of queries at a time, as in one piece; the attention against a numpy oracle; what chunking saves in XLA's
memory analysis."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepmoe as dm
from deepmoe.layers import query_chunks
from deepmoe.layers.attention import sink_attention
from deepmoe.config import CSA
from deepmoe.layers.compressor import CompressedEntries
from deepmoe.layers.indexer import csa_selection, index_scores, topk_entries
from deepmoe.layers.rope import inverse_frequencies
from deepmoe.params import ParamSpec, attention_specs

F32 = dm.preset("tiny", compute_dtype="float32")


def _attention_inputs(b, t, h, c, n, kind, seed=0):
    """Random queries, keys, sinks and (kind "hca" / "csa") entries of windows of t // n rows, two packed
    documents; CSA picks 3 random entries per query, `valid` where the entry is visible (as `topk_entries`)."""
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (b, t, h, c))
    kv = jax.random.normal(ks[1], (b, t, c))
    sinks = jax.random.normal(ks[3], (h,))
    segment_ids = (jnp.arange(t)[None] >= 2 * t // 3).astype(jnp.int32).repeat(b, 0)  # two packed documents
    entries = selection = None
    if kind is not None:
        end = jnp.broadcast_to(jnp.arange(n) * (t // n) + t // n - 1, (b, n))
        entries = CompressedEntries(jax.random.normal(ks[2], (b, n, c)), end, jnp.take_along_axis(segment_ids, end, 1))
    if kind == "csa":
        indices = jnp.argsort(jax.random.uniform(ks[4], (b, t, n)), axis=-1)[..., :3]  # distinct, as top-k's
        selection = indices, jnp.take_along_axis(_numpy_visible(entries, segment_ids), indices, axis=-1)
    return q, kv, segment_ids, sinks, entries, selection


def _numpy_visible(entries, segment_ids):
    """[B, T, N]: entry n is visible from row t of its document once its window has ended (spec §6.6)."""
    end, entry_seg, seg = (np.asarray(x) for x in (entries.end_index, entries.segment_ids, segment_ids))
    rows = np.arange(seg.shape[1])
    return (end[:, None, :] <= rows[None, :, None]) & (entry_seg[:, None, :] == seg[:, :, None])


def _numpy_sink_attention(q, kv, segment_ids, sinks, window, entries=None, selection=None):
    """Each query over its window keys (same document) and its allowed entries, with a sink, in float64."""
    q, kv, sinks = (np.asarray(x, np.float64) for x in (q, kv, sinks))
    segment_ids = np.asarray(segment_ids)
    allowed = None
    if entries is not None:
        allowed = _numpy_visible(entries, segment_ids)
        if selection is not None:
            chosen = np.zeros_like(allowed)
            np.put_along_axis(chosen, np.asarray(selection[0]), True, axis=-1)
            allowed &= chosen
    out = np.zeros_like(q)
    for b in range(q.shape[0]):
        for t in range(q.shape[1]):
            rows = [s for s in range(max(0, t - window + 1), t + 1) if segment_ids[b, s] == segment_ids[b, t]]
            keys = kv[b, rows]
            if entries is not None:
                keys = np.concatenate([keys, np.asarray(entries.values, np.float64)[b, allowed[b, t]]])
            logits = q[b, t] @ keys.T * q.shape[-1] ** -0.5  # [H, K]
            peak = np.maximum(logits.max(-1), sinks)[:, None]
            exps = np.exp(logits - peak)
            out[b, t] = exps / (np.exp(sinks[:, None] - peak) + exps.sum(-1, keepdims=True)) @ keys
    return out


def _with_budget(monkeypatch, budget):
    """Score bytes per chunk for the programs traced from now on (2**62: one piece)."""
    monkeypatch.setattr(query_chunks, "SCORE_CHUNK_BYTES", budget)


@pytest.mark.parametrize("kind", [None, "hca", "csa"])  # window only; every visible entry; a top-k of them
@pytest.mark.parametrize("blocks_per_chunk", [1, 4, None])  # 7 blocks in 2 chunks of 4 (one padded); one piece
def test_attention_in_chunks_matches_numpy(monkeypatch, kind, blocks_per_chunk):
    b, t, h, c, n, window = 2, 53, 3, 16, 13, 8
    q, kv, seg, sinks, entries, selection = _attention_inputs(b, t, h, c, n, kind)
    cfg = F32.replace(sliding_window=window)
    block_bytes = 4 * b * window * h * (2 * window + (n if kind else 0))
    _with_budget(monkeypatch, block_bytes * (blocks_per_chunk or 100))
    got = jax.jit(lambda *args: sink_attention(cfg, *args))(q, kv, seg, sinks, entries, selection)  # traced anew
    np.testing.assert_allclose(np.asarray(got), _numpy_sink_attention(q, kv, seg, sinks, window, entries,
                                                                      selection), atol=2e-5)


def _attention_gradients(cfg, inputs):
    q, kv, seg, sinks, entries, selection = inputs
    cotangent = jax.random.normal(jax.random.key(9), q.shape)

    def loss(q, kv, sinks, values):
        return jnp.vdot(sink_attention(cfg, q, kv, seg, sinks, entries._replace(values=values), selection),
                        cotangent)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(q, kv, sinks, entries.values).compile()
    return compiled(q, kv, sinks, entries.values), compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("kind", ["hca", "csa"])
def test_attention_gradients_in_chunks_match_and_keep_one_chunk_of_scores(monkeypatch, kind):
    """The backward recomputes each chunk: same gradients as in one piece (which the parity tests hold to
    transformers), and the gradient program's temporaries a fraction of those that hold [T, H, N] scores."""
    b, t, h, c, n, window = 1, 1024, 4, 32, 256, 64
    cfg = F32.replace(sliding_window=window)
    inputs = _attention_inputs(b, t, h, c, n, kind, seed=1)
    _with_budget(monkeypatch, 2**62)
    whole, whole_temp = _attention_gradients(cfg, inputs)
    _with_budget(monkeypatch, 2 * 4 * b * window * h * (2 * window + n))  # two blocks per chunk
    chunked, chunked_temp = _attention_gradients(cfg, inputs)
    for name, a, e in zip(("q", "kv", "sinks", "entries"), chunked, whole):  # entries': sums over 1,024 queries
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=5e-6, err_msg=name)
    scores = 4 * b * t * h * n  # one [B, T, H, N] float32 tensor
    assert whole_temp > 4 * scores  # the program in one piece keeps several score-sized buffers
    assert chunked_temp < 0.2 * whole_temp, (chunked_temp, whole_temp)


def _indexer_inputs(b, t, seed=0):
    """A CSA layer's indexer: random parameters of `tiny`'s shapes and random inputs; two packed documents."""
    specs = attention_specs(F32, CSA)["indexer"]
    leaves, tree = jax.tree.flatten(specs, is_leaf=lambda s: isinstance(s, ParamSpec))
    keys = jax.random.split(jax.random.key(seed), len(leaves) + 2)
    params = jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, s.shape) for k, s in zip(keys, leaves)])
    x = jax.random.normal(keys[-2], (b, t, F32.hidden_size))
    query_latent = jax.random.normal(keys[-1], (b, t, F32.query_latent_dim))
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    segment_ids = (positions >= t // 3).astype(jnp.int32)
    return params, x, query_latent, positions, segment_ids, inverse_frequencies(F32, CSA)


def test_indexer_selection_in_chunks_matches_whole_scores(monkeypatch):
    """The selection made a chunk of queries at a time is the top-k of the whole [B, T, N] score matrix, and
    the chunked program holds a fraction of the [B, T, H_I, N] logits the whole one does."""
    b, t = 2, 512
    params, x, query_latent, positions, seg, inv_freq = _indexer_inputs(b, t)
    scores, mask = index_scores(params, F32, x, query_latent, positions, seg, inv_freq)
    n = scores.shape[-1]

    def compiled_selection():  # traced anew: the budget is read when tracing
        return jax.jit(lambda p, x, ql: csa_selection(p, F32, x, ql, positions, seg, inv_freq)
                       ).lower(params, x, query_latent).compile()

    _with_budget(monkeypatch, 2**62)
    whole = compiled_selection()
    _with_budget(monkeypatch, 4 * b * F32.indexer_heads * n * 48)  # at most 48 queries: 11 chunks of 47, padded
    chunked = compiled_selection()
    got = chunked(params, x, query_latent)
    expected = topk_entries(scores, mask, F32.indexer_topk)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(expected[0]))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(expected[1]))
    logits = 4 * b * t * F32.indexer_heads * n
    whole_temp, chunked_temp = (c.memory_analysis().temp_size_in_bytes for c in (whole, chunked))
    assert whole_temp > logits
    assert chunked_temp < 0.5 * whole_temp, (chunked_temp, whole_temp)


def test_rows_per_chunk():
    assert query_chunks.rows_per_chunk(10, 100, budget=10_000) == 10  # everything fits: one piece
    assert query_chunks.rows_per_chunk(10, 100, budget=700) == 5  # 7 fit, but 7 + 3 would pad 4 rows: 5 + 5
    assert query_chunks.rows_per_chunk(10, 100, budget=350) == 3  # 3 + 3 + 3 + 1
    assert query_chunks.rows_per_chunk(10, 100, budget=50) == 1  # one row over the budget still runs
