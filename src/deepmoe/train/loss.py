"""Training losses (spec §7, §8, §12): masked next-token CE, MTP CE, sequence-wise balance loss, z-loss.

Masking: the target of position t is token t+k (k = 1 main head, k = 2 MTP). It counts only if the tokens
t..t+k all lie in the same document (segment id) and the target is not padding. So the EOS at the end of a
document is predicted, but nothing predicts across into the next document, and the tail positions of a row
(t+k >= T) carry no loss.

Losses return *sums* and counts, so a step can normalise by the whole batch's count once and gradient
accumulation over micro-batches gives exactly the full-batch gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def shifted(x: jax.Array, k: int, fill) -> jax.Array:
    """[B, T] -> [B, T] with out[:, t] = x[:, t+k] (fill past the end)."""
    return jnp.concatenate([x[:, k:], jnp.full((x.shape[0], k), fill, x.dtype)], axis=1)


def target_mask(input_ids: jax.Array, segment_ids: jax.Array | None, k: int = 1,
                pad_id: int | None = None) -> jax.Array:
    """[B, T] bool: position t has a valid target t+k (same document throughout, not padding, inside the row)."""
    b, t = input_ids.shape
    valid = jnp.arange(t)[None, :] < t - k
    valid = jnp.broadcast_to(valid, (b, t))
    if segment_ids is not None:
        for j in range(1, k + 1):
            valid &= shifted(segment_ids, j, -1) == shifted(segment_ids, j - 1, -1)
    if pad_id is not None:
        valid &= shifted(input_ids, k, pad_id) != pad_id
    return valid


def cross_entropy_sum(logits: jax.Array, input_ids: jax.Array, mask: jax.Array, k: int = 1
                      ) -> tuple[jax.Array, jax.Array]:
    """Sum of -log p(token t+k | ..) over masked positions, and the sum of logsumexp^2 there (for z-loss).
    logits [B, T, V] float32; input_ids [B, T]; mask [B, T] from `target_mask`."""
    targets = shifted(input_ids, k, 0)
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    m = mask.astype(jnp.float32)
    return jnp.sum((lse - picked) * m), jnp.sum(jnp.square(lse) * m)


def balance_loss_per_layer(expert_counts: jax.Array, mean_affinity: jax.Array, experts_per_token: int
                           ) -> jax.Array:
    """DeepSeek-V3 sequence-wise balance loss sum_i f_i P_i, per layer, summed over the batch's sequences.

    expert_counts [L, B, E]: tokens of each sequence routed to expert i (top-k counted k times);
    mean_affinity [L, B, E]: P_i, the sequence mean of the normalised affinities (differentiable).
    f_i = E / (K T) * count_i, so f = 1 everywhere for a perfectly balanced sequence. Returns [L] (sum over B:
    divide by the number of sequences). A balanced router scores 1 per sequence.
    """
    e = expert_counts.shape[-1]
    tokens = jnp.sum(expert_counts, axis=-1, keepdims=True) / experts_per_token  # T per sequence
    f = jax.lax.stop_gradient(e * expert_counts / (experts_per_token * jnp.maximum(tokens, 1.0)))
    return jnp.sum(f * mean_affinity, axis=(-1, -2))


def bits_per_byte(ce_sum_nats: float, num_bytes: int) -> float:
    """Total cross-entropy (nats, EOS targets included) per byte target, in bits."""
    return float(ce_sum_nats) / max(int(num_bytes), 1) / float(jnp.log(2.0))
