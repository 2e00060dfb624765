"""Prefill and cached decoding (spec §9.2).

`prefill` runs the full-sequence layers (`attention_with_state`, the very functions training uses) over the
right-padded prompts and keeps what the cache needs; `decode_step` feeds one token per sequence through
`cached_attention`. Sequences of a batch advance independently (each has its own length), so prompts of
different lengths share one batch. Left padding is refused: compression windows are aligned to position 0,
so leading pads would be pooled into real entries (spec §14 item 14).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from deepmoe.backend import xla_options
from deepmoe.config import CSA, SLIDING, ModelConfig
from deepmoe.infer.attention import cached_attention
from deepmoe.infer.cache import (INDEX_KEY_DTYPE, CompressorCache, DecodeCache, LayerCache, entries_from_sequence,
                                 init_cache, pending_size, ring_from_sequence)
from deepmoe.moe_dispatch.gather import decode_strategy
from deepmoe.layers.attention import AttentionState, attention_with_state
from deepmoe.layers.block import block_with
from deepmoe.layers.hyper import hc_head
from deepmoe.layers.norms import rms_norm
from deepmoe.layers.precision import compute_dtype
from deepmoe.model import logits_from_hidden
from deepmoe.params import layer_params, layer_segments, per_layer


class InferenceError(ValueError):
    """A prompt or cache that inference cannot handle; the message says what to change."""


# ----- input checks (host side) ---------------------------------------------------------------------------

def prompt_lengths(prompt_ids: Any, lengths: Any = None, attention_mask: Any = None) -> np.ndarray:
    """Validate a right-padded batch and return its lengths [B]. `attention_mask` [B, T] (1 = real token) may
    replace `lengths`; a mask with padding before a real token (left padding) is refused."""
    ids = np.asarray(prompt_ids)
    if ids.ndim != 2:
        raise InferenceError(f"prompt_ids must be [batch, seq], got shape {ids.shape}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise InferenceError(f"empty prompt: prompt_ids has shape {ids.shape}; give at least one token per sequence")
    if not np.issubdtype(ids.dtype, np.integer):
        raise InferenceError(f"prompt_ids must be integer token ids, got dtype {ids.dtype}")
    b, t = ids.shape
    if attention_mask is not None:
        mask = np.asarray(attention_mask).astype(bool)
        if mask.shape != ids.shape:
            raise InferenceError(f"attention_mask shape {mask.shape} differs from prompt_ids shape {ids.shape}")
        for row in range(b):
            real = np.flatnonzero(mask[row])
            if real.size and (real[0] > 0 or real[-1] != real.size - 1):
                raise InferenceError(
                    f"left padding is not supported (sequence {row} has padding before a real token): "
                    "compression windows start at position 0, so right-pad prompts and pass lengths / a mask "
                    "of the form 1..10..0")
        mask_lengths = mask.sum(axis=1)
        if lengths is not None and not np.array_equal(np.asarray(lengths), mask_lengths):
            raise InferenceError(f"lengths {np.asarray(lengths).tolist()} disagree with attention_mask "
                                 f"{mask_lengths.tolist()}")
        lengths = mask_lengths
    lengths = np.full((b,), t) if lengths is None else np.asarray(lengths).astype(np.int64).reshape(-1)
    if lengths.shape != (b,):
        raise InferenceError(f"lengths must have one entry per sequence ({b}), got shape {lengths.shape}")
    if (lengths <= 0).any():
        raise InferenceError(f"empty prompt: sequence(s) {np.flatnonzero(lengths <= 0).tolist()} have length 0")
    if (lengths > t).any():
        raise InferenceError(f"lengths {lengths.tolist()} exceed the prompt width {t}")
    return lengths.astype(np.int32)


def check_token_ids(cfg: ModelConfig, ids: np.ndarray, lengths: np.ndarray | None = None) -> None:
    ids = np.asarray(ids)
    if ids.ndim == 2 and lengths is not None:
        ids = ids[np.arange(ids.shape[1])[None, :] < np.asarray(lengths)[:, None]]
    if ids.size and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
        raise InferenceError(f"token id out of range: ids span [{ids.min()}, {ids.max()}] but "
                             f"vocab_size={cfg.vocab_size}")


def check_max_len(lengths: np.ndarray, max_len: int, new_tokens: int = 0, speculative: bool = False) -> None:
    """Positions needed: the prompt, plus every generated token but the last (it is never fed back), plus one
    for the draft a speculative step verifies."""
    longest = int(np.max(lengths))
    needed = longest + max(new_tokens - 1, 0) + (1 if speculative and new_tokens else 0)
    if needed > max_len:
        what = f"a prompt of {longest} tokens" + (f" + {new_tokens} new tokens" if new_tokens else "")
        raise InferenceError(f"{what} needs {needed} cache positions, more than max_len={max_len}; raise max_len "
                             "or shorten the prompt")


def main_params(params: dict) -> dict:
    """The parameters plain decoding reads (without the MTP module), so its compiled steps don't depend on it."""
    return {k: v for k, v in params.items() if k != "mtp"}


