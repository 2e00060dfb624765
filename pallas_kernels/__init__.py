"""Model-agnostic Pallas kernels for DeepSeek-V4-style MoE and attention.

Each kernel module holds a pure-jnp reference (also the fallback where Pallas has no lowering), a Pallas kernel
(forward and backward) and a dispatch function taking ``impl="auto"|"pallas"|"reference"`` and ``interpret``.
"""

from pallas_kernels._common import AUTO_PALLAS_PLATFORMS, Impl, current_platform, target_platform
from pallas_kernels.compressed_attention import (compressed_attention, compressed_attention_dense,
                                                 compressed_attention_reference)
from pallas_kernels.grouped_matmul import gmm, gmm_reference
from pallas_kernels.indexer import indexer_scores, indexer_scores_reference, indexer_topk, indexer_topk_reference
from pallas_kernels.routing import Routing, route, route_reference, sqrt_softplus
from pallas_kernels.window_attention import window_attention, window_attention_dense, window_attention_reference

__all__ = [
    "AUTO_PALLAS_PLATFORMS",
    "Impl",
    "Routing",
    "compressed_attention",
    "compressed_attention_dense",
    "compressed_attention_reference",
    "current_platform",
    "gmm",
    "gmm_reference",
    "indexer_scores",
    "indexer_scores_reference",
    "indexer_topk",
    "indexer_topk_reference",
    "route",
    "route_reference",
    "sqrt_softplus",
    "target_platform",
    "window_attention",
    "window_attention_dense",
    "window_attention_reference",
]
