"""Sampling: top-k / top-p masks against a numpy reference, the sampled distribution, determinism given a key.
(The streaming and on-device loops share `_next_token`; their equality is tested greedily in test_infer_decode.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepmoe as dm
from deepmoe.infer import filter_logits, generate, sample, sampling_params

F32 = dm.preset("tiny").replace(compute_dtype="float32")
LENGTHS = np.array([5, 23])  # the shapes of tests/test_infer_decode.py (shared compiled prefill / decode step)
NEW_TOKENS = 20
MAX_LEN = 80


def numpy_filter(logits: np.ndarray, top_k: int | None, top_p: float | None) -> np.ndarray:
    """Per row: keep the k largest (and ties), then the smallest prefix of the descending order whose mass
    before each kept token is < top_p (and ties of the last kept value)."""
    out = np.array(logits, np.float64)
    for row in out:
        if top_k:
            kth = np.sort(row)[::-1][top_k - 1]
            row[row < kth] = -np.inf
        if top_p is not None and top_p < 1.0:
            order = np.argsort(-row, kind="stable")
            finite = row[order] > -np.inf
            probs = np.zeros(len(row))
            z = row[order][finite]
            probs[finite] = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
            before = 0.0
            last_kept = None
            for i, p in zip(order, probs):
                if before < top_p and row[i] > -np.inf:
                    last_kept = row[i]
                before += p
            row[row < last_kept] = -np.inf
    return out


@pytest.mark.parametrize("top_k,top_p", [(None, None), (1, None), (5, None), (None, 0.5), (None, 0.9),
                                         (7, 0.8), (3, 0.01), (64, 1.0)])
def test_filter_matches_numpy(top_k, top_p):
    rng = np.random.default_rng(top_k or 0)
    logits = rng.standard_normal((4, 64)).astype(np.float32) * 2
    logits[1, :8] = logits[1, 8]  # ties at the thresholds
    logits[2] = np.round(logits[2])
    sp = sampling_params(1.0, top_k, top_p)
    ours = np.asarray(filter_logits(jnp.asarray(logits), sp.top_k, sp.top_p))
    expected = numpy_filter(logits, top_k, top_p)
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(expected))
    np.testing.assert_allclose(ours[np.isfinite(ours)], expected[np.isfinite(expected)], rtol=1e-6)
    assert np.isfinite(ours).sum(axis=1).min() >= 1


def test_samples_follow_the_filtered_distribution():
    logits = jnp.log(jnp.asarray([[0.4, 0.25, 0.15, 0.1, 0.06, 0.04]], jnp.float32))
    # top-k 4 renormalises to (0.4, 0.25, 0.15, 0.1) / 0.9; top-p 0.75 then keeps three tokens (the mass before
    # the third is 0.65 / 0.9 = 0.72 < 0.75, before the fourth 0.8 / 0.9 = 0.89)
    sp = sampling_params(1.0, top_k=4, top_p=0.75)
    keys = jax.random.split(jax.random.key(0), 20000)
    draws = np.asarray(jax.vmap(lambda k: sample(logits, k, sp, greedy=False)[0])(keys))
    counts = np.bincount(draws, minlength=6) / len(draws)
    expected = np.array([0.4, 0.25, 0.15, 0, 0, 0]) / 0.8
    np.testing.assert_allclose(counts, expected, atol=0.015)
    # temperature sharpens: T=0.5 squares the kept probabilities
    sp = sampling_params(0.5, top_k=2)
    draws = np.asarray(jax.vmap(lambda k: sample(logits, k, sp, greedy=False)[0])(keys))
    p = np.array([0.4, 0.25]) ** 2
    np.testing.assert_allclose(np.bincount(draws, minlength=2)[:2] / len(draws), p / p.sum(), atol=0.015)


@pytest.fixture(scope="module")
def prompt():
    ids = np.array(jax.random.randint(jax.random.key(8), (2, LENGTHS.max()), 0, F32.vocab_size))
    ids[0, LENGTHS[0]:] = 0
    return ids


def _run(params, prompt, **kw):
    return generate(params, F32, prompt, NEW_TOKENS, lengths=LENGTHS, stop_tokens=(), max_len=MAX_LEN,
                    callback=lambda t, e: None, **kw)  # the streaming loop


def test_sampling_is_deterministic_given_the_key(tiny_params, prompt):
    a = _run(tiny_params, prompt, temperature=0.8, top_p=0.9, key=jax.random.key(1))
    b = _run(tiny_params, prompt, temperature=0.8, top_p=0.9, key=jax.random.key(1))
    c = _run(tiny_params, prompt, temperature=0.8, top_p=0.9, key=jax.random.key(2))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (a.tokens != c.tokens).any()
    # top_k=1 sampling is greedy decoding
    greedy = _run(tiny_params, prompt)
    one = _run(tiny_params, prompt, temperature=1.3, top_k=1, key=jax.random.key(3))
    np.testing.assert_array_equal(one.tokens, greedy.tokens)
    assert (a.tokens != greedy.tokens).any()
