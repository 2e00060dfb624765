"""Logits parity with transformers' DeepseekV4ForCausalLM (torch CPU, fp32) on two random configs that together
cover all three attention types and both MoE kinds, batch > 1, sequences spanning several compression windows."""

import jax.numpy as jnp
import numpy as np
import pytest

import deepmoe as dm
from deepmoe.config import CSA, HCA, SLIDING
from deepmoe.io.pretrained import load_pretrained

torch = pytest.importorskip("torch")
from hf_reference import build_hf_model, hf_logits, save_hf_checkpoint  # noqa: E402

CONFIGS = {
    # spec §13 reference config: SWA, CSA, HCA(16), CSA; hash + score MoE; 4 streams
    "tiny": (dm.preset("tiny", num_mtp_layers=0), 64),
    # release ratios (CSA 4, HCA 128), odd sizes: 6 heads / 3 groups, 2 streams, top-3 of 6, 2 hash layers,
    # a length that is a multiple of neither the window nor a ratio
    "wide": (dm.ModelConfig(
        vocab_size=300, hidden_size=48, num_layers=4, num_heads=6, head_dim=32, rope_head_dim=8,
        query_latent_dim=24, output_groups=3, output_group_latent_dim=8, layer_types=(HCA, CSA, SLIDING, HCA),
        sliding_window=8, csa_compress_ratio=4, hca_compress_ratio=128, indexer_heads=8, indexer_head_dim=16,
        indexer_topk=8, num_experts=6, experts_per_token=3, expert_hidden_dim=24, num_hash_layers=2,
        residual_streams=2, sinkhorn_iterations=7, routed_scaling_factor=2.5, num_mtp_layers=0), 290),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def hf_case(request, tmp_path_factory):
    cfg, length = CONFIGS[request.param]
    model = build_hf_model(cfg)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, length))
    directory = save_hf_checkpoint(model, tmp_path_factory.mktemp(request.param))
    return cfg, model, ids, directory


def test_logits_match_transformers(hf_case):
    cfg, model, ids, directory = hf_case
    loaded_cfg, params = load_pretrained(directory, jnp.float32)
    assert loaded_cfg.replace(param_dtype=cfg.param_dtype) == cfg  # config.json written by transformers
    ours = dm.forward(params, loaded_cfg.replace(compute_dtype="float32"), jnp.asarray(ids)).logits
    reference = hf_logits(model, ids)
    assert np.abs(reference).max() > 0.5  # a non-degenerate model
    np.testing.assert_allclose(np.asarray(ours), reference, atol=1e-4, rtol=0)


def test_saved_checkpoint_loads_in_transformers(hf_case, tmp_path):
    """Our save_pretrained output is read by transformers and gives the same logits."""
    from transformers import DeepseekV4ForCausalLM

    cfg, model, ids, directory = hf_case
    loaded_cfg, params = load_pretrained(directory, jnp.float32)
    dm.save_pretrained(tmp_path, params, loaded_cfg)
    reloaded = DeepseekV4ForCausalLM.from_pretrained(str(tmp_path), torch_dtype=torch.float32).eval()
    reloaded.config._attn_implementation = "eager"
    np.testing.assert_allclose(hf_logits(reloaded, ids), hf_logits(model, ids), atol=1e-5, rtol=0)


def test_loading_compiles_nothing(hf_case, compile_log):
    """Every tensor goes to the device with device_put; jnp.asarray compiled a program per tensor shape."""
    *_, directory = hf_case
    with compile_log() as compiles:
        dm.load_pretrained(directory, jnp.float32)
    assert compiles == []
