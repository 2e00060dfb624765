"""Multi-token prediction module, depth 1 (spec §8): predicts token t+2 at position t from the last main
layer's streams and the embedding of token t+1, through one sliding-window block with its own HC head."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepmoe.config import SLIDING, ModelConfig
from deepmoe.layers.block import block
from deepmoe.layers.hyper import hc_head
from deepmoe.layers.norms import rms_norm
from deepmoe.layers.precision import compute_dtype, einsum


def next_tokens(token_ids: jax.Array) -> jax.Array:
    """token t+1 at position t; 0 past the end of the row (those positions carry no MTP loss)."""
    return jnp.concatenate([token_ids[:, 1:], jnp.zeros_like(token_ids[:, :1])], axis=1)


def mtp_input(params: dict, cfg: ModelConfig, streams: jax.Array, embed: jax.Array, following: jax.Array
              ) -> jax.Array:
    """Main streams [B, T, n, D] + the next tokens [B, T] -> the MTP block's input streams [B, T, n, D]."""
    e = rms_norm(embed[following].astype(compute_dtype(cfg)), params["embed_norm"], cfg.rms_norm_eps)
    h = rms_norm(streams, params["hidden_norm"], cfg.rms_norm_eps)
    x = einsum(cfg, "btd,de->bte", e, params["embed_proj"])[:, :, None, :] + einsum(
        cfg, "btnd,de->btne", h, params["hidden_proj"])
    return x.astype(streams.dtype)


def mtp_output(params: dict, cfg: ModelConfig, streams: jax.Array) -> jax.Array:
    """The MTP block's output streams -> normed hidden [B, T, D] for the shared LM head."""
    return rms_norm(hc_head(params["hc_head"], cfg, streams), params["norm"], cfg.rms_norm_eps)


def mtp_hidden(params: dict, cfg: ModelConfig, streams: jax.Array, embed: jax.Array, token_ids: jax.Array,
               positions: jax.Array, segment_ids: jax.Array, moe_strategy: str
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """streams: the last main layer's [B, T, n, D] -> (normed MTP hidden [B, T, D], router statistics)."""
    following = next_tokens(token_ids)
    x = mtp_input(params, cfg, streams, embed, following)
    x, stats = block(params["block"], cfg, SLIDING, x, following, positions, segment_ids, moe_strategy)
    return mtp_output(params, cfg, x), stats
