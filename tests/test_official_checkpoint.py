"""Release-format checkpoints: official names, per-expert tensors, FP8 blocks and MXFP4 experts, two shards.

The checkpoint is built here from a random transformers model by renaming (spec §10.3 table, written out
independently below), splitting experts and quantizing with a numpy quantizer; transformers run on the
dequantized weights is the reference."""

import json

import jax
import ml_dtypes
import numpy as np
import pytest

import deepmoe as dm
from deepmoe.config import CSA, HCA, SLIDING
from deepmoe.io.quant import dequantize_fp4, dequantize_fp8
from deepmoe.io.safetensors_io import CheckpointError, save_file

torch = pytest.importorskip("torch")
from hf_reference import build_hf_model, hf_logits  # noqa: E402

CFG = dm.ModelConfig(
    vocab_size=300, hidden_size=160, num_layers=3, num_heads=4, head_dim=64, rope_head_dim=16, query_latent_dim=48,
    output_groups=2, output_group_latent_dim=32, layer_types=(SLIDING, CSA, HCA), sliding_window=8,
    csa_compress_ratio=4, hca_compress_ratio=8, indexer_heads=8, indexer_head_dim=32, indexer_topk=3,
    num_experts=4, experts_per_token=2, expert_hidden_dim=64, num_hash_layers=1, residual_streams=2,
    sinkhorn_iterations=5, num_mtp_layers=0, compute_dtype="float32")
FP4_TABLE = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)

# HF -> official renames, in the direction the release was converted (spec §10.3).
RENAMES = [
    (".self_attn.compressor.indexer.scorer.weights_proj.", ".attn.indexer.weights_proj."),
    (".self_attn.compressor.indexer.q_b_proj.", ".attn.indexer.wq_b."),
    (".self_attn.compressor.indexer.", ".attn.indexer.compressor."),
    (".self_attn.", ".attn."), (".mlp.", ".ffn."),
    (".kv_proj.", ".wkv."), (".gate_proj.weight", ".wgate.weight"), (".position_bias", ".ape"),
    ("compressor.kv_norm.", "compressor.norm."), (".q_a_proj.", ".wq_a."), (".q_a_norm.", ".q_norm."),
    (".q_b_proj.", ".wq_b."), (".o_a_proj.", ".wo_a."), (".o_b_proj.", ".wo_b."), (".attn.sinks", ".attn.attn_sink"),
    (".gate.e_score_correction_bias", ".gate.bias"), ("input_layernorm.", "attn_norm."),
    ("post_attention_layernorm.", "ffn_norm."), (".attn_hc.", ".hc_attn_"), (".ffn_hc.", ".hc_ffn_"),
    ("shared_experts.wgate.", "shared_experts.w1."), ("shared_experts.up_proj.", "shared_experts.w3."),
    ("shared_experts.down_proj.", "shared_experts.w2."),
]
FP8_MATRICES = (".wq_a.", ".wq_b.", ".attn.wkv.", ".wo_a.", ".wo_b.", "shared_experts.w")


def to_official(name):
    fixed = {"model.embed_tokens.weight": "embed.weight", "lm_head.weight": "head.weight",
             "model.norm.weight": "norm.weight", "model.hc_head.hc_fn": "hc_head_fn",
             "model.hc_head.hc_base": "hc_head_base", "model.hc_head.hc_scale": "hc_head_scale"}
    if name in fixed:
        return fixed[name]
    name = name.removeprefix("model.")
    for old, new in RENAMES:
        name = name.replace(old, new)
    return name


