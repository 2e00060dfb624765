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
from deepmoe.layers.indexer import csa_selection, index_scores, select_topk, topk_entries
from deepmoe.layers.rope import inverse_frequencies
from deepmoe.params import ParamSpec, attention_specs

F32 = dm.preset("tiny", compute_dtype="float32")


def _attention_inputs(b, t, h, c, n, seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (b, t, h, c))
    kv = jax.random.normal(ks[1], (b, t, c))
    entries = jax.random.normal(ks[2], (b, n, c))
    sinks = jax.random.normal(ks[3], (h,))
    segment_ids = (jnp.arange(t)[None] >= 2 * t // 3).astype(jnp.int32).repeat(b, 0)  # two packed documents
    causal = jnp.arange(n)[None, None, :] * (t // n) < jnp.arange(t)[None, :, None]
    entry_mask = causal & jax.random.bernoulli(ks[4], 0.7, (b, t, n))
    return q, kv, segment_ids, sinks, entries, entry_mask


def _numpy_sink_attention(q, kv, segment_ids, sinks, window, entries=None, entry_mask=None):
    """Each query over its window keys (same document) and its allowed entries, with a sink, in float64."""
    q, kv, sinks = (np.asarray(x, np.float64) for x in (q, kv, sinks))
    segment_ids = np.asarray(segment_ids)
    out = np.zeros_like(q)
    for b in range(q.shape[0]):
        for t in range(q.shape[1]):
            rows = [s for s in range(max(0, t - window + 1), t + 1) if segment_ids[b, s] == segment_ids[b, t]]
            keys = kv[b, rows]
            if entries is not None:
                keys = np.concatenate([keys, np.asarray(entries, np.float64)[b, np.asarray(entry_mask)[b, t]]])
            logits = q[b, t] @ keys.T * q.shape[-1] ** -0.5  # [H, K]
            peak = np.maximum(logits.max(-1), sinks)[:, None]
            exps = np.exp(logits - peak)
            out[b, t] = exps / (np.exp(sinks[:, None] - peak) + exps.sum(-1, keepdims=True)) @ keys
    return out


def _with_budget(monkeypatch, budget):
    """Score bytes per chunk for the programs traced from now on (2**62: one piece)."""
    monkeypatch.setattr(query_chunks, "SCORE_CHUNK_BYTES", budget)


@pytest.mark.parametrize("with_entries", [False, True])
@pytest.mark.parametrize("blocks_per_chunk", [1, 4, None])  # 7 blocks in 2 chunks of 4 (one padded); one piece
def test_attention_in_chunks_matches_numpy(monkeypatch, with_entries, blocks_per_chunk):
    b, t, h, c, n, window = 2, 53, 3, 16, 11, 8
    q, kv, seg, sinks, entries, entry_mask = _attention_inputs(b, t, h, c, n)
    if not with_entries:
        entries = entry_mask = None
    cfg = F32.replace(sliding_window=window)
    block_bytes = 4 * b * window * h * (2 * window + (n if with_entries else 0))
    _with_budget(monkeypatch, block_bytes * (blocks_per_chunk or 100))
    got = jax.jit(lambda *args: sink_attention(cfg, *args))(q, kv, seg, sinks, entries, entry_mask)  # traced anew
    np.testing.assert_allclose(np.asarray(got), _numpy_sink_attention(q, kv, seg, sinks, window, entries,
                                                                      entry_mask), atol=2e-5)


def _attention_gradients(cfg, inputs):
    q, kv, seg, sinks, entries, entry_mask = inputs
    cotangent = jax.random.normal(jax.random.key(9), q.shape)

    def loss(q, kv, sinks, entries):
        return jnp.vdot(sink_attention(cfg, q, kv, seg, sinks, entries, entry_mask), cotangent)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(q, kv, sinks, entries).compile()
    return compiled(q, kv, sinks, entries), compiled.memory_analysis().temp_size_in_bytes


def test_attention_gradients_in_chunks_match_and_keep_one_chunk_of_scores(monkeypatch):
    """The backward recomputes each chunk: same gradients as in one piece (which the parity tests hold to
    transformers), and the gradient program's temporaries a fraction of those that hold [T, H, N] scores."""
    b, t, h, c, n, window = 1, 1024, 4, 32, 256, 64
    cfg = F32.replace(sliding_window=window)
    inputs = _attention_inputs(b, t, h, c, n, seed=1)
    _with_budget(monkeypatch, 2**62)
    whole, whole_temp = _attention_gradients(cfg, inputs)
    _with_budget(monkeypatch, 2 * 4 * b * window * h * (2 * window + n))  # two blocks per chunk
    chunked, chunked_temp = _attention_gradients(cfg, inputs)
    for name, a, e in zip(("q", "kv", "sinks", "entries"), chunked, whole):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-6, err_msg=name)
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


@pytest.mark.parametrize("as_indices", [False, True])  # the reference attention's mask, the kernels' indices
def test_indexer_selection_in_chunks_matches_whole_scores(monkeypatch, as_indices):
    """The selection made a chunk of queries at a time is the top-k of the whole [B, T, N] score matrix, and
    the chunked program holds a fraction of the [B, T, H_I, N] logits the whole one does."""
    b, t = 2, 512
    params, x, query_latent, positions, seg, inv_freq = _indexer_inputs(b, t)
    scores, mask = index_scores(params, F32, x, query_latent, positions, seg, inv_freq)
    n = scores.shape[-1]

    def compiled_selection():  # traced anew: the budget is read when tracing
        return jax.jit(lambda p, x, ql: csa_selection(p, F32, x, ql, positions, seg, inv_freq, as_indices=as_indices)
                       ).lower(params, x, query_latent).compile()

    _with_budget(monkeypatch, 2**62)
    whole = compiled_selection()
    _with_budget(monkeypatch, 4 * b * F32.indexer_heads * n * 48)  # at most 48 queries: 11 chunks of 47, padded
    chunked = compiled_selection()
    got = chunked(params, x, query_latent)
    if as_indices:
        expected = topk_entries(scores, mask, F32.indexer_topk)
        np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(expected[0]))
        np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(expected[1]))
    else:
        np.testing.assert_array_equal(np.asarray(got), np.asarray(select_topk(scores, mask, F32.indexer_topk)))
    logits = 4 * b * t * F32.indexer_heads * n
    whole_temp, chunked_temp = (c.memory_analysis().temp_size_in_bytes for c in (whole, chunked))
    assert whole_temp > logits
    assert chunked_temp < 0.5 * whole_temp, (chunked_temp, whole_temp)


def test_rows_per_chunk():
    assert query_chunks.rows_per_chunk(10, 100, budget=10_000) == 10  # everything fits: one piece
    assert query_chunks.rows_per_chunk(10, 100, budget=700) == 5  # 7 fit, but 7 + 3 would pad 4 rows: 5 + 5
    assert query_chunks.rows_per_chunk(10, 100, budget=350) == 3  # 3 + 3 + 3 + 1
    assert query_chunks.rows_per_chunk(10, 100, budget=50) == 1  # one row over the budget still runs
