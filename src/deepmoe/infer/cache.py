"""Preallocated, fixed-shape inference caches (spec §9.1): one `LayerCache` per decoder layer, unstacked, so a
decode step reads and updates each layer's buffers where they lie (a slice of a stack would be a copy).

Per decoder layer (`LayerCache`):
  * `window`      [B, W, c]   ring buffer of the last W rotated kv rows: position p lives in slot p % W.
  * `compressor`  (CSA / HCA) pending per-token projections and the compressed entries so far:
                  `kv`, `gate` [B, P, width] float32, position p in slot p % P, gate incl. the position bias;
                  P = ratio for HCA, 2 * ratio for CSA (the previous window's rows feed the overlap half);
                  `entries` [B, max_len // ratio, dim]: entry n pools the window closing at (n + 1) * ratio - 1.
  * `indexer`     (CSA) the same for the lightning indexer's compressor; its entries are the indexer keys.

Logical axes, named as in `deepmoe.sharding.ShardingRules`: window and entries ("batch", "seq", "head_dim"),
pending rows ("batch", "seq", "compress"), lengths ("batch",). `cache_axes(cache)` returns them as a
matching pytree and `shard_cache` places a cache on a mesh with them (batch over the batch mesh axes).

Nothing is ever read by a stored position: every slot's position is implied by the sequence length, so the
cache tolerates the rejected write of one speculative token (the slot it overwrote is already outside every
later query's window, and the pending buffers keep a full previous window). See decode.py.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from deepmoe.config import CSA, SLIDING, ModelConfig
from deepmoe.layers.precision import compute_dtype

INDEX_KEY_DTYPE = jnp.float32  # the full forward scores the indexer in float32; keep its keys exact


@struct.dataclass
class CompressorCache:
    kv: jax.Array  # [B, P, width] float32 pending per-token projections (slot p % P)
    gate: jax.Array  # [B, P, width] float32, position bias included
    entries: jax.Array  # [B, N, dim] compressed entries (main: compute dtype; indexer keys: float32)


@struct.dataclass
class LayerCache:
    window: jax.Array  # [B, W, c] ring of rotated kv (compute dtype)
    compressor: CompressorCache | None = None
    indexer: CompressorCache | None = None


@struct.dataclass
class DecodeCache:
    layers: list  # layers[i]: LayerCache of decoder layer i
    lengths: jax.Array  # [B] int32 tokens already processed = the position of the next token
    max_len: int = struct.field(pytree_node=False)


def pending_size(cfg: ModelConfig, layer_type: str) -> int:
    ratio = cfg.compress_ratio(layer_type)
    return 2 * ratio if layer_type == CSA else ratio


def _compressor_shapes(batch: int, pending: int, width: int, entries: int, dim: int, entry_dtype) -> CompressorCache:
    return CompressorCache(
        kv=jax.ShapeDtypeStruct((batch, pending, width), jnp.float32),
        gate=jax.ShapeDtypeStruct((batch, pending, width), jnp.float32),
        entries=jax.ShapeDtypeStruct((batch, entries, dim), entry_dtype),
    )


def layer_cache_shapes(cfg: ModelConfig, layer_type: str, batch: int, max_len: int) -> LayerCache:
    """ShapeDtypeStructs of one layer's cache (no allocation)."""
    dtype = compute_dtype(cfg)
    window = jax.ShapeDtypeStruct((batch, cfg.sliding_window, cfg.head_dim), dtype)
    if layer_type == SLIDING:
        return LayerCache(window=window)
    ratio = cfg.compress_ratio(layer_type)
    overlap = layer_type == CSA
    width = cfg.head_dim * (2 if overlap else 1)
    compressor = _compressor_shapes(batch, pending_size(cfg, layer_type), width, max_len // ratio, cfg.head_dim,
                                    dtype)
    indexer = None
    if layer_type == CSA:
        indexer = _compressor_shapes(batch, 2 * ratio, 2 * cfg.indexer_head_dim, max_len // ratio,
                                     cfg.indexer_head_dim, INDEX_KEY_DTYPE)
    return LayerCache(window=window, compressor=compressor, indexer=indexer)


def cache_shapes(cfg: ModelConfig, batch: int, max_len: int) -> DecodeCache:
    """The whole decode cache as ShapeDtypeStructs (what `init_cache` allocates)."""
    layers = [layer_cache_shapes(cfg, layer_type, batch, max_len) for layer_type in cfg.layer_types]
    return DecodeCache(layers=layers, lengths=jax.ShapeDtypeStruct((batch,), jnp.int32), max_len=max_len)


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> DecodeCache:
    """An empty cache (all zeros, lengths 0) for `batch` sequences of up to `max_len` tokens."""
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shapes(cfg, batch, max_len))


WINDOW_AXES = ("batch", "seq", "head_dim")
PENDING_AXES = ("batch", "seq", "compress")


def cache_axes(cache: DecodeCache) -> DecodeCache:
    """Logical axis names per cache leaf (a pytree matching `cache`, tuples of names as leaves)."""
    def comp(c):
        return None if c is None else CompressorCache(kv=PENDING_AXES, gate=PENDING_AXES, entries=WINDOW_AXES)

    layers = [LayerCache(window=WINDOW_AXES, compressor=comp(layer.compressor), indexer=comp(layer.indexer))
              for layer in cache.layers]
    return DecodeCache(layers=layers, lengths=("batch",), max_len=cache.max_len)


def shard_cache(cache: DecodeCache, mesh: Any, rules: Any = None) -> DecodeCache:
    """Place every cache leaf on `mesh` by its logical axes (`deepmoe.sharding.ShardingRules`)."""
    from deepmoe.sharding import check_batch, named_sharding

    check_batch(cache.lengths.shape[0], mesh, rules)
    axes = cache_axes(cache)
    is_axes = lambda x: isinstance(x, tuple) and all(isinstance(a, str) for a in x)  # noqa: E731
    return jax.tree.map(lambda a, x: jax.device_put(x, named_sharding(mesh, rules, a)), axes, cache,
                        is_leaf=is_axes)


def tree_bytes(tree: Any) -> int:
    """Bytes of every array (or ShapeDtypeStruct) leaf in `tree`."""
    return sum(jnp.dtype(x.dtype).itemsize * math.prod(x.shape) for x in jax.tree.leaves(tree))


# ----- building cache rows from a full-sequence pass (prefill) ------------------------------------------------

def ring_from_sequence(rows: jax.Array, valid_len: jax.Array, size: int) -> jax.Array:
    """rows [B, T, C] of positions 0..T-1 -> ring [B, size, C] holding positions valid_len - size .. valid_len - 1
    at slot p % size (slots of negative positions are zero)."""
    slots = jnp.arange(size)
    last = valid_len[:, None] - 1
    position = last - (last - slots) % size  # [B, size]
    gathered = jnp.take_along_axis(rows, jnp.clip(position, 0, rows.shape[1] - 1)[..., None], axis=1)
    return jnp.where((position >= 0)[..., None], gathered, 0).astype(rows.dtype)


def entries_from_sequence(values: jax.Array, lengths: jax.Array, ratio: int, capacity: int, dtype) -> jax.Array:
    """values [B, T // ratio, dim] (entries of the padded prompt) -> [B, capacity, dim]: entries whose window lies
    inside each prompt; entries of windows reaching into the padding are zeroed."""
    n = values.shape[1]
    keep = jnp.arange(n)[None, :] < (lengths // ratio)[:, None]
    values = jnp.where(keep[..., None], values, 0).astype(dtype)
    return jnp.pad(values, ((0, 0), (0, capacity - n), (0, 0)))