def quantize_fp8(w):
    """numpy FP8 E4M3 with one power-of-two scale per 128x128 block."""
    out_dim, in_dim = w.shape
    rows, cols = -(-out_dim // 128), -(-in_dim // 128)
    scale = np.ones((rows, cols), np.float32)
    q = np.zeros(w.shape, ml_dtypes.float8_e4m3fn)
    for i in range(rows):
        for j in range(cols):
            block = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            s = 2.0 ** np.ceil(np.log2(max(np.abs(block).max(), 1e-30) / 448.0))
            scale[i, j] = s
            q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = (block / s).astype(ml_dtypes.float8_e4m3fn)
    return q, scale.astype(ml_dtypes.float8_e8m0fnu)


def quantize_fp4(w):
    """numpy MXFP4: nearest E2M1 code per value, one power-of-two scale per 32 inputs, two codes per byte."""
    out_dim, in_dim = w.shape
    blocks = w.reshape(out_dim, in_dim // 32, 32)
    scale = 2.0 ** np.ceil(np.log2(np.maximum(np.abs(blocks).max(-1), 1e-30) / 6.0))
    scaled = blocks / scale[..., None]
    magnitude = np.abs(np.abs(scaled)[..., None] - FP4_TABLE).argmin(-1)
    codes = (magnitude | np.where(scaled < 0, 8, 0)).reshape(out_dim, in_dim).astype(np.uint8)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8).view(np.int8)
    return packed, scale.astype(ml_dtypes.float8_e8m0fnu)


def dequant_fp8_reference(q, scale):
    s = np.kron(scale.astype(np.float32), np.ones((128, 128), np.float32))
    return q.astype(np.float32) * s[: q.shape[0], : q.shape[1]]


def dequant_fp4_reference(packed, scale):
    codes = packed.view(np.uint8)
    low, high = codes & 15, codes >> 4
    values = lambda c: np.where(c >= 8, -1.0, 1.0) * FP4_TABLE[c & 7]  # noqa: E731
    out = np.stack([values(low), values(high)], -1).reshape(packed.shape[0], -1)
    return (out * np.repeat(scale.astype(np.float32), 32, axis=1)).astype(np.float32)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    model = build_hf_model(CFG, seed=4)
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    official, dequantized = {}, {}
    for name, w in state.items():
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            prefix = to_official(name).rsplit("experts.", 1)[0] + "experts."
            parts = {"w1": w[:, :CFG.expert_hidden_dim], "w3": w[:, CFG.expert_hidden_dim:]} \
                if name.endswith("gate_up_proj") else {"w2": w}
            deq = {}
            for m, stacked in parts.items():
                for e in range(CFG.num_experts):
                    packed, scale = quantize_fp4(stacked[e])
                    official[f"{prefix}{e}.{m}.weight"], official[f"{prefix}{e}.{m}.scale"] = packed, scale
                    deq.setdefault(m, []).append(dequant_fp4_reference(packed, scale))
            dequantized[name] = np.concatenate([np.stack(deq["w1"]), np.stack(deq["w3"])], 1) \
                if "w1" in deq else np.stack(deq["w2"])
            continue
        off = to_official(name)
        if any(k in off for k in FP8_MATRICES) and off.endswith(".weight") and w.ndim == 2:
            q, scale = quantize_fp8(w)
            official[off], official[off.removesuffix(".weight") + ".scale"] = q, scale
            dequantized[name] = dequant_fp8_reference(q, scale)
        else:
            official[off] = w.astype(ml_dtypes.bfloat16) if off.endswith("norm.weight") else w
            dequantized[name] = official[off].astype(w.dtype)
    directory = tmp_path_factory.mktemp("release")
    names = sorted(official)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: official[k] for k in keys}, directory / file)
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    config = {**CFG.to_hf(), "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                                     "weight_block_size": [128, 128]}, "expert_dtype": "fp4"}
    config.pop("layer_types")
    config["compress_ratios"] = [{SLIDING: 0, CSA: 4, HCA: 8}[t] for t in CFG.layer_types] + [0]
    (directory / "config.json").write_text(json.dumps(config))
    model.load_state_dict({k: torch.as_tensor(v) for k, v in dequantized.items()})
    return directory, model, official


def test_release_checkpoint_matches_transformers_on_dequantized_weights(release):
    directory, model, _ = release
    cfg, params = dm.load_pretrained(directory, "float32")
    assert cfg.replace(compute_dtype="float32") == CFG
    ids = np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 40))
    ours = dm.forward(params, cfg.replace(compute_dtype="float32"), jax.numpy.asarray(ids)).logits
    np.testing.assert_allclose(np.asarray(ours), hf_logits(model, ids), atol=1e-4, rtol=0)


