"""Token sampling: greedy, temperature, top-k, top-p (nucleus), in that order (as transformers applies them).

Rules (the tests' numpy reference implements the same):
  * temperature 0 = greedy (argmax; ties go to the lower id);
  * top_k: keep logits >= the k-th largest (ties at the threshold are kept); 0 / None = off;
  * top_p: sort descending, keep each token whose *preceding* probability mass is < top_p (so the most likely
    token always survives), again keeping ties at the threshold; 1.0 / None = off.
Sampling parameters are traced values (changing them does not recompile); only greedy-or-not is static.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class SamplingParams(NamedTuple):
    temperature: jax.Array  # [] float32, > 0 (greedy is chosen statically, see `is_greedy`)
    top_k: jax.Array  # [] int32, 0 = off
    top_p: jax.Array  # [] float32, 1.0 = off


def sampling_params(temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
                    ) -> SamplingParams:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be a positive integer (or None / 0 for off), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    return SamplingParams(temperature=jnp.float32(temperature if temperature > 0 else 1.0),
                          top_k=jnp.int32(top_k or 0), top_p=jnp.float32(1.0 if top_p is None else top_p))


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """logits [..., V] float32 (already divided by the temperature) -> the same with removed tokens at -inf."""
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    ordered = -jnp.sort(-logits, axis=-1)  # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take(ordered, k - 1, axis=-1)[..., None]
    logits = jnp.where(logits >= kth, logits, -jnp.inf)
    ordered = jnp.where(ordered >= kth, ordered, -jnp.inf)
    probs = jax.nn.softmax(ordered, axis=-1)
    preceding = jnp.cumsum(probs, axis=-1) - probs
    keep = jnp.where(top_p < 1.0, jnp.sum(preceding < top_p, axis=-1, keepdims=True), vocab)  # >= 1
    threshold = jnp.take_along_axis(ordered, keep - 1, axis=-1)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def sample(logits: jax.Array, key: jax.Array | None, params: SamplingParams | None, greedy: bool) -> jax.Array:
    """logits [B, V] -> token ids [B] int32."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits.astype(jnp.float32) / params.temperature
    return jax.random.categorical(key, filter_logits(scaled, params.top_k, params.top_p), axis=-1).astype(jnp.int32)