# ----- prefill -------------------------------------------------------------------------------------------

def _layer_cache(cfg: ModelConfig, layer_type: str, state: AttentionState, lengths: jax.Array, max_len: int
                 ) -> LayerCache:
    window = ring_from_sequence(state.kv, lengths, cfg.sliding_window)
    if layer_type == SLIDING:
        return LayerCache(window=window)
    ratio = cfg.compress_ratio(layer_type)
    size = pending_size(cfg, layer_type)
    c = state.entries
    compressor = CompressorCache(kv=ring_from_sequence(c.token_kv, lengths, size),
                                 gate=ring_from_sequence(c.token_gate, lengths, size),
                                 entries=entries_from_sequence(c.values, lengths, ratio, max_len // ratio,
                                                               compute_dtype(cfg)))
    indexer = None
    if layer_type == CSA:
        k = state.index_keys
        indexer = CompressorCache(kv=ring_from_sequence(k.token_kv, lengths, 2 * ratio),
                                  gate=ring_from_sequence(k.token_gate, lengths, 2 * ratio),
                                  entries=entries_from_sequence(k.values, lengths, ratio, max_len // ratio,
                                                                INDEX_KEY_DTYPE))
    return LayerCache(window=window, compressor=compressor, indexer=indexer)


def embed_streams(params: dict, cfg: ModelConfig, ids: jax.Array) -> jax.Array:
    h0 = params["embed"][ids].astype(compute_dtype(cfg))
    return jnp.broadcast_to(h0[:, :, None, :], (*h0.shape[:2], cfg.residual_streams, h0.shape[-1]))


def head_logits(params: dict, cfg: ModelConfig, streams: jax.Array) -> jax.Array:
    """Final streams [B, S, n, D] -> logits [B, S, V] float32."""
    hidden = rms_norm(hc_head(params["hc_head"], cfg, streams), params["final_norm"], cfg.rms_norm_eps)
    return logits_from_hidden(params, hidden)


class PrefillOutput(NamedTuple):
    logits: jax.Array  # [B, V] float32 at each prompt's last real token
    cache: DecodeCache
    streams: jax.Array  # [B, T, n, D] last main layer's streams over the padded prompt (feeds MTP)


@xla_options.jit(static_argnames=("cfg", "max_len", "moe_strategy"))
def prefill_jit(params: dict, cfg: ModelConfig, prompt_ids: jax.Array, lengths: jax.Array, *, max_len: int,
                moe_strategy: str = "auto") -> PrefillOutput:
    """Unchecked prefill (see `prefill`)."""
    b, t = prompt_ids.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    segment_ids = jnp.zeros((b, t), jnp.int32)
    streams = embed_streams(params, cfg, prompt_ids)

    def layer(streams, p, attn_type):
        def attn(ap, x):
            return attention_with_state(ap, cfg, attn_type, x, positions, segment_ids)

        streams, _, state = block_with(attn, p, cfg, streams, prompt_ids, moe_strategy)
        return streams, _layer_cache(cfg, attn_type, state, lengths, max_len)

    if "layers" in params:  # per-layer weights (params.unstack_layers): one layer after another
        caches = []
        for (attn_type, _), p in layer_params(params, cfg):
            streams, c = layer(streams, p, attn_type)
            caches.append(c)
    else:  # stacked weights: a scan per segment
        stacked_caches = []
        for segment, seg_params in zip(layer_segments(cfg), params["segments"]):

            def body(streams, pattern_params, segment=segment):
                pattern_caches = []
                for (attn_type, _), p in zip(segment.kinds, pattern_params):
                    streams, c = layer(streams, p, attn_type)
                    pattern_caches.append(c)
                return streams, pattern_caches

            streams, seg_cache = segment.scan(body, streams, seg_params)
            stacked_caches.append(seg_cache)
        caches = per_layer(stacked_caches, cfg)  # the decode cache is per layer (cache.py)
    last = jnp.take_along_axis(streams, (lengths - 1)[:, None, None, None], axis=1)  # [B, 1, n, D]
    logits = head_logits(params, cfg, last)[:, 0]
    cache = DecodeCache(layers=caches, lengths=lengths.astype(jnp.int32), max_len=max_len)
    return PrefillOutput(logits, cache, streams)


