"""Every experiment runs with --quick (in-process, via its main(argv)) and writes its json + png; the numbers are
checked against independent calculations: kv_and_flops against the spec's hand arithmetic (§9.3) and the
planner's FLOP formula, the ablations for shapes, finiteness and properties that hold by construction
(doubly stochastic mHC has composite gain 1, every step routes batch x seq x top-k token copies, ...)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest

import deepmoe as dm

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "experiments"
QUICK = dict(steps=12, batch=4, seq=64)  # the --quick settings of the three ablations


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """name -> (output dir, results.json), each experiment run once per module."""
    done: dict[str, tuple[Path, dict]] = {}

    def run(name: str) -> tuple[Path, dict]:
        if name not in done:
            out = tmp_path_factory.mktemp(name)
            assert _load(name).main(["--quick", "--out", str(out)]) == 0
            done[name] = (out, json.loads((out / "results.json").read_text()))
        return done[name]

    return run


def _finite(x) -> bool:
    return bool(np.all(np.isfinite(np.asarray(x, np.float64))))


def _pngs(out: Path, result: dict) -> None:
    assert result["plots"], "no plots written"
    for name in result["plots"]:
        path = out / name
        assert path.exists() and path.stat().st_size > 10_000, path
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----- kv_and_flops -----------------------------------------------------------------------------------------

def test_kv_and_flops_matches_the_spec_hand_calculation(quick_run):
    out, result = quick_run("kv_and_flops")
    _pngs(out, result)
    claims = result["claims"]
    L = claims["context"]
    assert L == 2 ** 20

    # §9.3: entry 448 FP8 + 64 BF16 + 7 scales + 1 pad; indexer key 64 B FP4 + 4 scales.
    entry, key = 448 + 64 * 2 + 7 + 1, 128 // 2 + 4
    assert (entry, key) == (584, 68)
    flash = 21 * (entry + key) / 4 + 20 * entry / 128
    pro = 30 * (entry + key) / 4 + 31 * entry / 128
    v32 = 61 * (656 + 132)
    gqa = 61 * 2 * 8 * 128 * 2
    assert claims["v4-flash"]["kv_bytes_per_token"] == pytest.approx(flash) == pytest.approx(3514.25)
    assert claims["v4-pro"]["kv_bytes_per_token"] == pytest.approx(pro) == pytest.approx(5031.4375)
    assert round(flash / 1e3, 2) == 3.51 and round(pro / 1e3, 2) == 5.03 and round(v32 / 1e3, 1) == 48.1
    assert claims["DeepSeek-V3.2"]["kv_bytes_per_token"] == v32
    assert claims["BF16 GQA-8"]["kv_bytes_per_token"] == gqa
    assert claims["v4-pro"]["kv_vs_v32"] == pytest.approx(pro / v32)
    assert abs(claims["v4-pro"]["kv_vs_v32"] - 0.10) < 0.01  # report: 10 %
    assert abs(claims["v4-flash"]["kv_vs_v32"] - 0.07) < 0.01  # report: 7 %
    assert abs(claims["v4-pro"]["kv_vs_gqa"] - 0.02) < 0.005  # report: ~2 %

    # FLOPs of one token at 1M, written out by hand (active params from the README's parameter table).
    v32_w, v32_a, v32_i = 2 * 37e9, 61 * 2 * 128 * (576 + 512) * 2048, 61 * 2 * 64 * 129 * L
    assert claims["DeepSeek-V3.2"]["flops"] == pytest.approx(v32_w + v32_a + v32_i, rel=1e-9)
    v32_fp8 = v32_w + 2 * v32_a + v32_i
    per_key = {"v4-pro": 4 * 128 * 512, "v4-flash": 4 * 64 * 512}
    layers = {"v4-pro": (30, 31, 0, 1024, 49.78e9), "v4-flash": (21, 20, 2, 512, 13.80e9)}
    for name, (csa, hca, swa, topk, active) in layers.items():
        attn = per_key[name] * (csa * (128 + topk) + hca * (128 + L // 128) + swa * 128)
        index = csa * 2 * 64 * 129 * (L // 4)
        plain = 2 * active + attn + index
        fp8 = 2 * active + 2 * attn + 0.5 * index
        assert claims[name]["flops"] == pytest.approx(plain, rel=2e-3)
        assert claims[name]["flops_fp8_equivalent"] == pytest.approx(fp8, rel=2e-3)
        assert claims[name]["flops_fp8_equivalent_vs_v32"] == pytest.approx(fp8 / v32_fp8, rel=2e-3)
        assert claims[name]["flops_vs_v32"] == pytest.approx(plain / (v32_w + v32_a + v32_i), rel=2e-3)
    # the report: Pro 27 %, Flash 10 % of V3.2's single-token FLOPs (within a few points)
    assert abs(claims["v4-pro"]["flops_fp8_equivalent_vs_v32"] - 0.27) < 0.02
    assert abs(claims["v4-flash"]["flops_fp8_equivalent_vs_v32"] - 0.10) < 0.02
    assert abs(claims["v4-pro"]["flops_vs_v32"] - 0.27) < 0.03
    assert abs(claims["v4-flash"]["flops_vs_v32"] - 0.10) < 0.03

    # the curves: one value per context, growing with it; V4 below V3.2 below GQA at long context
    curves = result["curves"]
    for model in ("v4-pro", "v4-flash", "DeepSeek-V3.2", "BF16 GQA-8"):
        c = curves[model]
        n = len(c["context"])
        assert n >= 10 and c["context"][-1] == L
        for key_ in ("kv_total_bytes", "flops", "flops_fp8_equivalent"):
            assert len(c[key_]) == n and _finite(c[key_]) and np.all(np.diff(c[key_]) >= 0), (model, key_)
    assert curves["v4-flash"]["kv_total_bytes"][-1] < curves["DeepSeek-V3.2"]["kv_total_bytes"][-1] \
        < curves["BF16 GQA-8"]["kv_total_bytes"][-1]


def test_v4_costs_agree_with_accounting_and_planner():
    """Two other implementations: infer/accounting.py (cache bytes) and plan.py (attention FLOPs per token)."""
    from deepmoe import analysis
    from deepmoe.infer.accounting import layout_accounting

    for name in ("v4-flash", "v4-pro"):
        cfg = dm.preset(name)
        costs = analysis.v4_costs(cfg, [4096, 2 ** 20])
        acc = layout_accounting(cfg, "fp8", max_len=2 ** 20)
        assert costs["kv_bytes_per_token"] == acc["bytes_per_token"]
        assert costs["kv_total_bytes"][1] == pytest.approx(acc["total_bytes"], rel=1e-6)
        try:
            from deepmoe.plan import attention_flops
        except ImportError:
            continue
        no_mtp = cfg.replace(num_mtp_layers=0)
        for i, context in enumerate((4096, 2 ** 20)):
            planned = attention_flops(no_mtp, np.array([context - 1]))
            ours = costs["flops_attention"][i] + costs["flops_indexer"][i]
            assert ours == pytest.approx(planned, rel=1e-9), (name, context)


def test_sequence_attention_flops_by_hand():
    from deepmoe import analysis
    from deepmoe.config import CSA, HCA, SLIDING

    cfg = dm.preset("tiny")  # H=4, c=64, W=16, CSA m=4 top-4, HCA m=16, H_I=8, c_I=32
    T, per_key = 64, 4 * 4 * 64
    window = sum(min(16, t) for t in range(1, T + 1))
    assert analysis.sequence_attention_flops(cfg, SLIDING, T)["total"] == per_key * window
    hca = sum(t // 16 for t in range(1, T + 1))
    assert analysis.sequence_attention_flops(cfg, HCA, T)["total"] == per_key * (window + hca)
    csa = analysis.sequence_attention_flops(cfg, CSA, T)
    assert csa["core"] == per_key * (window + sum(min(4, t // 4) for t in range(1, T + 1)))
    assert csa["indexer"] == 2 * 8 * 33 * sum(t // 4 for t in range(1, T + 1))


# ----- residual ablation ------------------------------------------------------------------------------------

def test_mhc_variant_is_deepmoe_forward():
    """The ablation's mHC path is the model's: identical logits (bit for bit) on a scanned and a mixed schedule."""
    from deepmoe.ablations import residual_forward

    exp = _load("ablation_residual")
    for cfg in (exp.model_config(3), dm.preset("tiny", num_layers=2, layer_types=("csa", "hca"),
                                                num_mtp_layers=0, sinkhorn_iterations=3)):
        params = dm.init_params(cfg, jax.random.key(0))
        ids = jax.random.randint(jax.random.key(1), (2, 32), 3, cfg.vocab_size)
        ref = jax.jit(lambda p, i: dm.forward(p, cfg, i, mtp=False).logits)(params, ids)
        got, trace = jax.jit(lambda p, i: residual_forward(p, cfg, i, "mhc"))(params, ids)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
        comb = np.asarray(trace["comb"])  # doubly stochastic: Sinkhorn ends on a column normalisation,
        np.testing.assert_allclose(comb.sum(-2), 1.0, atol=1e-5)  # rows converge with the iterations
        np.testing.assert_allclose(comb.sum(-1), 1.0, atol=1e-5 if cfg.sinkhorn_iterations >= 20 else 1e-2)


def test_ablation_residual_outputs(quick_run):
    out, result = quick_run("ablation_residual")
    _pngs(out, result)
    layers, steps = result["settings"]["layers"], result["settings"]["steps"]
    assert (layers, steps) == (4, QUICK["steps"])
    variants = result["variants"]
    assert set(variants) == {"mhc", "hc", "plain"}
    for name, r in variants.items():
        assert len(r["loss"]) == steps and len(r["grad_norm"]) == steps
        if name != "hc":  # mHC and the plain residual must train stably; HC may blow up (that is the point)
            assert _finite(r["loss"]) and r["skipped"] == 0, name
            assert r["loss"][-1] < r["loss"][0], name
            assert math.log(512) - 1.5 < r["loss"][0] < math.log(512) + 1.5  # ~uniform over 512 ids at init
        for when in ("first", "last"):
            gain = r["signal_gain"][when]
            assert len(gain) == layers + 1 and gain[0] == pytest.approx(1.0)
            assert len(r["layer_grad_norm"][when]) == layers
            assert len(r["activation_grad_norm"][when]) == layers
        assert _finite(r["signal_gain"]["first"]) and _finite(r["layer_grad_norm"]["first"])
        assert np.all(np.asarray(r["layer_grad_norm"]["first"]) > 0)
    # composite residual maps over the 2L sub-blocks: doubly stochastic => gain exactly 1; raw => not bounded
    for when in ("first", "last"):
        for key in ("comb_forward_gain", "comb_backward_gain"):
            mhc = np.asarray(variants["mhc"][key][when])
            assert mhc.shape == (2 * layers,)
            np.testing.assert_allclose(mhc, 1.0, atol=1e-3)
            assert len(variants["hc"][key][when]) == 2 * layers
    assert "comb_forward_gain" not in variants["plain"]
    assert max(variants["hc"]["comb_forward_gain"]["first"]) > 1.1
    assert result["summary"]["plain"]["comb_forward_gain_max"] == 1.0


# ----- attention ablation -----------------------------------------------------------------------------------

def test_ablation_attention_outputs(quick_run):
    out, result = quick_run("ablation_attention")
    _pngs(out, result)
    training = result["training"]
    assert set(training) == {"hybrid", "sliding", "dense"}
    for name, r in training.items():
        assert len(r["loss"]) == QUICK["steps"] and _finite(r["loss"]), name
        assert r["loss"][-1] < r["loss"][0], name
    assert training["dense"]["sliding_window"] >= QUICK["seq"]
    assert set(training["sliding"]["layer_types"]) == {"sliding_attention"}
    assert "compressed_sparse_attention" in training["hybrid"]["layer_types"]

    cost = result["cost"]
    T = np.array(cost["seq_lens"])
    assert list(T) == [64, 256]
    per_type = cost["per_layer_type"]
    assert set(per_type) == {"sliding", "csa", "hca", "dense"}
    for kind, rows in per_type.items():
        for key in ("flops", "bytes_accessed", "temp_bytes", "seconds", "analytic_flops"):
            assert len(rows[key]) == len(T) and _finite(rows[key]) and min(rows[key]) > 0, (kind, key)
        assert np.all(np.diff(rows["flops"]) > 0) and np.all(np.diff(rows["analytic_flops"]) > 0), kind
        # the compiled count includes projections and the dense-masked reference work: never below the algorithm
        assert np.all(np.array(rows["flops"]) >= np.array(rows["analytic_flops"])), kind
    growth = {k: per_type[k]["flops"][-1] / per_type[k]["flops"][0] for k in per_type}  # T x4
    assert growth["sliding"] < 4.5  # linear in T
    assert growth["dense"] > 8  # quadratic attention dominates
    assert growth["sliding"] < growth["hca"] < growth["dense"]
    # algorithmic FLOPs, independently: sliding window keys sum_t min(W, t) x 4 H c
    cfg = dm.preset("tiny")
    window = [sum(min(cfg.sliding_window, t) for t in range(1, n + 1)) for n in T]
    np.testing.assert_allclose(per_type["sliding"]["analytic_flops"],
                               4 * cfg.num_heads * cfg.head_dim * np.array(window))
    # a variant's cost is the sum over its layers
    for name, r in cost["per_variant"].items():
        expected = np.sum([per_type[kind]["flops"] for kind in r["layers"]], axis=0)
        np.testing.assert_allclose(r["flops"], expected)
    assert cost["per_variant"]["dense"]["flops"][-1] > cost["per_variant"]["sliding"]["flops"][-1]


# ----- balancing ablation -----------------------------------------------------------------------------------

def test_ablation_balancing_outputs(quick_run):
    out, result = quick_run("ablation_balancing")
    _pngs(out, result)
    variants = result["variants"]
    assert set(variants) == {"aux_free", "aux_loss", "none", "v4"}
    e, k = result["settings"]["num_experts"], result["settings"]["experts_per_token"]
    copies = QUICK["batch"] * QUICK["seq"] * k
    for name, r in variants.items():
        layers = len(r["score_layers"])
        assert layers >= 1
        assert len(r["loss"]) == QUICK["steps"] and _finite(r["loss"]) and _finite(r["balance_loss"]), name
        mom, cv = np.asarray(r["max_over_mean"]), np.asarray(r["cv"])
        assert mom.shape == cv.shape == (QUICK["steps"], layers), name
        assert np.all(mom >= 1 - 1e-9) and np.all(mom <= e / k + 1e-9)  # at worst all copies on k experts
        assert np.all(cv >= 0) and _finite(cv)
        final_load = np.asarray(r["final_load"])
        assert final_load.shape == (layers, e)
        np.testing.assert_allclose(final_load.sum(-1), copies)  # every token routed to k experts
        assert r["final_max_over_mean"] == pytest.approx(mom[-max(1, QUICK["steps"] // 5):].mean())
    # the options reached the step: only the bias variants move the router bias
    assert np.all(np.asarray(variants["none"]["bias_abs_mean"]) == 0)
    assert np.all(np.asarray(variants["aux_loss"]["bias_abs_mean"]) == 0)
    assert np.all(np.asarray(variants["aux_free"]["bias_abs_mean"])[-1] > 0)
    speed = variants["aux_free"]["bias_update_speed"]
    assert np.asarray(variants["aux_free"]["bias_abs_mean"])[-1].max() <= speed * QUICK["steps"] + 1e-7
    assert variants["aux_loss"]["balance_weight"] > 0 and variants["none"]["balance_weight"] == 0


# ----- train_mfu --------------------------------------------------------------------------------------------

def test_train_mfu_is_the_bench_formula_and_records_the_plan(quick_run):
    """The quick run (tiny, 2 x 64, bf16, XLA attention): MFU = the planner's model FLOPs per token x tokens/s /
    the measured bf16 peak; tokens/s = batch x seq / seconds; the plan's parameter bytes = the bytes of the
    parameters init_params makes."""
    from deepmoe.plan import PlanOptions, flops_per_token

    out, result = quick_run("train_mfu")
    _pngs(out, result)
    assert list(result["variants"]) == ["reference"] and result["settings"]["target_train_mfu"] == 0.35
    r = result["variants"]["reference"]
    cfg = dm.preset("tiny")
    flops = flops_per_token(cfg.replace(num_mtp_layers=0), PlanOptions(mode="train", seq_len=64, remat="none"))
    peak = r["peak_flops"]["bfloat16"]
    for part, per_token in (("train", flops["model"]), ("forward", flops["forward"])):
        assert r[part]["tokens_per_s"] == pytest.approx(2 * 64 / r[part]["seconds"])
        assert r[part]["mfu"] == pytest.approx(per_token * r[part]["tokens_per_s"] / peak)
    assert r["batch"] == 2 and r["moe_strategy"] == "blocked"  # CPU: no ragged_dot (E x the work here too)
    params = dm.init_params(cfg, jax.random.key(0))
    assert r["plan"]["memory"]["params"] == sum(x.nbytes for x in jax.tree.leaves(params))
    # the gradient program's temporaries kept beside the plan's activations (printed side by side)
    assert r["train"]["memory"]["temp_size_in_bytes"] > 0 and r["plan"]["memory"]["activations"] > 0
    # --profile (on in --quick): both programs traced, their matmuls at least the model's FLOPs
    for part, per_token in (("train", flops["model"]), ("forward", flops["forward"])):
        matmul = r[part]["profile"]["matmul"]
        assert matmul["flops_per_run"] == pytest.approx(matmul["per_model_flop"] * per_token * 2 * 64, rel=1e-12)
        assert matmul["per_model_flop"] >= 1 and "profile_error" not in r
    assert (out / "trace-reference").is_dir()


def test_train_mfu_halves_the_batch_when_the_device_runs_out_of_memory():
    """A stand-in bench that runs out of memory above batch 2: the variant is measured at 2 after 8 and 4 fail;
    any other error is recorded (with the batch it happened at) instead of stopping the other variants."""
    module = _load("train_mfu")
    args = module.parse_args(["--quick", "--batch", "8"])
    tried = []

    def bench(cfg, *, batch, **_):
        tried.append((cfg.kernels, batch))
        if batch > 2:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.2GiB")
        return {"train": {"mfu": 0.4}, "forward": {"mfu": 0.5}, "peak_flops": {"bfloat16": 1.0}}

    r = module.run_variant(dm.preset("tiny"), "reference", args, bench=bench)
    assert tried == [("reference", 8), ("reference", 4), ("reference", 2)]
    assert r["batch"] == 2 and r["train"] == {"mfu": 0.4} and "error" not in r
    assert r["plan"]["memory"]["total"] < module.planned(dm.preset("tiny"), args, 8)["memory"]["total"]

    def broken(cfg, *, batch, **_):
        raise ValueError("the pallas lowering failed")

    r = module.run_variant(dm.preset("tiny"), "pallas", args, bench=broken)
    assert r == {"batch": 8, "error": "ValueError: the pallas lowering failed"}

    def unprofilable(cfg, *, batch, trace_dir, **_):
        tried.append((batch, trace_dir))
        if trace_dir:
            raise RuntimeError("no device op events in the trace")
        return {"train": {"mfu": 0.4}, "forward": {"mfu": 0.5}}

    tried.clear()
    r = module.run_variant(dm.preset("tiny"), "reference", args, bench=unprofilable, trace_dir="t")
    assert tried == [(8, "t"), (8, None)] and r["train"] == {"mfu": 0.4}
    assert r["profile_error"] == "RuntimeError: no device op events in the trace"


def test_train_mfu_refuses_the_accelerator_benchmark_on_cpu(tmp_path, capsys):
    assert _load("train_mfu").main(["--out", str(tmp_path)]) == 2
    assert "accelerator benchmark" in capsys.readouterr().err and not any(tmp_path.iterdir())


# ----- ab_xla_options ---------------------------------------------------------------------------------------

def test_ab_xla_options_pairs_rounds_and_compares_outputs(quick_run):
    """--quick runs A = B (deepmoe's own options on both): the two compiled programs are the same and give
    identical gradients, and B's speedup is the median over rounds of A's recorded time / B's."""
    out, r = quick_run("ab_xla_options")
    assert r["options"] == {"A": {}, "B": {}} and r["max_abs_output_difference"] == 0.0
    assert r["same_program"] is True
    a, b = np.array(r["seconds_each"]["A"]), np.array(r["seconds_each"]["B"])
    assert len(a) == len(b) == 3
    np.testing.assert_allclose(r["speedup_of_b_each"], a / b, rtol=1e-12)
    assert r["speedup_of_b"] == pytest.approx(float(np.median(a / b)), rel=1e-12)
    _pngs(out, r)


def test_ab_xla_options_parses_and_refuses_options(tmp_path, capsys):
    ab = _load("ab_xla_options")
    assert ab.parse_options("xla_a=512; xla_b=true;xla_c=FALSE;xla_d=LIBRARY_FUSION_TYPE_DOT;") == {
        "xla_a": 512, "xla_b": True, "xla_c": False, "xla_d": "LIBRARY_FUSION_TYPE_DOT"}
    with pytest.raises(ValueError, match="name=value"):
        ab.parse_options("xla_a")
    assert ab.main(["--quick", "--out", str(tmp_path), "--b", "xla_cpu_no_such_option=true"]) == 2
    err = capsys.readouterr().err
    assert "option set B" in err and "xla_cpu_no_such_option" in err
    assert not (tmp_path / "results.json").exists()


# ----- bench_decode -----------------------------------------------------------------------------------------

def test_bench_decode_pairs_rounds_on_the_same_weights(quick_run):
    """Both sides decode the same saved weights greedily, so their tokens agree; every speedup is the median of
    the rounds' ratios of the recorded times, and decode is each round's generate less the median prefill."""
    out, r = quick_run("bench_decode")
    assert r["tokens_match"] and r["matching_prefix"] == r["new_tokens"] == 128
    t, n = {k: np.array(v) for k, v in r["seconds_each"].items()}, r["new_tokens"]
    ours, theirs = ({"prefill": t[f"{who} prefill"],
                     "decode": (t[f"{who} generate"] - np.median(t[f"{who} prefill"])) / (n - 1)}
                    for who in ("deepmoe", "transformers"))
    for part, tokens in (("prefill", r["prompt_len"]), ("decode", 1)):
        assert len(ours[part]) == r["rounds"] == 2
        np.testing.assert_allclose(r["deepmoe"][part]["seconds_each"], ours[part], rtol=1e-12)
        np.testing.assert_allclose(r["transformers"][part]["speedup_each"], theirs[part] / ours[part], rtol=1e-12)
        assert r["transformers"][part]["speedup"] == pytest.approx(float(np.median(theirs[part] / ours[part])))
        assert r["deepmoe"][part]["tokens_per_s"] == pytest.approx(tokens / float(np.median(ours[part])))
    _pngs(out, r)


def test_bench_decode_refuses_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _load("bench_decode").main(["--quick", "--new-tokens", "1", "--out", str(tmp_path)])
    assert "--new-tokens must be at least 2, got 1" in capsys.readouterr().err and not any(tmp_path.iterdir())


def test_bench_load_reports_the_checkpoint_it_loaded(tmp_path, capsys):
    """bench_load --quick writes a bf16 checkpoint and loads it in a fresh process: the loaded bytes are the
    config's parameters as described (abstract_params), the files hold those bytes plus their headers, and the
    reported ratio is its two measurements'."""
    module = _load("bench_load")
    assert module.main(["--quick", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "result.json").read_text())
    described = dm.abstract_params(module._config(True).replace(param_dtype="bfloat16"))
    assert r["result_bytes"] == sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(described))
    assert r["result_bytes"] <= r["checkpoint_bytes"] < 1.01 * r["result_bytes"]
    assert r["rss_growth_over_result"] == pytest.approx(r["rss_growth_bytes"] / r["result_bytes"], rel=1e-12)
    assert r["seconds"] > 0 and r["peak_rss_bytes"] >= r["rss_growth_bytes"] > 0
    assert f"wrote {tmp_path / 'result.json'}" in capsys.readouterr().out