def test_dequantization_matches_numpy_reference(release):
    _, _, official = release
    name = "layers.1.attn.wq_a.weight"
    np.testing.assert_array_equal(dequantize_fp8(official[name], official["layers.1.attn.wq_a.scale"], name),
                                  dequant_fp8_reference(official[name], official["layers.1.attn.wq_a.scale"]))
    packed, scale = official["layers.2.ffn.experts.3.w2.weight"], official["layers.2.ffn.experts.3.w2.scale"]
    np.testing.assert_array_equal(dequantize_fp4(packed, scale, "w2"), dequant_fp4_reference(packed, scale))
    # FP4 is coarse but faithful: relative error of a 32-block round trip is bounded by the E2M1 spacing
    w = np.random.default_rng(0).normal(size=(8, 64)).astype(np.float32)
    err = np.abs(dequantize_fp4(*quantize_fp4(w), "w") - w) / np.abs(w).max()
    assert err.max() < 0.2


def _copy_without(release, tmp_path, edit):
    directory, _, official = release
    tensors = dict(official)
    edit(tensors)
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    return tmp_path


def test_scale_shape_mismatch_is_named(release, tmp_path):
    bad = _copy_without(release, tmp_path, lambda t: t.__setitem__("layers.0.attn.wq_a.scale",
                                                                    np.ones((2, 2), ml_dtypes.float8_e8m0fnu)))
    with pytest.raises(CheckpointError, match=r"scale of 'layers.0.attn.wq_a.weight' has shape \(2, 2\)"):
        dm.load_pretrained(bad)


def test_missing_expert_is_named(release, tmp_path):
    bad = _copy_without(release, tmp_path, lambda t: [t.pop("layers.1.ffn.experts.2.w3.weight"),
                                                       t.pop("layers.1.ffn.experts.2.w3.scale")])
    with pytest.raises(CheckpointError, match=r"layers.1.ffn.experts.2.w3.weight"):
        dm.load_pretrained(bad)


def test_missing_scale_is_named(release, tmp_path):
    bad = _copy_without(release, tmp_path, lambda t: t.pop("layers.2.attn.wo_b.scale"))
    with pytest.raises(CheckpointError, match=r"'layers.2.attn.wo_b.weight' is stored as float8_e4m3fn but has no "
                                              r"scale"):
        dm.load_pretrained(bad)


def test_official_names_with_mtp_round_trip(tmp_path):
    """Every tensor of a model with MTP, written under official names with per-expert tensors, loads back
    exactly into our tree (MTP included: transformers drops mtp.0.*, we must not)."""
    from deepmoe.io.pretrained import hf_state_dict

    cfg = dm.preset("tiny")
    params = dm.init_params(cfg, jax.random.key(2))
    official = {}
    for name, array in hf_state_dict(params, cfg):
        name = {"mtp.0.hc_head.hc_fn": "mtp.0.hc_head_fn", "mtp.0.hc_head.hc_base": "mtp.0.hc_head_base",
                "mtp.0.hc_head.hc_scale": "mtp.0.hc_head_scale"}.get(name, name)
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            prefix = to_official(name).rsplit("experts.", 1)[0] + "experts."
            for e in range(cfg.num_experts):
                if name.endswith("down_proj"):
                    official[f"{prefix}{e}.w2.weight"] = array[e]
                else:
                    official[f"{prefix}{e}.w1.weight"] = array[e, :cfg.expert_hidden_dim]
                    official[f"{prefix}{e}.w3.weight"] = array[e, cfg.expert_hidden_dim:]
        else:
            official[to_official(name)] = array
    assert "mtp.0.attn.wq_a.weight" in official and "layers.0.ffn.gate.tid2eid" in official
    save_file(official, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))
    loaded_cfg, loaded = dm.load_pretrained(tmp_path, "float32")
    assert loaded_cfg == cfg
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
