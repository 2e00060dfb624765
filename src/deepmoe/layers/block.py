"""One decoder block: attention and MoE sub-blocks, each wrapped in mHC pre/post (spec §4)."""

from __future__ import annotations

from typing import Any, Callable

import jax

from deepmoe.config import ModelConfig
from deepmoe.layers.attention import attention
from deepmoe.layers.hyper import hc_post, hc_pre
from deepmoe.layers.moe import moe
from deepmoe.layers.norms import rms_norm
from deepmoe.moe_dispatch import with_extras


def block_with(attention_fn: Callable[[dict, jax.Array], tuple[jax.Array, Any]], params: dict, cfg: ModelConfig,
               streams: jax.Array, token_ids: jax.Array, moe_strategy: str = "sorted"
               ) -> tuple[jax.Array, dict[str, jax.Array], Any]:
    """The block around any attention: attention_fn(attn_params, normed x [B, T, D]) -> (output, extra).
    streams [B, T, n, D] -> (streams, router statistics, extra). Cached decoding plugs its attention in here."""
    # Named scopes label every op in profiles and HLO dumps (op_name) with the sub-block it belongs to.
    with jax.named_scope("mhc_pre"):
        x, post, comb = hc_pre(params["attn_hc"], cfg, streams)
    with jax.named_scope("attention"):
        a, extra = attention_fn(params["attn"], rms_norm(x, params["attn_norm"], cfg.rms_norm_eps))
    with jax.named_scope("mhc_post"):
        streams = hc_post(a, streams, post, comb)
    with jax.named_scope("mhc_pre"):
        x, post, comb = hc_pre(params["ffn_hc"], cfg, streams)
    strategy, extras = with_extras(moe_strategy)  # mesh-bound strategies add e.g. dropped_tokens
    with jax.named_scope("moe"):
        f, stats = moe(params["moe"], cfg, rms_norm(x, params["ffn_norm"], cfg.rms_norm_eps), token_ids, strategy)
    with jax.named_scope("mhc_post"):
        return hc_post(f, streams, post, comb), {**stats, **extras}, extra


def block(params: dict, cfg: ModelConfig, layer_type: str, streams: jax.Array, token_ids: jax.Array,
          positions: jax.Array, segment_ids: jax.Array, moe_strategy="auto"
          ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """streams [B, T, n, D] -> (streams, router statistics)."""
    def attn(p, x):
        return attention(p, cfg, layer_type, x, positions, segment_ids), None

    streams, stats, _ = block_with(attn, params, cfg, streams, token_ids, moe_strategy)
    return streams, stats
