"""RoPE against numpy's complex rotation: channel pairs (2i, 2i+1) of the trailing rope dims are the complex
number a + ib multiplied by exp(i * pos * freq_i) (by its conjugate for the inverse); the leading channels stay
as they were, bit for bit, in float32 and in bfloat16."""

import jax.numpy as jnp
import numpy as np
import pytest

import deepmoe as dm
from deepmoe.config import CSA, SLIDING
from deepmoe.layers.rope import apply_rope, inverse_frequencies


def _numpy_rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray, inverse: bool) -> np.ndarray:
    rd = 2 * len(inv_freq)
    pairs = x[..., -rd:].astype(np.float64).reshape(*x.shape[:-1], rd // 2, 2)
    z = pairs[..., 0] + 1j * pairs[..., 1]
    z = z * np.exp((-1j if inverse else 1j) * positions[..., None] * inv_freq)
    out = x.astype(np.float64).copy()
    out[..., -rd:] = np.stack([z.real, z.imag], axis=-1).reshape(*x.shape[:-1], rd)
    return out


@pytest.mark.parametrize("layer_type", [SLIDING, CSA])
@pytest.mark.parametrize("inverse", [False, True])
def test_rotation_matches_complex_multiplication(layer_type, inverse):
    cfg = dm.preset("small")
    inv_freq = inverse_frequencies(cfg, layer_type)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 9, 3, cfg.head_dim)).astype(np.float32)  # [B, T, H, c]
    positions = rng.integers(0, 1000, size=(2, 9)).astype(np.int32)  # fp32 angles: error ~ pos * 6e-8
    got = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(positions)[..., None], inv_freq, inverse=inverse))
    want = _numpy_rope(x, positions[..., None], inv_freq, inverse)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    unrotated = cfg.head_dim - cfg.rope_head_dim
    np.testing.assert_array_equal(got[..., :unrotated], x[..., :unrotated])


def test_bfloat16_keeps_unrotated_channels_and_rotates_in_float32():
    cfg = dm.preset("small")
    inv_freq = inverse_frequencies(cfg, SLIDING)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 7, cfg.head_dim)), jnp.bfloat16)
    positions = jnp.arange(7)
    got = apply_rope(x, positions, inv_freq)
    assert got.dtype == jnp.bfloat16
    want = _numpy_rope(np.asarray(x, np.float32), np.arange(7), inv_freq, False)
    np.testing.assert_array_equal(np.asarray(got[..., :-cfg.rope_head_dim]), np.asarray(x[..., :-cfg.rope_head_dim]))
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-2, atol=1e-2)


def test_inverse_undoes_the_rotation():
    cfg = dm.preset("small")
    inv_freq = inverse_frequencies(cfg, SLIDING)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 5, cfg.head_dim)), jnp.float32)
    back = apply_rope(apply_rope(x, jnp.arange(5), inv_freq), jnp.arange(5), inv_freq, inverse=True)
    np.testing.assert_allclose(np.asarray(back), np.asarray(x), rtol=1e-5, atol=1e-5)
