"""Losses against numpy: masked next-token / MTP cross-entropy at document boundaries, the V3 balance loss."""

import numpy as np
import pytest

from deepmoe.train import loss as L


def _numpy_ce(logits, ids, seg, k, pad):
    """Reference: sum over (b, t) of -log softmax(logits[b, t])[ids[b, t+k]] where the target is inside the
    row, in the same document as every token between, and not padding."""
    total, count = 0.0, 0
    b, t, _ = logits.shape
    for i in range(b):
        for j in range(t - k):
            if any(seg[i, j + m] != seg[i, j] for m in range(1, k + 1)) or ids[i, j + k] == pad:
                continue
            row = logits[i, j].astype(np.float64)
            logp = row - (np.log(np.sum(np.exp(row - row.max()))) + row.max())
            total -= logp[ids[i, j + k]]
            count += 1
    return total, count


@pytest.mark.parametrize("k", [1, 2])
def test_masked_cross_entropy_matches_numpy(k):
    rng = np.random.default_rng(k)
    b, t, v = 3, 14, 11
    logits = rng.normal(size=(b, t, v)).astype(np.float32) * 3
    ids = rng.integers(3, v, (b, t)).astype(np.int32)
    seg = np.array([[1] * 5 + [2] * 6 + [3] * 3,  # three documents
                    [1] * 14,  # one document
                    [1] * 4 + [2] * 1 + [3] * 6 + [0] * 3], np.int32)  # a one-token document, then padding
    ids[2, 11:] = 2  # padding tokens
    mask = np.asarray(L.target_mask(ids, seg, k, pad_id=2))
    ce, z = L.cross_entropy_sum(logits, ids, mask, k)
    want, count = _numpy_ce(logits, ids, seg, k, pad=2)
    assert int(mask.sum()) == count
    np.testing.assert_allclose(float(ce), want, rtol=1e-5)
    # spot checks of the boundary rule
    assert not mask[0, 4] and mask[0, 3] == (k == 1)  # position 4 is the last token of document 1
    assert not mask[2, 10]  # the last real token's target would be padding
    lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    np.testing.assert_allclose(float(z), float((lse ** 2 * mask).sum()), rtol=1e-5)


def test_no_segments_means_one_document():
    ids = np.arange(3, 11, dtype=np.int32)[None]
    mask = np.asarray(L.target_mask(ids, None, 1, pad_id=None))
    assert mask.tolist() == [[True] * 7 + [False]]


def test_balance_loss_matches_formula():
    rng = np.random.default_rng(0)
    layers, b, t, e, k = 2, 3, 10, 6, 2
    counts = np.zeros((layers, b, e), np.float32)
    for l_ in range(layers):
        for i in range(b):
            for _ in range(t):
                counts[l_, i, rng.choice(e, k, replace=False)] += 1
    aff = rng.random((layers, b, e)).astype(np.float32)
    aff /= aff.sum(-1, keepdims=True)
    got = np.asarray(L.balance_loss_per_layer(counts, aff, k))
    want = np.array([sum(sum(e / (k * t) * counts[l_, i, j] * aff[l_, i, j] for j in range(e)) for i in range(b))
                     for l_ in range(layers)])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # perfectly balanced routing and uniform affinity: exactly 1 per sequence
    even = np.full((1, 1, e), k * t / e, np.float32)
    np.testing.assert_allclose(np.asarray(L.balance_loss_per_layer(even, np.full((1, 1, e), 1 / e), k)), [1.0],
                               rtol=1e-6)


def test_bits_per_byte():
    assert L.bits_per_byte(np.log(2) * 8 * 100, 100) == pytest.approx(8.0)
