"""Queries in chunks, for the score tensors that grow as T x T / ratio.

Scoring every query against every compressed entry makes [B, T, H, N] tensors, N = T / ratio: the attention
core's compressed logits (and, in training, their probabilities and cotangents) and the indexer's per-head
scores [B, T, H_I, N]. At V4-Flash's sizes one such tensor is 1 GiB at 4K tokens and 256 GiB at 64K. Above a
budget, these are computed one chunk of queries at a time (a sequential `lax.map`), so only a chunk's scores
are ever live; below it, in one piece, the program is unchanged.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

# float32 score bytes one chunk may hold. On XLA:CPU, `small`'s train step at T=4096 ran 1.19x faster in
# 16 MiB chunks than in one piece (64 MiB: 1.06x) and at T=2048 within noise (0.97-0.99x for 8-32 MiB);
# docs/performance.md, 23rd session. Accelerators: unmeasured; a larger budget means larger matmuls.
SCORE_CHUNK_BYTES = 16 * 2**20


def rows_per_chunk(rows: int, bytes_per_row: float, budget: int | None = None) -> int:
    """How many rows (queries, or query blocks) of `bytes_per_row` scores one chunk takes: all `rows` when they
    fit the budget (default SCORE_CHUNK_BYTES), else the fewest chunks that fit, evened out so that the last
    one is not mostly padding; at least one row."""
    budget = SCORE_CHUNK_BYTES if budget is None else budget
    most = max(1, int(budget // max(bytes_per_row, 1)))
    count = -(-rows // most)
    return -(-rows // count)


def map_row_chunks(fn: Callable[..., Any], chunk: int, *xs: Any, recompute: bool) -> Any:
    """fn(*xs) where every array in the pytrees xs is [B, R, ...], computed over chunks of `chunk` rows (axis 1)
    one after another.

    fn must treat rows independently and return [B, R, ...] arrays (or a tuple of them). Rows are padded with
    zeros up to a multiple of `chunk` and the result is cut back. With `recompute`, the backward pass recomputes
    each chunk's intermediates from its inputs (jax.checkpoint) rather than keeping every chunk's: what bounds
    the memory of a differentiated chunk to one chunk's scores."""
    rows = jax.tree.leaves(xs)[0].shape[1]
    if chunk >= rows:
        return fn(*xs)
    count = -(-rows // chunk)

    def split(x):  # [B, R, ...] -> [count, B, chunk, ...]
        x = jnp.pad(x, [(0, 0), (0, count * chunk - rows)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(x.shape[0], count, chunk, *x.shape[2:]), 1, 0)

    body = jax.checkpoint(lambda chunk_xs: fn(*chunk_xs), prevent_cse=False) if recompute else (
        lambda chunk_xs: fn(*chunk_xs))
    def join(out):  # [count, B, chunk, ...] -> [B, R, ...]
        out = jnp.moveaxis(out, 0, 1)
        return out.reshape(out.shape[0], count * chunk, *out.shape[3:])[:, :rows]

    return jax.tree.map(join, jax.lax.map(body, jax.tree.map(split, xs)))
