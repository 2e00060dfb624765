"""Self-speculative greedy decoding with the MTP module (spec §8): draft one token, verify two.

State at the start of a step (per sequence, t = cache.lengths): the main cache holds positions < t, token x_t
is known (emitted, not yet fed), `hidden` holds the last main layer's streams at t-2 and t-1 and `tokens` holds
(x_{t-1}, x_t). The MTP block at position p reads (streams at p, token p+1) and predicts token p+2.

  1. draft:  the MTP block over positions (t-2, t-1) -> logits at t-1 -> draft d for x_{t+1}.
             (Position t-2 is usually already in the MTP ring; recomputing it writes the same row again.)
  2. verify: the main model over [x_t, d] at positions (t, t+1) -> greedy y0 (at t) and y1 (at t+1).
             d == y0: accept, emit (d, y1), t += 2.  Otherwise emit y0, t += 1; the row written for t+1 is
             stale but harmless (see cache.py) and is overwritten by the next step.
Every emitted token is the main model's greedy choice given the true prefix, so the output is identical to
plain greedy decoding; the MTP module only decides how many tokens one step yields.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from deepmoe.config import SLIDING, ModelConfig
from deepmoe.infer.attention import cached_attention
from deepmoe.infer.cache import DecodeCache, LayerCache, ring_from_sequence
from deepmoe.infer.decode import InferenceError, forward_chunk, main_params, prefill_jit
from deepmoe.moe_dispatch.gather import decode_strategy
from deepmoe.layers.attention import project_query_kv
from deepmoe.layers.block import block_with
from deepmoe.layers.hyper import hc_pre
from deepmoe.layers.mtp import mtp_input, mtp_output, next_tokens
from deepmoe.layers.norms import rms_norm
from deepmoe.layers.rope import inverse_frequencies
from deepmoe.model import logits_from_hidden


@struct.dataclass
class SpecState:
    cache: DecodeCache  # main model; lengths = t
    mtp_window: jax.Array  # [B, W, c] the MTP block's kv ring (holds positions < t - 1)
    hidden: jax.Array  # [B, 2, n, D] last main layer streams at positions t-2, t-1 (zeros where negative)
    tokens: jax.Array  # [B, 2] int32 tokens x_{t-1}, x_t


def require_mtp(params: dict, cfg: ModelConfig) -> None:
    if not cfg.num_mtp_layers or "mtp" not in params:
        raise InferenceError("speculative decoding drafts with the MTP module, but this model has none "
                             "(num_mtp_layers=0 or no 'mtp' parameters); use plain decoding")


def spec_prefill(params: dict, cfg: ModelConfig, prompt_ids: jax.Array, lengths: jax.Array, *, max_len: int,
                 moe_strategy: str = "auto") -> tuple[jax.Array, SpecState]:
    """Prefill for speculative decoding -> (logits [B, V] at the last prompt token, state whose `tokens[:, 1]`
    the caller sets to the first generated token). Reuses plain prefill's compiled function."""
    out = prefill_jit(main_params(params), cfg, prompt_ids, lengths, max_len=max_len, moe_strategy=moe_strategy)
    window, hidden, tokens = _mtp_prefill(params, cfg, out.streams, prompt_ids, lengths)
    return out.logits, SpecState(cache=out.cache, mtp_window=window, hidden=hidden, tokens=tokens)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _mtp_prefill(params: dict, cfg: ModelConfig, streams: jax.Array, prompt_ids: jax.Array, lengths: jax.Array
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The MTP block's kv ring over the prompt, and the last two main streams / the last prompt token."""
    b, t = prompt_ids.shape
    mtp = params["mtp"]
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    # The ring needs only the kv rows of the MTP block's attention input, for positions 0 .. L-2 (position L-1
    # waits for the first generated token).
    x = mtp_input(mtp, cfg, streams, params["embed"], next_tokens(prompt_ids))
    x_in, _, _ = hc_pre(mtp["block"]["attn_hc"], cfg, x)
    x_in = rms_norm(x_in, mtp["block"]["attn_norm"], cfg.rms_norm_eps)
    _, _, kv = project_query_kv(mtp["block"]["attn"], cfg, x_in, positions, inverse_frequencies(cfg, SLIDING))
    window = ring_from_sequence(kv, lengths - 1, cfg.sliding_window)
    index = lengths[:, None] + jnp.arange(-2, 0)  # [B, 2]
    hidden = jnp.take_along_axis(streams, jnp.maximum(index, 0)[:, :, None, None], axis=1)
    hidden = jnp.where((index >= 0)[:, :, None, None], hidden, 0)
    last = jnp.take_along_axis(prompt_ids, (lengths - 1)[:, None], axis=1)[:, 0]
    tokens = jnp.stack([last, jnp.zeros_like(last)], axis=1).astype(jnp.int32)
    return window, hidden, tokens


def draft(params: dict, cfg: ModelConfig, state: SpecState, moe_strategy: str = "auto"
          ) -> tuple[jax.Array, jax.Array]:
    """-> (MTP logits [B, V] at position t-1, i.e. the prediction of x_{t+1}; updated MTP ring)."""
    mtp = params["mtp"]
    positions = state.cache.lengths[:, None] + jnp.arange(-2, 0, dtype=jnp.int32)  # [B, 2]
    x = mtp_input(mtp, cfg, state.hidden, params["embed"], state.tokens)
    ring = LayerCache(window=state.mtp_window)

    def attn(ap, xn):
        return cached_attention(ap, cfg, SLIDING, xn, positions, ring)

    strategy = decode_strategy(cfg, state.tokens.size, moe_strategy)
    x, _, ring = block_with(attn, mtp["block"], cfg, x, state.tokens, strategy)
    logits = logits_from_hidden(params, mtp_output(mtp, cfg, x[:, 1:]))[:, 0]
    return logits, ring.window


def verify(params: dict, cfg: ModelConfig, state: SpecState, drafted: jax.Array, moe_strategy: str = "auto"
           ) -> tuple[jax.Array, jax.Array, jax.Array, SpecState]:
    """Feed (x_t, draft) -> (logits [B, 2, V] at t, t+1; greedy tokens [B, 2]; how many of them are emitted [B]
    (1 or 2); new state)."""
    fed = jnp.stack([state.tokens[:, 1], drafted.astype(jnp.int32)], axis=1)
    lengths = state.cache.lengths
    logits, streams, cache = forward_chunk(params, cfg, state.cache, fed, moe_strategy)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, 2]
    accept = greedy[:, 0] == fed[:, 1]
    count = 1 + accept.astype(jnp.int32)
    sel = accept[:, None]
    hidden = jnp.where(sel[..., None, None], streams, jnp.concatenate([state.hidden[:, 1:], streams[:, :1]], 1))
    tokens = jnp.where(sel, greedy, jnp.stack([state.tokens[:, 1], greedy[:, 0]], axis=1))
    new = SpecState(cache=cache.replace(lengths=lengths + count), mtp_window=state.mtp_window, hidden=hidden,
                    tokens=tokens)
    return logits, greedy, count, new


