"""`generate`: prefill, then a jitted decode loop (plain sampling or MTP self-speculative greedy decoding).

Plain decoding without a callback runs the whole loop as one jitted `lax.while_loop` (no host round trip per
token); with a callback (streaming) it is a Python loop over jitted, cache-donating steps and the callback sees
each step's tokens as they come. Both give identical tokens. Speculative decoding always runs the Python loop
(one step = one MTP draft + a two-token verify). Sampling is deterministic given `key`: the
token at output index i is drawn with `fold_in(key, i)`.

Calls reuse compiled programs across prompt lengths and token counts: the prompt is right-padded to a multiple
of PROMPT_BUCKET columns, the default cache to a multiple of CACHE_BUCKET positions, and the output buffer has
one column per cache position (the loop stops at the number of tokens asked for). Padding changes no token: the
model is causal, prefill reads each prompt's real length, and a step masks the cache beyond it.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from deepmoe.backend import xla_options
from deepmoe.config import ModelConfig
from deepmoe.infer.decode import (InferenceError, check_max_len, check_token_ids, decode_step_jit, forward_chunk,
                                  main_params, prefill_jit, prompt_lengths)
from deepmoe.infer.sampling import sample, sampling_params
from deepmoe.infer.speculative import require_mtp, spec_prefill, spec_step_jit
from deepmoe.params import unstack_layers

# Shape buckets (see the module docstring). 64 prompt columns keep a short prompt's prefill short; 128 cache
# positions are a whole number of entries for V4's compression ratios (4 and 128).
PROMPT_BUCKET = 64
CACHE_BUCKET = 128

Callback = Callable[[np.ndarray, np.ndarray], Any]  # (tokens [B, k], emitted mask [B, k]) per step


@struct.dataclass
class Output:
    tokens: jax.Array  # [B, N] int32, pad_token after a sequence ends
    count: jax.Array  # [B] int32 tokens written so far (a stop token counts)
    done: jax.Array  # [B] bool
    steps: jax.Array  # [] int32 decode steps taken
    drafted: jax.Array  # [] int32 speculative drafts proposed by live sequences
    accepted: jax.Array  # [] int32 drafts accepted
    limit: jax.Array  # [] int32 tokens wanted per sequence (the buffer's N is the cache length)


@dataclasses.dataclass(frozen=True)
class GenerateResult:
    tokens: np.ndarray  # [B, max_new_tokens] int32; after `lengths[b]` tokens: pad
    lengths: np.ndarray  # [B] generated tokens per sequence, including a final stop token
    stats: dict  # prompt/generated token counts, timings, tokens/s, speculative acceptance rate

    def __iter__(self):  # `tokens, lengths = generate(...)`
        return iter((self.tokens, self.lengths))


def _emit(out: Output, tokens: jax.Array, count: jax.Array, stops: jax.Array) -> tuple[Output, jax.Array]:
    """Append up to tokens.shape[1] tokens per live sequence (the first `count`), stopping at a stop token.
    -> (output, emitted mask [B, k])."""
    buffer, n, done = out.tokens, out.count, out.done
    batch = jnp.arange(buffer.shape[0])
    emitted = []
    for j in range(tokens.shape[1]):
        live = (j < count) & ~done
        buffer = buffer.at[batch, jnp.where(live, n, buffer.shape[1])].set(tokens[:, j], mode="drop")
        n = n + live
        done = done | (live & jnp.isin(tokens[:, j], stops)) | (n >= out.limit)
        emitted.append(live)
    return out.replace(tokens=buffer, count=n, done=done), jnp.stack(emitted, axis=1)


def _new_output(batch: int, n_max: int, pad: int, limit: int) -> Output:
    return Output(tokens=jnp.full((batch, n_max), pad, jnp.int32), count=jnp.zeros((batch,), jnp.int32),
                  done=jnp.zeros((batch,), bool), steps=jnp.zeros((), jnp.int32),
                  drafted=jnp.zeros((), jnp.int32), accepted=jnp.zeros((), jnp.int32),
                  limit=jnp.asarray(limit, jnp.int32))


def round_up(n: int, bucket: int) -> int:
    return -(-n // bucket) * bucket


# ----- steps ---------------------------------------------------------------------------------------------

def _next_token(logits, out, key, sp, stops, greedy, first=False):
    """Sample the next token and append it; the PRNG stream of a token is its output index (0 = the token
    after the prompt, step s gives index s + 1), the same in both loops. -> (token [B], out, emitted [B, 1])."""
    index = 0 if first else out.steps + 1
    token = sample(logits, jax.random.fold_in(key, index), sp, greedy)
    new, emitted = _emit(out, token[:, None], jnp.ones_like(token), stops)
    return token, new.replace(steps=out.steps + (0 if first else 1)), emitted


_sample_emit = jax.jit(_next_token, static_argnames=("greedy", "first"), donate_argnames=("out",))


def _plain_step(params, cfg, carry, key, sp, stops, greedy, moe_strategy):
    cache, last, out = carry
    logits, _, cache = forward_chunk(params, cfg, cache, last[:, None], moe_strategy)
    token, out, _ = _next_token(logits[:, 0], out, key, sp, stops, greedy)
    return cache, token, out


def _count_drafts(out: Output, live: jax.Array, count: jax.Array) -> Output:
    return out.replace(steps=out.steps + 1, drafted=out.drafted + jnp.sum(live),
                       accepted=out.accepted + jnp.sum(live & (count == 2)))


@functools.partial(jax.jit, donate_argnames=("out",))
def _emit_spec(out, tokens, count, stops):
    live = ~out.done
    out, emitted = _emit(out, tokens, count, stops)
    return _count_drafts(out, live, count), emitted


@xla_options.jit(static_argnames=("cfg", "greedy", "moe_strategy"), donate_argnames=("carry",))
def _loop(params, cfg, carry, key, sp, stops, *, greedy, moe_strategy):
    """The whole plain decode loop on device: steps until every sequence is done or has its tokens."""
    def cond(c):
        out = c[-1]
        return (out.steps < out.limit) & ~jnp.all(out.done)

    return jax.lax.while_loop(cond, lambda c: _plain_step(params, cfg, c, key, sp, stops, greedy, moe_strategy),
                              carry)


@functools.partial(jax.jit, static_argnames=("n_max", "pad"), donate_argnames=("state",))
def _first_spec_token(logits, state, stops, limit, *, n_max, pad):
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    out, _ = _emit(_new_output(logits.shape[0], n_max, pad, limit), token[:, None], jnp.ones_like(token), stops)
    return token, state.replace(tokens=state.tokens.at[:, 1].set(token)), out


# ----- public API ---------------------------------------------------------------------------------------

def pad_prompts(prompts: Sequence[Sequence[int]], pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Ragged token lists -> (right-padded ids [B, T] int32, lengths [B])."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    ids = np.full((len(prompts), max(int(lengths.max(initial=0)), 1)), pad, np.int32)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = np.asarray(p, np.int32)
    return ids, lengths


def _as_batch(prompt_ids: Any) -> tuple[np.ndarray, np.ndarray | None]:
    if isinstance(prompt_ids, (list, tuple)) and prompt_ids and isinstance(prompt_ids[0], (list, tuple, np.ndarray)):
        if len({len(p) for p in prompt_ids}) > 1:
            return pad_prompts(prompt_ids)
    ids = np.asarray(prompt_ids)
    if ids.ndim == 1:
        ids = ids[None, :]
    return ids, None


def generate(params: dict, cfg: ModelConfig, prompt_ids: Any, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, key: jax.Array | None = None,
             stop_tokens: Sequence[int] | None = None, callback: Callback | None = None, *,
             lengths: Any = None, attention_mask: Any = None, speculative: bool = False, max_len: int | None = None,
             pad_token_id: int | None = None, moe_strategy: str = "auto", kernels: str | None = None
             ) -> GenerateResult:
    """Generate `max_new_tokens` per prompt.

    prompt_ids: [B, T] right-padded ids (with `lengths` [B] or `attention_mask`), one sequence [T], or a list of
    token lists of different lengths. temperature 0 = greedy; top_k / top_p filter before sampling.
    stop_tokens: default (cfg.eos_token_id,); () disables stopping. callback(tokens [B, k], emitted [B, k]) is
    called after every step (k = 1, or 2 when speculative). speculative=True drafts with the MTP module
    (greedy only; output identical to plain greedy). kernels: override cfg.kernels ("reference" | "pallas" |
    "auto") for the attention core of the prompt's prefill.
    params: stacked (`init_params`, `load_pretrained`) or per-layer (`deepmoe.params.unstack_layers`); the
    steps run on per-layer weights, so stacked ones are copied into that layout at every call: convert once
    when generating repeatedly.
    -> GenerateResult(tokens [B, N], lengths [B], stats).
    """
    # Only the prompt's full-sequence pass has a kernel path (cached steps attend through infer.attention), so
    # the override goes to prefill alone and the decode steps keep one compilation whatever the choice.
    prefill_cfg = cfg if kernels is None else cfg.replace(kernels=kernels)  # validation rejects unknown names
    if max_new_tokens <= 0:
        raise InferenceError(f"max_new_tokens must be positive, got {max_new_tokens}")
    ids, ragged_lengths = _as_batch(prompt_ids)
    if ragged_lengths is not None:
        lengths = ragged_lengths
    lengths = prompt_lengths(ids, lengths, attention_mask)
    check_token_ids(cfg, ids, lengths)
    greedy = temperature == 0.0
    if speculative:
        require_mtp(params, cfg)
        if not greedy:
            raise InferenceError("speculative decoding is greedy-only here (it must reproduce plain greedy "
                                 "output); use temperature=0 or speculative=False")
    if not greedy and key is None:
        raise InferenceError("sampling (temperature > 0) needs a PRNG key: key=jax.random.key(seed)")
    sp = sampling_params(temperature, top_k, top_p)
    key = jax.random.key(0) if key is None else key
    stops = tuple(int(s) for s in ((cfg.eos_token_id,) if stop_tokens is None else stop_tokens))
    stops_array = jnp.asarray(stops if stops else (-1,), jnp.int32)
    pad = cfg.eos_token_id if pad_token_id is None else int(pad_token_id)
    # Plain decoding needs prompt + new - 1 positions, speculative one more; one size serves both.
    max_len = round_up(int(lengths.max()) + max_new_tokens, CACHE_BUCKET) if max_len is None else int(max_len)
    check_max_len(lengths, max_len, max_new_tokens, speculative)

    n_max = max_len  # >= max_new_tokens; a buffer of the cache's length adds no shape of its own
    width = min(round_up(int(lengths.max()), PROMPT_BUCKET), max_len)
    prompt = np.full((ids.shape[0], width), pad, np.int32)
    prompt[:, :min(ids.shape[1], width)] = ids[:, :width]
    prompt = jnp.asarray(prompt)
    t0 = time.perf_counter()
    # Per-layer weights (a copy of the layer stacks, unless the caller passes them so): the token steps then
    # read every matrix in place (params.unstack_layers).
    params = unstack_layers(params if speculative else main_params(params), cfg)
    if speculative:
        logits, state = spec_prefill(params, prefill_cfg, prompt, jnp.asarray(lengths), max_len=max_len,
                                     moe_strategy=moe_strategy)
        first, state, out = _first_spec_token(logits, state, stops_array, max_new_tokens, n_max=n_max, pad=pad)
        carry = (state, out)
    else:
        pre = prefill_jit(params, prefill_cfg, prompt, jnp.asarray(lengths), max_len=max_len,
                          moe_strategy=moe_strategy)
        first, out, _ = _sample_emit(pre.logits, _new_output(ids.shape[0], n_max, pad, max_new_tokens), key, sp,
                                     stops_array, greedy=greedy, first=True)
        carry = (pre.cache, first, out)
    jax.block_until_ready(carry)
    t1 = time.perf_counter()
    if callback is not None or speculative:  # Python loop over jitted, cache-donating steps
        if callback is not None:
            callback(np.asarray(first)[:, None], np.ones((ids.shape[0], 1), bool))
        while int(carry[-1].steps) < max_new_tokens and not bool(jnp.all(carry[-1].done)):
            if speculative:
                state, out = carry
                no_force = jnp.zeros(state.cache.lengths.shape, bool)
                step, state = spec_step_jit(params, cfg, state, moe_strategy, no_force.astype(jnp.int32), no_force)
                tokens, count = step.tokens, step.count
                out, emitted = _emit_spec(out, tokens, count, stops_array)
                carry = (state, out)
            else:
                cache, last, out = carry
                logits, cache = decode_step_jit(params, cfg, cache, last, moe_strategy=moe_strategy)
                tokens, out, emitted = _sample_emit(logits, out, key, sp, stops_array, greedy=greedy)
                tokens = tokens[:, None]
                carry = (cache, tokens[:, 0], out)
            if callback is not None:
                callback(np.asarray(tokens), np.asarray(emitted))
    else:
        carry = _loop(params, cfg, carry, key, sp, stops_array, greedy=greedy, moe_strategy=moe_strategy)
    out = jax.device_get(carry[-1])
    t2 = time.perf_counter()
    generated = int(out.count.sum())
    steps = int(out.steps)
    stats = {
        "batch": int(ids.shape[0]), "prompt_tokens": int(lengths.sum()), "generated_tokens": generated,
        "prefill_s": t1 - t0, "decode_s": t2 - t1, "decode_steps": steps,
        "prefill_tokens_per_s": float(lengths.sum()) / max(t1 - t0, 1e-9),
        "decode_tokens_per_s": (generated - int(ids.shape[0])) / max(t2 - t1, 1e-9),
        "max_len": max_len, "speculative": speculative,
    }
    if speculative:
        stats["drafted"] = int(out.drafted)
        stats["accepted"] = int(out.accepted)
        stats["acceptance_rate"] = int(out.accepted) / max(int(out.drafted), 1)
        stats["tokens_per_step"] = 1 + stats["acceptance_rate"]  # per live sequence
    return GenerateResult(tokens=np.asarray(out.tokens)[:, :max_new_tokens], lengths=np.asarray(out.count),
                          stats=stats)
