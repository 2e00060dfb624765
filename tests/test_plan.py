"""The planner's numbers against hand calculations written from the config fields (not from param_specs)."""

import math

import jax
import pytest

import deepmoe as dm
from deepmoe.plan import (DEVICES, PlanOptions, active_matmul_params, attention_flops, decode_weight_bytes,
                          flops_per_token, main, parameter_memory, plan)

TINY = dm.preset("tiny")  # SWA, CSA, HCA, CSA; 1 hash layer; MTP; float32 params


def _hand_elements(cfg, t=1, e=1):
    """Parameter elements per device by hand: tensor split t (heads, o-groups, indexer heads, expert and shared
    intermediate dims, vocab), expert split e. Returns (elements, routed expert elements)."""
    d, h, c, dc, g, dg = (cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.query_latent_dim, cfg.output_groups,
                          cfg.output_group_latent_dim)
    n, i, ex, v, k = cfg.residual_streams, cfg.expert_hidden_dim, cfg.num_experts, cfg.vocab_size, \
        cfg.experts_per_token
    hi, ci = cfg.indexer_heads, cfg.indexer_head_dim
    hc = 2 * (n * d * (2 + n) * n + (2 + n) * n + 3)

    def compressor(dim, ratio, overlap):
        w = dim * (2 if overlap else 1)
        return 2 * d * w + ratio * w + dim

    def layer(kind, hashed):
        attn = d * dc + dc + dc * h * c / t + d * c + c + h / t + h * c * dg / t + g * dg * d / t
        if kind == "csa":
            attn += compressor(c, cfg.csa_compress_ratio, True)
            attn += dc * hi * ci / t + d * hi / t + compressor(ci, cfg.csa_compress_ratio, True)
        if kind == "hca":
            attn += compressor(c, cfg.hca_compress_ratio, False)
        routed = 3 * ex * d * i / (e * t)
        moe = d * ex + routed + 3 * d * i / t + (v * k / t if hashed else ex)
        return hc + 2 * d + attn + moe, routed

    kinds = ["swa", "csa", "hca", "csa"]
    total, routed = 0.0, 0.0
    for index, kind in enumerate(kinds):
        elements, r = layer(kind, index < cfg.num_hash_layers)
        total, routed = total + elements, routed + r
    total += v * d / t + (n * d * n + n + 1) + d + d * v / t
    block, r = layer("swa", False)
    total += 2 * d + 2 * d * d + block + (n * d * n + n + 1) + d
    return total, routed + r


def test_param_bytes_replicated_and_expert_split():
    replicated = parameter_memory(TINY, {"data": 8})
    hand, routed = _hand_elements(TINY)
    total, _ = dm.count_params(TINY)
    hash_tables = TINY.num_hash_layers * TINY.vocab_size * TINY.experts_per_token
    assert hand == total + dm.count_params(TINY).mtp + hash_tables  # the hand count is the real count
    assert replicated["params"] == 4 * hand == replicated["params_total"]
    split = parameter_memory(TINY, {"expert": 8})
    assert split["params"] == pytest.approx(4 * (hand - routed * 7 / 8))


def test_param_bytes_on_a_mixed_mesh():
    got = parameter_memory(TINY, {"data": 2, "expert": 2, "tensor": 2})
    hand, _ = _hand_elements(TINY, t=2, e=2)
    assert got["params"] == pytest.approx(4 * hand)


def test_fsdp_shards_the_embed_dim_and_gathers_one_layer():
    fsdp = parameter_memory(TINY, {"fsdp": 8}, opts=PlanOptions(compute_dtype="bfloat16"))
    plain = parameter_memory(TINY, {"data": 8})
    assert fsdp["params"] < plain["params"] / 2  # most parameters have an embed dimension
    assert 0 < fsdp["fsdp_gather"] < plain["params"]


def test_grads_and_adamw_state():
    opts = PlanOptions(optimizer="adamw")
    got = parameter_memory(TINY, {"data": 8}, opts=opts)
    hand, _ = _hand_elements(TINY)
    frozen = TINY.num_hash_layers * TINY.vocab_size * TINY.experts_per_token + \
        (TINY.num_layers - TINY.num_hash_layers + TINY.num_mtp_layers) * TINY.num_experts  # tid2eid, router_bias
    assert got["grads"] == 4 * (hand - frozen)
    assert got["optimizer"] == 2 * 4 * (hand - frozen)
    muon = parameter_memory(TINY, {"data": 8}, opts=PlanOptions(optimizer="muon"))
    assert got["grads"] < muon["optimizer"] < got["optimizer"]  # matrices keep one state, the rest two


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_weight_bytes_against_the_initialised_params(dtype):
    """Counted from the arrays init_params makes: everything but the MTP module, less the embedding and hash-table
    rows no token of the batch asks for and the routed experts none of its tokens picks."""
    cfg = TINY.replace(param_dtype=dtype)
    params = dm.init_params(cfg, jax.random.key(0))
    leaves = [(jax.tree_util.keystr(path), x) for path, x in
              jax.tree_util.tree_flatten_with_path({k: v for k, v in params.items() if k != "mtp"})[0]]
    full = sum(x.nbytes for _, x in leaves)
    tables = sum(x.nbytes for name, x in leaves if name.endswith("['embed']") or name.endswith("['tid2eid']"))
    routed = sum(x.nbytes for name, x in leaves if "['experts']" in name)
    assert tables and routed
    e, k, v = cfg.num_experts, cfg.experts_per_token, cfg.vocab_size
    for batch in (1, 2, e):  # k, 2k and all E experts per MoE layer
        expected = full - tables * (1 - batch / v) - routed * (1 - min(e, batch * k) / e)
        assert decode_weight_bytes(cfg, dtype, batch) == pytest.approx(expected, rel=1e-12)


