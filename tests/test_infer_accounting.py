"""Cache byte accounting: the release layout against the spec's (and report's) hand calculation (spec §9.3), our
layout against the bytes of the cache pytree that decoding actually allocates."""

import pytest

import deepmoe as dm
from deepmoe.infer import cache_accounting, cache_shapes, format_accounting
from deepmoe.infer.cache import tree_bytes


def test_release_layout_reproduces_the_report():
    flash, pro = (cache_accounting(dm.preset(name))["fp8"] for name in ("v4-flash", "v4-pro"))
    # entry: 448 FP8 nope + 64 BF16 rope + 7 ue8m0 scales + 1 pad; indexer key: 128 FP4 + 4 scales
    assert flash["entry_bytes"] == 448 + 64 * 2 + 7 + 1 == 584
    assert flash["index_key_bytes"] == 128 // 2 + 4 == 68
    assert flash["bytes_per_token_by_layer_type"]["compressed_sparse_attention"] == (584 + 68) / 4 == 163
    assert flash["bytes_per_token_by_layer_type"]["heavily_compressed_attention"] == 584 / 128
    assert flash["bytes_per_token"] == pytest.approx(21 * 163 + 20 * 584 / 128)  # 3514.25 B: "3.5 KB"
    assert pro["bytes_per_token"] == pytest.approx(30 * 163 + 31 * 584 / 128)  # 5031.4 B: "5.0 KB"
    assert round(flash["bytes_per_token"] / 1000, 2) == 3.51 and round(pro["bytes_per_token"] / 1000, 2) == 5.03
    v32 = 61 * (656 + 132)
    assert v32 == 48068  # "48.1 KB"
    assert flash["vs_v32"] == pytest.approx(3514.25 / v32) and round(100 * flash["vs_v32"], 1) == 7.3  # "~7 %"
    assert round(100 * pro["vs_v32"], 1) == 10.5  # "~10 %"
    assert 61 * 2 * 8 * 128 * 2 == 249856  # BF16 GQA-8 hd128: "250 KB"
    assert round(100 * pro["vs_gqa8_bf16"], 1) == 2.0  # "~2 %"
    # fixed state: a 128-entry window ring per layer, 128 x 584 B = 73 KiB: ~3.2 MB (Flash), ~4.5 MB (Pro)
    assert flash["fixed_window_bytes"] == 43 * 128 * 584 and round(flash["fixed_window_bytes"] / 1e6, 1) == 3.2
    assert pro["fixed_window_bytes"] == 61 * 128 * 584 and round(pro["fixed_window_bytes"] / 1e6, 2) == 4.56
    assert flash["fixed_mtp_window_bytes"] == 128 * 584
    # fp32 compressor tails: CSA kv + gate [8, 1024] and indexer [8, 256]; HCA [128, 512]
    assert flash["fixed_pending_bytes"] == 21 * 2 * 4 * 8 * (1024 + 256) + 20 * 2 * 4 * 128 * 512


def test_our_layout_hand_calculation():
    ours = cache_accounting(dm.preset("v4-flash"))["ours"]  # bf16 entries, float32 indexer keys
    assert ours["bytes_per_token"] == 21 * (512 * 2 + 128 * 4) / 4 + 20 * 512 * 2 / 128 == 8224


@pytest.mark.parametrize("name,dtype,max_len", [("tiny", "float32", 96), ("tiny", "bfloat16", 1000),
                                                ("small", "bfloat16", 4096), ("v4-flash", "bfloat16", 1 << 20)])
def test_our_layout_equals_the_allocated_cache(name, dtype, max_len):
    cfg = dm.preset(name).replace(compute_dtype=dtype)
    ours = cache_accounting(cfg, max_len=max_len)["ours"]
    allocated = tree_bytes(cache_shapes(cfg, batch=1, max_len=max_len)) - 4  # minus the int32 length
    assert allocated == ours["total_bytes"] - ours["fixed_mtp_window_bytes"]
    # and per-token growth: one more ratio-aligned block of tokens adds exactly bytes_per_token x block
    block = cfg.hca_compress_ratio  # a multiple of the CSA ratio in every preset
    grown = tree_bytes(cache_shapes(cfg, batch=1, max_len=max_len + block)) - 4
    assert grown - allocated == pytest.approx(ours["bytes_per_token"] * block)


def test_table_mentions_the_numbers():
    text = format_accounting(cache_accounting(dm.preset("v4-pro"), max_len=1 << 20))
    assert "5.03 KB" in text and "10.5 %" in text and "2.0 %" in text and "total at 1048576 tokens" in text