def test_bench_kernels_memory_grows_as_the_attention_forms_say(tmp_path, capsys):
    """bench_kernels on the window attention (T = 256, 512, 1024): each implementation's memory exponent is the
    least-squares slope of its recorded log temporaries against log T; the blocked reference and the Pallas
    kernel grow ~T^1 (O(T * window)) and the dense oracle ~T^2, holding at least its fp32 [B, H, T, T] scores."""
    module = _load("bench_kernels")
    seqs = [256, 512, 1024]
    assert module.main(["--kernels", "window_attention", "--seq", *map(str, seqs), "--repeats", "1",
                        "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "bench_kernels.png").read_bytes()[:4] == b"\x89PNG"
    exponents = r["memory_exponent"]
    assert set(exponents) == {f"window_attention/{impl}" for impl in ("pallas", "reference", "dense")}
    for key, exponent in exponents.items():
        impl = key.split("/")[1]
        rows = [row for row in r["rows"] if row["impl"] == impl]
        assert [row["T"] for row in rows] == seqs
        slope = np.polyfit(np.log(seqs), np.log([row["temp_bytes"] for row in rows]), 1)[0]
        assert exponent == pytest.approx(slope, abs=1e-9)
        assert abs(exponent - (2 if impl == "dense" else 1)) < 0.15, key
        if impl == "dense":
            shapes = r["meta"]["shapes"]
            assert all(row["temp_bytes"] >= shapes["B"] * shapes["H"] * row["T"] ** 2 * 4 for row in rows)
    # a name it does not know is refused, not skipped into an empty table
    with pytest.raises(SystemExit):
        module.main(["--kernels", "window", "--out", str(tmp_path / "bad")])
    assert "unknown kernel name(s) window; known: routing" in capsys.readouterr().err


def test_memory_vs_context_chunked_scores_hold_less(quick_run):
    """The forward with its score tensors in query chunks holds less than in one piece at T=512, where tiny's
    compressed scores pass the quick run's 1 MiB budget; the plan column is the planner's."""
    from deepmoe import plan

    out, result = quick_run("memory_vs_context")
    _pngs(out, result)
    temporaries = result["temporaries"]
    assert temporaries["seq"] == [512]
    chunked, whole = (temporaries[mode][0]["forward"] for mode in ("chunked", "one piece"))
    assert chunked < 0.8 * whole, (chunked, whole)
    opts = plan.PlanOptions(mode="infer", seq_len=512, compute_dtype="float32")
    assert temporaries["planned"][0]["forward"] == plan.activation_memory(dm.preset("tiny"), {}, opts=opts)["total"]
