"""Greedy generation against transformers' `generate` on the same random checkpoint (spec §13 recipe)."""

import jax.numpy as jnp
import numpy as np
import pytest

import deepmoe as dm
from deepmoe.infer import generate
from deepmoe.io.pretrained import load_pretrained

torch = pytest.importorskip("torch")
from hf_reference import build_hf_model, save_hf_checkpoint  # noqa: E402

# Same shapes as tests/test_infer_decode.py, so the compiled prefill / decode loop are shared; transformers'
# (slow) generate is compared on the first HF_TOKENS of them (greedy: a prefix of the same continuation).
LENGTHS = np.array([5, 23])
NEW_TOKENS = 57
HF_TOKENS = 32


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
    # one torch thread: on a busy 2-core machine torch's spinning worker threads make a tiny model ~100x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield _build(tmp_path_factory)
    finally:
        torch.set_num_threads(threads)


def _build(tmp_path_factory):
    cfg = dm.preset("tiny", num_mtp_layers=0)
    model = build_hf_model(cfg)
    directory = save_hf_checkpoint(model, tmp_path_factory.mktemp("hf_tiny"))
    loaded_cfg, params = load_pretrained(directory, jnp.float32)
    return model, loaded_cfg.replace(compute_dtype="float32"), params


def test_greedy_generate_equals_transformers(hf_and_ours):
    model, cfg, params = hf_and_ours
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, cfg.vocab_size, (2, LENGTHS.max())).astype(np.int32)
    prompt[0, LENGTHS[0]:] = 0  # right padding
    ours = generate(params, cfg, prompt, NEW_TOKENS, lengths=LENGTHS)  # stops at eos like transformers
    for row, n in enumerate(LENGTHS):
        with torch.no_grad():
            reference = model.generate(torch.as_tensor(prompt[row:row + 1, :n], dtype=torch.long),
                                       max_new_tokens=HF_TOKENS, do_sample=False,
                                       eos_token_id=cfg.eos_token_id, pad_token_id=cfg.eos_token_id)
        expected = reference[0, n:].numpy()
        expected = expected[:np.flatnonzero(expected == cfg.eos_token_id)[0] + 1] if (
            expected == cfg.eos_token_id).any() else expected
        assert min(ours.lengths[row], HF_TOKENS) == len(expected)
        np.testing.assert_array_equal(ours.tokens[row, :len(expected)], expected)
    assert len(set(ours.tokens[1].tolist())) > 5  # not a degenerate repetition