def prefill(params: dict, cfg: ModelConfig, prompt_ids: Any, lengths: Any = None, max_len: int | None = None, *,
            attention_mask: Any = None, moe_strategy: str = "auto", kernels: str | None = None
            ) -> tuple[jax.Array, DecodeCache]:
    """Process right-padded prompts [B, T] (real lengths [B], or an attention mask) into a fresh cache of
    `max_len` positions (default T). kernels overrides cfg.kernels for the attention core.
    -> (logits [B, V] float32 of each prompt's last token, cache)."""
    if kernels is not None:
        cfg = cfg.replace(kernels=kernels)
    lengths = prompt_lengths(prompt_ids, lengths, attention_mask)
    check_token_ids(cfg, prompt_ids, lengths)
    max_len = int(np.asarray(prompt_ids).shape[1] if max_len is None else max_len)
    check_max_len(lengths, max_len)
    ids = jnp.asarray(prompt_ids, jnp.int32)[:, :max_len]
    out = prefill_jit(main_params(params), cfg, ids, jnp.asarray(lengths), max_len=max_len,
                      moe_strategy=moe_strategy)
    return out.logits, out.cache


# ----- cached steps --------------------------------------------------------------------------------------

def run_layers_cached(params: dict, cfg: ModelConfig, cache: DecodeCache, streams: jax.Array, tokens: jax.Array,
                      positions: jax.Array, moe_strategy: str = "auto") -> tuple[jax.Array, list]:
    """streams [B, S, n, D] of S new tokens through every decoder layer -> (streams, new layer caches).

    The layers are unrolled, not scanned: a step moves a few tokens through each weight once, so it is bound by
    reading the weights, and a scan would copy every layer's weights (and cache) out of the stacks first.
    Over `unstack_layers` params every matrix is read where it lies."""
    moe_strategy = decode_strategy(cfg, tokens.size, moe_strategy)
    new_layers = []
    for ((attn_type, _), p), c in zip(layer_params(params, cfg), cache.layers):
        def attn(ap, x, attn_type=attn_type, c=c):
            return cached_attention(ap, cfg, attn_type, x, positions, c)

        streams, _, c = block_with(attn, p, cfg, streams, tokens, moe_strategy)
        new_layers.append(c)
    return streams, new_layers


def forward_chunk(params: dict, cfg: ModelConfig, cache: DecodeCache, tokens: jax.Array,
                  moe_strategy: str = "auto") -> tuple[jax.Array, jax.Array, DecodeCache]:
    """Feed S tokens per sequence [B, S] at positions lengths .. lengths + S - 1.
    -> (logits [B, S, V] float32, last main layer streams [B, S, n, D], cache with lengths + S)."""
    s = tokens.shape[1]
    if s > cfg.sliding_window or s > min(cfg.csa_compress_ratio, cfg.hca_compress_ratio):
        raise InferenceError(f"a cached chunk of {s} tokens is longer than the window or a compression ratio")
    positions = cache.lengths[:, None] + jnp.arange(s, dtype=jnp.int32)
    streams = embed_streams(params, cfg, tokens)
    streams, layers = run_layers_cached(params, cfg, cache, streams, tokens, positions, moe_strategy)
    logits = head_logits(params, cfg, streams)
    return logits, streams, cache.replace(layers=layers, lengths=cache.lengths + s)


@xla_options.jit(static_argnames=("cfg", "moe_strategy"), donate_argnames=("cache",))
def decode_step_jit(params: dict, cfg: ModelConfig, cache: DecodeCache, token: jax.Array,
                    moe_strategy: str = "auto") -> tuple[jax.Array, DecodeCache]:
    logits, _, cache = forward_chunk(params, cfg, cache, token[:, None], moe_strategy)
    return logits[:, 0], cache


def decode_step(params: dict, cfg: ModelConfig, cache: DecodeCache, token: Any, *, moe_strategy: str = "auto"
                ) -> tuple[jax.Array, DecodeCache]:
    """One token per sequence [B] at position cache.lengths -> (logits [B, V] float32, cache).
    The cache argument is donated (its buffers are reused): keep only the returned one. For a loop of steps,
    pass `deepmoe.params.unstack_layers(params, cfg)` (converted once): each step then reads the weights in
    place instead of copying them out of the layer stacks."""
    if not isinstance(token, jax.core.Tracer):
        host = np.asarray(token)
        if host.shape != cache.lengths.shape:
            raise InferenceError(f"token must have shape {cache.lengths.shape} (one per sequence), got {host.shape}")
        check_token_ids(cfg, host)
        if int(np.max(np.asarray(cache.lengths))) >= cache.max_len:
            raise InferenceError(f"the cache is full (max_len={cache.max_len}); prefill with a larger max_len")
    return decode_step_jit(main_params(params), cfg, cache, jnp.asarray(token, jnp.int32), moe_strategy=moe_strategy)


__all__ = ["InferenceError", "PrefillOutput", "decode_step", "forward_chunk", "init_cache", "prefill",
           "prefill_jit", "prompt_lengths"]