class SpecStep(NamedTuple):
    mtp_logits: jax.Array  # [B, V] the MTP prediction of x_{t+1} (made at position t-1)
    logits: jax.Array  # [B, 2, V] main logits at t and t+1 (the latter meaningful only when accepted)
    tokens: jax.Array  # [B, 2] greedy tokens; the first `count` are emitted
    count: jax.Array  # [B] 1 or 2


def spec_step(params: dict, cfg: ModelConfig, state: SpecState, moe_strategy: str = "auto",
              forced_draft: jax.Array | None = None, force: jax.Array | None = None) -> tuple[SpecStep, SpecState]:
    """draft + verify. `forced_draft` [B] replaces the MTP proposal where `force` [B] is set (tests use it to
    drive accepted and rejected drafts)."""
    mtp_logits, window = draft(params, cfg, state, moe_strategy)
    proposal = jnp.argmax(mtp_logits, axis=-1).astype(jnp.int32)
    if forced_draft is not None:
        proposal = jnp.where(force, forced_draft.astype(jnp.int32), proposal)
    logits, tokens, count, state = verify(params, cfg, state.replace(mtp_window=window), proposal, moe_strategy)
    return SpecStep(mtp_logits, logits, tokens, count), state


spec_step_jit = jax.jit(spec_step, static_argnames=("cfg", "moe_strategy"), donate_argnames=("state",))
