"""One decoder block: attention and MoE sub-blocks, each wrapped in mHC pre/post (spec §4)."""

from __future__ import annotations

import jax

from deepmoe.config import ModelConfig
from deepmoe.layers.attention import attention
from deepmoe.layers.hyper import hc_post, hc_pre
from deepmoe.layers.moe import moe
from deepmoe.layers.norms import rms_norm


def block(params: dict, cfg: ModelConfig, layer_type: str, streams: jax.Array, token_ids: jax.Array,
          positions: jax.Array, segment_ids: jax.Array, moe_strategy: str = "sorted"
          ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """streams [B, T, n, D] -> (streams, router statistics)."""
    x, post, comb = hc_pre(params["attn_hc"], cfg, streams)
    a = attention(params["attn"], cfg, layer_type, rms_norm(x, params["attn_norm"], cfg.rms_norm_eps),
                  positions, segment_ids)
    streams = hc_post(a, streams, post, comb)
    x, post, comb = hc_pre(params["ffn_hc"], cfg, streams)
    f, stats = moe(params["moe"], cfg, rms_norm(x, params["ffn_norm"], cfg.rms_norm_eps), token_ids, moe_strategy)
    return hc_post(f, streams, post, comb), stats
