"""ModelConfig presets, validation messages and the HF config mapping."""

import json

import jax
import pytest

import deepmoe as dm
from deepmoe.config import CSA, HCA, SLIDING, ConfigError


@pytest.mark.parametrize("changes, field", [
    (dict(num_heads=6, output_groups=4), "output_groups"),
    (dict(experts_per_token=9), "experts_per_token"),
    (dict(num_hash_layers=5), "num_hash_layers"),
    (dict(layer_types=("swa", "csa", "bogus", "hca")), "layer_types"),
    (dict(layer_types=("swa", "csa")), "layer_types"),
    (dict(rope_head_dim=15), "rope_head_dim"),
    (dict(rope_head_dim=128), "rope_head_dim"),
    (dict(compute_dtype="float8"), "compute_dtype"),
    (dict(num_mtp_layers=2), "num_mtp_layers"),
    (dict(hidden_size=0), "hidden_size"),
])
def test_validation_names_the_field(changes, field):
    with pytest.raises(ConfigError, match=rf"ModelConfig\.{field}"):
        dm.preset("tiny", **changes)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset"):
        dm.preset("huge")


def test_config_is_hashable_and_frozen():
    cfg = dm.preset("tiny")
    assert hash(cfg) == hash(dm.preset("tiny"))
    with pytest.raises(Exception):
        cfg.hidden_size = 3


def test_release_schedules():
    flash, pro = dm.preset("v4-flash"), dm.preset("v4-pro")
    assert flash.layer_types[:4] == (SLIDING, SLIDING, CSA, HCA) and flash.layer_types[-1] == CSA
    assert (flash.layer_types.count(CSA), flash.layer_types.count(HCA)) == (21, 20)
    assert pro.layer_types[:3] == (HCA, HCA, CSA)
    assert (pro.layer_types.count(CSA), pro.layer_types.count(HCA)) == (30, 31)


def _release_config(cfg):
    """The release-style config.json: legacy compress_ratios with the trailing MTP entry, rope_scaling."""
    ratio = {SLIDING: 0, CSA: 4, HCA: 128}
    return {
        "model_type": "deepseek_v4", "vocab_size": 129280, "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads, "num_key_value_heads": 1,
        "head_dim": 512, "qk_rope_head_dim": 64, "q_lora_rank": cfg.query_latent_dim, "o_groups": cfg.output_groups,
        "o_lora_rank": 1024, "sliding_window": 128,
        "compress_ratios": [ratio[t] for t in cfg.layer_types] + [0],
        "compress_rope_theta": 160000, "rope_theta": 10000,
        "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                         "beta_fast": 32, "beta_slow": 1},
        "index_n_heads": 64, "index_head_dim": 128, "index_topk": cfg.indexer_topk,
        "n_routed_experts": cfg.num_experts, "num_experts_per_tok": 6, "n_shared_experts": 1,
        "moe_intermediate_size": cfg.expert_hidden_dim, "num_hash_layers": 3, "scoring_func": "sqrtsoftplus",
        "routed_scaling_factor": cfg.routed_scaling_factor, "swiglu_limit": 10.0, "hc_mult": 4,
        "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "rms_norm_eps": 1e-6, "num_nextn_predict_layers": 1,
        "max_position_embeddings": 1048576, "bos_token_id": 0, "eos_token_id": 1,
    }


@pytest.mark.parametrize("name", ["v4-flash", "v4-pro"])
def test_from_release_config_reproduces_preset(name, tmp_path):
    cfg = dm.preset(name)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_release_config(cfg)))
    assert dm.ModelConfig.from_hf(path) == cfg
    assert dm.ModelConfig.from_hf(tmp_path) == cfg  # a directory works too


@pytest.mark.parametrize("name", ["tiny", "small", "v4-flash", "v4-pro"])
def test_to_hf_round_trip(name):
    cfg = dm.preset(name)
    assert dm.ModelConfig.from_hf(cfg.to_hf()) == cfg


def test_to_hf_builds_the_same_transformers_config():
    transformers = pytest.importorskip("transformers")
    cfg = dm.preset("tiny")
    hf = transformers.DeepseekV4Config(**{k: v for k, v in cfg.to_hf().items() if k not in ("architectures",
                                                                                           "model_type")})
    # Reading transformers' own canonical (nested rope_parameters) config back gives the same ModelConfig.
    assert dm.ModelConfig.from_hf(hf.to_dict()) == cfg
    assert hf.layer_types == list(cfg.layer_types)


def test_from_hf_rejects_other_models():
    with pytest.raises(ConfigError, match="model_type"):
        dm.ModelConfig.from_hf({"model_type": "llama"})


def test_param_counts_match_release():
    # Spec §1: logical parameter counts (= third-party receipts), computed without allocating.
    flash, pro = dm.count_params(dm.preset("v4-flash")), dm.count_params(dm.preset("v4-pro"))
    assert round(flash.total / 1e9, 2) == 284.33 and round(flash.active / 1e9, 2) == 13.80
    assert round(pro.total / 1e9, 1) == 1573.0 and round(pro.active / 1e9, 2) == 49.78
    assert round((flash.total + flash.mtp) / 1e9, 2) == 290.94
    assert round((pro.active + pro.mtp_active) / 1e9, 2) == 50.65


def test_count_params_agrees_with_initialised_tree(tiny_params, tiny_cfg):
    leaves = jax.tree.leaves({k: v for k, v in tiny_params.items() if k != "mtp"})
    float_size = sum(x.size for x in leaves if x.dtype.kind == "f")
    assert dm.count_params(tiny_cfg).total == float_size


def test_abstract_params_of_v4_pro_do_not_allocate():
    shapes = dm.abstract_params(dm.preset("v4-pro"))
    leaves = jax.tree.leaves(shapes)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    # embed [V, D] and the stacked routed experts of the repeated (HCA, CSA) pattern
    assert shapes["embed"].shape == (129280, 7168)
    assert shapes["segments"][1][0]["moe"]["experts"]["w_gate"].shape == (29, 384, 7168, 3072)
