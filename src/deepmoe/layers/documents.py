"""Packed-document bookkeeping: segment ids and per-document positions."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def document_positions(segment_ids: jax.Array) -> jax.Array:
    """[B, T] int: index of each token inside its document (restarts where the segment id changes)."""
    t = segment_ids.shape[-1]
    index = jnp.broadcast_to(jnp.arange(t), segment_ids.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[..., :1], bool), segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1)
    first_index = jax.lax.cummax(jnp.where(starts, index, 0), axis=segment_ids.ndim - 1)
    return index - first_index
