"""The attention core through `pallas_kernels` (window + sink, compressed CSA / HCA), for `kernels="pallas"`.

Same inputs and result as `attention.sink_attention`, without materialising [T, T] or [T, N] score matrices
in the Pallas kernels; `impl="reference"` runs the kernels' own pure-jnp fallbacks.
"""

from __future__ import annotations

import jax

from deepmoe.config import ModelConfig
from deepmoe.layers.compressor import CompressedEntries

def kernel_sink_attention(cfg: ModelConfig, q: jax.Array, kv: jax.Array, segment_ids: jax.Array, sinks: jax.Array,
                          entries: CompressedEntries | None = None,
                          selection: tuple[jax.Array, jax.Array] | None = None, *, impl: str = "auto",
                          interpret: bool | None = None) -> jax.Array:
    """q [B,T,H,c], kv [B,T,c]; entries (values [B,N,c], end_index, segment_ids); selection = CSA top-k
    (indices [B,T,k], valid [B,T,k]) or None for all visible entries (HCA). -> [B,T,H,c]"""
    import pallas_kernels as pk

    if entries is None:
        return pk.window_attention(q, kv, sinks, window=cfg.sliding_window, segment_ids=segment_ids, impl=impl,
                                   interpret=interpret)
    common = dict(window=cfg.sliding_window, segment_ids=segment_ids, entry_segment_ids=entries.segment_ids,
                  impl=impl, interpret=interpret)
    values = entries.values.astype(kv.dtype)
    if selection is None:
        return pk.compressed_attention(q, kv, sinks, values, end_idx=entries.end_index, **common)
    indices, valid = selection
    return pk.compressed_attention(q, kv, sinks, values, topk_idx=indices, topk_valid=valid, **common)