def test_active_matmul_params_by_hand():
    d, h, c, dc, g, dg = 64, 4, 64, 32, 2, 16
    n, e, i, k, v, hi, ci = 4, 8, 32, 2, 512, 8, 32
    mhc = 2 * n * d * (2 + n) * n
    attn = d * dc + dc * h * c + d * c + h * c * dg + g * dg * d
    moe = d * e + 3 * d * i * k + 3 * d * i
    csa = 2 * d * 2 * c + dc * hi * ci + d * hi + 2 * d * 2 * ci
    hca = 2 * d * c
    layers = 4 * (mhc + attn + moe) + 2 * csa + hca
    head = n * d * n + d * v
    mtp = d * d + n * d * d + (mhc + attn + moe) + n * d * n + d * v
    assert active_matmul_params(TINY) == layers + head + mtp


def test_attention_flops_by_hand():
    import numpy as np

    length = 64
    h, c, w = 4, 64, 16
    csa = 4 * h * c * (w + min(4, length // 4)) + 2 * 8 * (32 + 1) * (length // 4)
    hca = 4 * h * c * (w + length // 16)
    swa = 4 * h * c * w
    expected = swa + 2 * csa + hca + swa  # layers + the MTP block
    assert attention_flops(TINY, np.array([length - 1])) == pytest.approx(expected)
    infer = flops_per_token(TINY, PlanOptions(mode="infer", context=length))
    assert infer["forward"] == pytest.approx(2 * active_matmul_params(TINY) + expected)
    train = flops_per_token(TINY, PlanOptions(mode="train", seq_len=length, remat="full"))
    assert train["model"] == 3 * train["forward"] and train["hardware"] == 4 * train["forward"]


def test_kv_bytes_per_token_match_the_spec():
    for name, kb in (("v4-flash", 3.51), ("v4-pro", 5.03)):
        result = plan(dm.preset(name), "expert=8", opts=PlanOptions(mode="infer", global_batch=8, context=1000))
        assert round(result["kv"]["bytes_per_token_fp8"] / 1e3, 2) == kb
        per_seq = result["kv"]["bytes_per_token_fp8"] * 1000
        assert result["memory"]["kv_cache"] > per_seq  # plus the fixed window / pending state


def test_expert_all_to_all_bytes_by_hand():
    cfg = dm.preset("v4-pro")
    result = plan(cfg, "data=4,expert=64,tensor=8", opts=PlanOptions(mode="infer", capacity_factor=1.25))
    comm = result["communication_per_token"]
    per_layer = 2 * 6 * 7168 * 2 * 63 / 64
    assert comm["expert_all_to_all_ragged"] == pytest.approx(per_layer * 62)
    assert comm["expert_all_to_all_fixed"] == pytest.approx(per_layer * 62 * 1.25)
    assert comm["tensor_all_reduce"] == pytest.approx(2 * 2 * 7 / 8 * 7168 * 2 * 62)


def test_fit_verdicts_and_no_allocation():
    before = len(jax.live_arrays())
    pro = plan(dm.preset("v4-pro"), "data=4,expert=64,tensor=8", "h100")
    assert len(jax.live_arrays()) == before
    m = pro["memory"]
    assert m["total"] == pytest.approx(sum(m[k] for k in ("params", "grads", "optimizer", "fsdp_gather",
                                                           "activations", "kv_cache")))
    assert not pro["fits"] and pro["hbm_fraction"] == m["total"] / DEVICES["h100"].hbm_bytes
    flash = plan(dm.preset("v4-flash"), "data=8,expert=8", "ascend-910c",
                 opts=PlanOptions(mode="infer", param_dtype="float8", expert_dtype="float4", context=131072))
    assert flash["fits"]
    assert {d: (DEVICES[d].hbm_bytes / 1e9, DEVICES[d].peak_bf16_flops / 1e12) for d in ("h100", "tpu-v5p")} == {
        "h100": (80, 989), "tpu-v5p": (95, 459)}


def test_cli(capsys):
    assert main(["--preset", "v4-pro", "--mesh", "data=4,expert=64,tensor=8", "--device", "h100"]) == 0
    out = capsys.readouterr().out
    assert "2048 devices" in out and "DOES NOT FIT" in out and "FLOPs per token" in out
    assert main(["--preset", "v4-pro", "--mesh", "expert=7"]) == 2
    assert "num_experts=384 is not divisible" in capsys.readouterr().err
    assert main(["--preset", "v4-pro", "--mesh", "data=4,pipeline=2"]) == 2
    assert "bad mesh entry" in capsys.readouterr().err
    assert main(["--preset", "tiny", "--mesh", "data=8", "--device", "h200", "--json"]) == 0
    assert '"fits": true' in capsys.readouterr().out


def test_tiny_plan_is_consistent_with_count_params():
    total = dm.count_params(dm.preset("v4-flash"))
    got = parameter_memory(dm.preset("v4-flash"), {"data": 1}, opts=PlanOptions(mode="infer",
                                                                                param_dtype="bfloat16"))
    # bf16 weights, float32 islands: between 2 and 2.01 bytes per counted parameter
    counted = total.total + total.mtp
    assert 2 * counted < got["params_total"] < 2.01 * counted
    assert math.isclose(got["params"], got["params_total"])
