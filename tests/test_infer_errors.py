"""Clear errors for prompts and caches inference cannot handle (all raised before anything compiles)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepmoe as dm
from deepmoe.infer import InferenceError, decode_step, generate, init_cache, prefill

CFG = dm.preset("tiny").replace(compute_dtype="float32")


@pytest.fixture(scope="module")
def params():
    # only shapes matter here: nothing runs
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), dm.abstract_params(CFG))


def test_prompt_longer_than_max_len(params):
    with pytest.raises(InferenceError, match="a prompt of 10 tokens needs 10 cache positions, more than max_len=8"):
        prefill(params, CFG, np.ones((1, 10), np.int32), max_len=8)
    with pytest.raises(InferenceError, match=r"10 tokens \+ 5 new tokens needs 14 cache positions, more than "
                                             "max_len=12"):
        generate(params, CFG, np.ones((1, 10), np.int32), 5, max_len=12)
    with pytest.raises(InferenceError, match="needs 15 cache positions, more than max_len=14"):
        generate(params, CFG, np.ones((1, 10), np.int32), 5, max_len=14, speculative=True)


def test_empty_prompt(params):
    with pytest.raises(InferenceError, match="empty prompt"):
        prefill(params, CFG, np.zeros((1, 0), np.int32))
    with pytest.raises(InferenceError, match=r"empty prompt: sequence\(s\) \[1\] have length 0"):
        prefill(params, CFG, np.ones((2, 4), np.int32), lengths=[4, 0])
    with pytest.raises(InferenceError, match="empty prompt"):
        generate(params, CFG, [[5, 6], []], 4)


def test_token_ids_out_of_range(params):
    with pytest.raises(InferenceError, match=r"token id out of range: ids span \[3, 512\] but vocab_size=512"):
        prefill(params, CFG, np.array([[3, 512]]))
    with pytest.raises(InferenceError, match="token id out of range"):
        generate(params, CFG, np.array([[-1, 4]]), 3)
    # padding past a prompt's length is not checked (any filler is fine there)
    cache = init_cache(CFG, 2, 8)
    with pytest.raises(InferenceError, match="token id out of range"):
        decode_step(params, CFG, cache, np.array([1, 600]))


def test_left_padding_is_refused(params):
    mask = np.array([[1, 1, 1, 1], [0, 0, 1, 1]])
    with pytest.raises(InferenceError, match="left padding is not supported.*sequence 1"):
        prefill(params, CFG, np.ones((2, 4), np.int32), attention_mask=mask)
    with pytest.raises(InferenceError, match="left padding is not supported"):
        generate(params, CFG, np.ones((2, 4), np.int32), 3, attention_mask=np.array([[1, 1, 0, 1], [1, 1, 1, 1]]))
    with pytest.raises(InferenceError, match="disagree"):
        prefill(params, CFG, np.ones((1, 4), np.int32), lengths=[3], attention_mask=[[1, 1, 1, 1]])


def test_other_misuse(params):
    with pytest.raises(InferenceError, match="exceed the prompt width"):
        prefill(params, CFG, np.ones((1, 4), np.int32), lengths=[5])
    with pytest.raises(InferenceError, match="cache is full"):
        decode_step(params, CFG, init_cache(CFG, 1, 8).replace(lengths=jnp.array([8], jnp.int32)), np.array([3]))
    with pytest.raises(InferenceError, match="has none"):
        generate({k: v for k, v in params.items() if k != "mtp"}, CFG.replace(num_mtp_layers=0), [[3, 4]], 2,
                 speculative=True)
    with pytest.raises(InferenceError, match="greedy-only"):
        generate(params, CFG, [[3, 4]], 2, speculative=True, temperature=0.7, key=jax.random.key(0))
    with pytest.raises(InferenceError, match="needs a PRNG key"):
        generate(params, CFG, [[3, 4]], 2, temperature=0.7)
    with pytest.raises(ValueError, match="top_p"):
        generate(params, CFG, [[3, 4]], 2, temperature=0.7, top_p=1.5, key=jax.random.key(0))
