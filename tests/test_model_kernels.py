"""The whole model with its attention core in pallas_kernels (interpreted on CPU) equals the reference path:
logits for every attention type with packed documents, a whole train step (its gradients, through an update
that magnifies their differences), and generation."""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepmoe as dm
from deepmoe.infer import generate, prefill
from deepmoe.infer.generate import CACHE_BUCKET, PROMPT_BUCKET
from deepmoe.params import unstack_layers
from deepmoe.train import TrainConfig, init_state, make_train_step
from deepmoe.train.loop import add_train_arguments, config_from_args
from deepmoe.train.step import model_config_for_training

CFG = dm.preset("tiny", compute_dtype="float32", num_mtp_layers=0)
F32 = dm.preset("tiny", compute_dtype="float32")


def test_pallas_kernels_match_reference(tiny_params):
    """Logits for every attention type with packed documents (gradients: the train-step test below)."""
    params = {k: v for k, v in tiny_params.items() if k != "mtp"}
    ids = jax.random.randint(jax.random.key(4), (2, 40), 0, CFG.vocab_size)
    seg = jnp.concatenate([jnp.zeros((2, 23), jnp.int32), jnp.ones((2, 17), jnp.int32)], axis=1)
    ref_logits = dm.forward(params, CFG, ids, segment_ids=seg, kernels="reference").logits
    pallas_logits = dm.forward(params, CFG, ids, segment_ids=seg, kernels="pallas").logits
    np.testing.assert_allclose(np.asarray(pallas_logits), np.asarray(ref_logits), atol=2e-5)


# The update is compared under AdamW with eps 1e-6: on a first step it is lr * g / (|g| + eps), which moves by
# at most lr * |dg| / eps when a gradient moves by dg. The kernel paths differ only in fp32 summation order; their
# gradients come out <= 1.2e-9 apart (measured; <= 6e-4 relative per leaf), so the updates agree to ~1e-3 * lr,
# asserted as 2e-3 * lr. Muon would test the optimizer's conditioning instead: Newton-Schulz lifts the near-null
# singular directions of these low-rank gradients, rounding included, to full size (~10% of the update here), as
# AdamW's default eps 1e-8 does to gradients near 1e-8 (~3%).
STEP_TCFG = TrainConfig(steps=4, batch_size=2, seq_len=32, warmup_steps=1, compute_dtype="float32",
                        optimizer="adamw", adam_eps=1e-6)


def test_train_step_with_pallas_kernels_matches_reference(tiny_cfg, tiny_params):
    cfg = tiny_cfg  # with MTP: its block's window attention runs through the kernels too
    ids = jax.random.randint(jax.random.key(4), (2, 32), 3, cfg.vocab_size)
    seg = jnp.concatenate([jnp.zeros((2, 19), jnp.int32), jnp.ones((2, 13), jnp.int32)], axis=1)
    batch = {"input_ids": ids, "segment_ids": seg}
    state = init_state(cfg, STEP_TCFG, jax.random.key(0), params=tiny_params)  # not donated: both steps use it
    before = jax.tree.map(np.asarray, state.params)
    reference_step, results = make_train_step(cfg, STEP_TCFG.replace(kernels="reference")), {}
    for kernels in ("reference", "pallas"):
        gradients = make_train_step(cfg, STEP_TCFG.replace(kernels=kernels)).gradients
        # the update does not read the kernel choice: one compiled update applies both gradients
        new_state, metrics = reference_step.update(state, *gradients(state.params, state.step, batch))
        results[kernels] = jax.tree.map(np.asarray, new_state.params), jax.device_get(metrics)
    (ref_params, ref_m), (pallas_params, pallas_m) = results["reference"], results["pallas"]
    for name in ("loss", "mtp_loss", "balance_loss", "total_loss", "grad_norm"):
        np.testing.assert_allclose(pallas_m[name], ref_m[name], rtol=1e-5, err_msg=name)
    # same routing, so the same bias nudges
    np.testing.assert_array_equal(pallas_m["expert_load"], ref_m["expert_load"])
    np.testing.assert_array_equal(pallas_m["mtp_expert_load"], ref_m["mtp_expert_load"])
    lr = STEP_TCFG.lr
    assert float(ref_m["lr"]) == pytest.approx(lr)  # warmup_steps=1: the first step runs at the peak LR
    for (path, a), b, old in zip(jax.tree_util.tree_leaves_with_path(ref_params), jax.tree.leaves(pallas_params),
                                 jax.tree.leaves(before)):
        if np.issubdtype(a.dtype, np.floating):
            np.testing.assert_allclose(b - old, a - old, rtol=0, atol=2e-3 * lr, err_msg=jax.tree_util.keystr(path))
        else:
            np.testing.assert_array_equal(b, a)  # hash tables


def test_train_kernels_option():
    """TrainConfig.kernels (None: the model config's) and `deepmoe train --kernels`."""
    cfg = dm.preset("tiny")
    assert model_config_for_training(cfg, TrainConfig()).kernels == cfg.kernels
    assert model_config_for_training(cfg, TrainConfig(kernels="pallas")).kernels == "pallas"
    with pytest.raises(ValueError, match="kernels must be one of"):
        TrainConfig(kernels="triton")

    def train_config(*argv):
        return config_from_args(add_train_arguments(argparse.ArgumentParser()).parse_args(["--out", "x", *argv]))[1]

    assert train_config("--kernels", "pallas").kernels == "pallas"
    assert train_config().kernels is None


def test_generate_with_pallas_kernels_matches_reference(tiny_params):
    """Pallas only changes the prompt's full-sequence attention: the prefilled cache and logits agree, and so
    do the greedy tokens decoded from them, plainly and speculatively."""
    lengths = np.array([5, 20])  # 20 > window (16) and > the HCA ratio (16): ring wrap and compressed entries
    prompt = np.array(jax.random.randint(jax.random.key(9), (2, 20), 3, F32.vocab_size))
    prompt[0, lengths[0]:] = 0
    new = 8
    # The prefill generate runs (per-layer weights, the prompt padded to its column bucket, a cache of the
    # cache bucket's length): each kernel choice's prefill compiles once for the direct call and generate's.
    per_layer = unstack_layers(tiny_params, F32)
    padded = np.full((2, PROMPT_BUCKET), F32.eos_token_id, np.int32)
    padded[:, :prompt.shape[1]] = prompt
    ref_logits, ref_cache = prefill(per_layer, F32, padded, lengths, max_len=CACHE_BUCKET)
    pallas_logits, pallas_cache = prefill(per_layer, F32, padded, lengths, max_len=CACHE_BUCKET, kernels="pallas")
    np.testing.assert_allclose(np.asarray(pallas_logits), np.asarray(ref_logits), atol=2e-5)
    for a, b in zip(jax.tree.leaves(ref_cache), jax.tree.leaves(pallas_cache)):
        np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32), atol=2e-5)
    ref = generate(tiny_params, F32, prompt, new, lengths=lengths, stop_tokens=())
    pallas = generate(tiny_params, F32, prompt, new, lengths=lengths, stop_tokens=(), kernels="pallas")
    np.testing.assert_array_equal(pallas.tokens, ref.tokens)
    assert pallas.lengths.tolist() == [new, new]
    # speculative decoding prefills through its own path (with the MTP module): the same tokens again
    spec = generate(tiny_params, F32, prompt, new, lengths=lengths, stop_tokens=(), kernels="pallas",
                    speculative=True)
    np.testing.assert_array_equal(spec.tokens, ref.tokens)
    with pytest.raises(ValueError, match="kernels"):
        generate(tiny_params, F32, prompt, new, lengths=lengths, kernels="triton")
