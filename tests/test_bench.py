"""`deepmoe bench` on `tiny`, one run of every part that the tests share: its JSON holds what the README tables
quote, and MFU is the documented formula (model FLOPs per token from deepmoe.plan x tokens/s / the better of the
two peak measurements, and per round against the peak's matmul timed in the same round); --profile adds the
per-component breakdown of the timed programs, a decode step's among them; decode MBU is the documented formula
over the bytes the planner counts and the cache prefill allocates; --compare-transformers times transformers in
alternation with us and reports the median of the rounds' time ratios."""

import contextlib
import io
import json

import jax
import numpy as np
import pytest

from deepmoe import bench
from deepmoe.config import preset
from deepmoe.infer.decode import prefill
from deepmoe.params import init_params
from deepmoe.plan import PlanOptions, decode_weight_bytes, flops_per_token
from deepmoe.train.step import TrainConfig, layers_scanned


def _assert_paired_speedups(r, tokens_per_run):
    """--compare-transformers: each part's speedup is the median over rounds of transformers' time / ours in the
    same round, its tokens/s the tokens of a run / the median time; the summary quotes them."""
    parts = {"forward": r["forward"], "train": r.get("train"), "prefill": r.get("generate", {}).get("prefill"),
             "decode": r.get("generate", {}).get("decode")}
    assert set(r["speedup_vs_transformers"]) == {f"{p}_tokens_per_s" for p in tokens_per_run}
    for part, tokens in tokens_per_run.items():
        ours = parts[part]
        theirs = r["forward"]["transformers"] if part == "forward" else (
            r["train"]["transformers"] if part == "train" else r["generate"]["transformers"][part])
        assert len(ours["seconds_each"]) == len(theirs["seconds_each"]) == 2
        ratios = np.array(theirs["seconds_each"]) / np.array(ours["seconds_each"])
        np.testing.assert_allclose(theirs["speedup_each"], ratios, rtol=1e-12)
        np.testing.assert_allclose(r["speedup_vs_transformers"][f"{part}_tokens_per_s"], np.median(ratios), rtol=1e-12)
        np.testing.assert_allclose(r["transformers"][f"{part}_tokens_per_s"],
                                   tokens / np.median(theirs["seconds_each"]), rtol=1e-12)


SEQ, NEW_TOKENS = 32, 64  # 63 decode steps of `tiny`: 16 tokens were refused as noise once on a busy 2-core VM


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    """One `deepmoe bench` of every part, profiled and against transformers: (results JSON, output dir, stdout)."""
    out_dir = tmp_path_factory.mktemp("bench")
    out = out_dir / "tiny.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert bench.main(["--preset", "tiny", "--seq", str(SEQ), "--repeats", "2", "--new-tokens", str(NEW_TOKENS),
                           "--json", str(out), "--profile", "--compare-transformers"]) == 0
    return json.loads(out.read_text()), out_dir, printed.getvalue()


def test_bench_json_and_mfu_formula(tiny_bench):
    r, out_dir, printed = tiny_bench
    flops = flops_per_token(preset("tiny").replace(num_mtp_layers=0),
                            PlanOptions(mode="train", seq_len=SEQ, remat="none"))
    peak = r["peak_flops"]["float32"]
    assert peak >= r["peak_flops_first_measurement"]["float32"] > 0
    assert abs(r["forward"]["mfu"] - flops["forward"] * r["forward"]["tokens_per_s"] / peak) < 1e-12
    assert abs(r["train"]["mfu"] - flops["model"] * r["train"]["tokens_per_s"] / peak) < 1e-12
    # paired MFU: per round against that round's time of the peak's square matmul (2 n^3 FLOPs, n >= 2048)
    n = round((r["peak_matmul_flops"] / 2) ** (1 / 3))
    assert n >= 2048 and r["peak_matmul_flops"] == 2.0 * n ** 3
    for part, part_flops in (("forward", flops["forward"]), ("train", flops["model"])):
        seconds, peak_s = np.array(r[part]["seconds_each"]), np.array(r[part]["peak_seconds_each"])
        assert len(seconds) == len(peak_s) == 2
        each = part_flops * SEQ / seconds * peak_s / (2.0 * n ** 3)
        np.testing.assert_allclose(r[part]["mfu_paired_each"], each, rtol=1e-12)
        assert r[part]["mfu_paired"] == pytest.approx(float(np.median(each)), rel=1e-12)
    forward_seconds = np.median(r["forward"]["seconds_each"])
    assert r["forward"]["tokens_per_s"] == SEQ / r["forward"]["seconds"] == SEQ / forward_seconds
    _assert_paired_speedups(r, {"forward": SEQ, "train": SEQ, "prefill": SEQ, "decode": 1})
    assert (out_dir / "tiny-vs-transformers.png").read_bytes()[:4] == b"\x89PNG"
    # the forward runs over the layout the train step picks for this model
    assert r["forward"]["layout"] == ("segments" if layers_scanned(preset("tiny"), TrainConfig()) else "layers")
    assert r["host_buffers"] == "on" or "already started" in r["host_buffers"]  # conftest applied it first
    # the gradient program's memory analysis: its outputs hold a float32 gradient of every float parameter
    params = init_params(preset("tiny"), jax.random.key(0))
    float_elements = sum(x.size for x in jax.tree.leaves(params) if np.issubdtype(x.dtype, np.floating))
    assert r["train"]["memory"]["output_size_in_bytes"] >= 4 * float_elements
    assert r["train"]["memory"]["temp_size_in_bytes"] > 0
    assert "train step:" in printed and f"wrote {out_dir / 'tiny.json'}" in printed
    # --profile: both programs of the step traced, the model's components found in each
    fwd, step = r["forward"]["profile"], r["train"]["profile"]
    assert {"attention", "moe", "mhc"} <= set(fwd["components"])
    assert {"attention (backward)", "moe (backward)", "optimizer update"} <= set(step["components"])
    assert abs(sum(step["components"].values()) - step["op_ms_per_run"]) < 1e-6
    assert (out_dir / "tiny-profile.png").read_bytes()[:4] == b"\x89PNG" and (out_dir / "tiny-trace").is_dir()
    assert "profile, train step:" in printed
    # the programs' matmuls: at least the model's FLOPs (the plan counts only products the model must do), at a
    # rate that is their FLOPs over their op time, against the peak
    for part, part_flops in (("forward", flops["forward"]), ("train", flops["model"])):
        mm = r[part]["profile"]["matmul"]
        assert mm["per_model_flop"] == pytest.approx(mm["flops_per_run"] / (part_flops * SEQ), rel=1e-12)
        assert 1 <= mm["per_model_flop"] < 2 and 0 < mm["op_ms_per_run"] <= r[part]["profile"]["op_ms_per_run"]
        assert mm["peak_share"] == pytest.approx(mm["flops_per_run"] / (mm["op_ms_per_run"] / 1e3) / peak, rel=1e-12)
    assert printed.count("  matmuls: ") == 3  # forward, train step, decode step


def test_bench_decode_mbu(tiny_bench):
    """Decode MBU = (weights + cache a step reads) x steps/s / the measured read bandwidth; the cache bytes are
    those of the cache prefill really allocates for the prompt plus the new tokens."""
    r, _, printed = tiny_bench
    cfg = preset("tiny", compute_dtype="float32")  # bench's default --dtype; the cache keeps that dtype
    gen, read = r["generate"], r["generate"]["bytes_per_step"]
    assert read["weights"] == decode_weight_bytes(cfg, "float32", 1)
    # the cache prefill returns, by shape and dtype (eval_shape: nothing to compile or run)
    _, cache = jax.eval_shape(lambda: prefill(init_params(cfg, jax.random.key(0)), cfg, np.zeros((1, SEQ), np.int32),
                                              max_len=SEQ + NEW_TOKENS))
    assert read["cache"] == sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
    assert read["total"] == read["weights"] + read["cache"]
    assert r["read_bandwidth"]["bytes"] == min(max(read["total"], 16 * 2**20), 2**30) // 4096 * 4096
    assert r["read_bandwidth"]["bytes_per_s"] > 0
    assert abs(gen["mbu"] - read["total"] * gen["decode_tokens_per_s"] / r["read_bandwidth"]["bytes_per_s"]) < 1e-12
    hf_mbu = read["total"] * r["transformers"]["decode_tokens_per_s"] / r["read_bandwidth"]["bytes_per_s"]
    assert abs(r["transformers"]["decode_mbu"] - hf_mbu) < 1e-12
    for steps, first in ((gen["decode"], gen["prefill"]),  # a round's generate less the median prefill
                         (gen["transformers"]["decode"], gen["transformers"]["prefill"])):
        expected = (np.array(steps["generate_seconds_each"]) - np.median(first["seconds_each"])) / (NEW_TOKENS - 1)
        assert np.all(expected > 0)
        np.testing.assert_allclose(steps["seconds_each"], expected, rtol=1e-12)
    assert "MBU" in printed
    # --profile: the decode step traced too, its components found
    decode = gen["profile"]
    assert {"attention", "moe", "mhc"} <= set(decode["components"]) and "profile, decode step:" in printed
    assert abs(sum(decode["components"].values()) - decode["op_ms_per_run"]) < 1e-6


def test_interleaved_times_pair_each_round():
    """On a machine whose speed changes between rounds (busy spells), runs timed in alternation see the same
    spell: every round's ratio is the true cost ratio (3). Each turn is a pause, an untimed call and the timed
    one; a single run is timed back to back, without either."""
    slowdown = iter([1.0, 1.0] + [f for f in (1.0, 2.0, 1.5, 4.0) for _ in range(4)])  # warm-ups, then rounds
    clock, calls, pauses = [0.0], [], []

    def run(name, cost):
        def call():
            calls.append(name)
            clock[0] += cost * next(slowdown)
        return call

    times = bench.interleaved_times({"ours": run("ours", 1.0), "theirs": run("theirs", 3.0)}, repeats=4,
                                    clock=lambda: clock[0], sleep=pauses.append)
    assert calls == ["ours", "theirs"] + ["ours", "ours", "theirs", "theirs"] * 4
    assert times == {"ours": [1.0, 2.0, 1.5, 4.0], "theirs": [3.0, 6.0, 4.5, 12.0]}
    assert pauses == [0.05] * 8
    versus = bench.versus(times["ours"], times["theirs"], work=10)
    assert versus["speedup_each"] == [3.0] * 4 and versus["speedup"] == 3.0
    assert versus["tokens_per_s"] == 10 / np.median([3.0, 6.0, 4.5, 12.0])
    calls.clear()
    pauses.clear()
    alone = bench.interleaved_times({"ours": lambda: calls.append("ours")}, repeats=3, sleep=pauses.append)
    assert len(alone["ours"]) == 3 and calls == ["ours"] * 4 and pauses == []


def test_decode_steps_below_the_timing_noise_are_refused(monkeypatch):
    """A round whose generate took no longer than the median prefill has no decode time to report (its share of
    a step would be <= 0): UnresolvedDecode names the side, the round and the fix. The bench then reports its other
    parts, and says why prefill + decode are missing."""
    prefills, n = [0.010, 0.014, 0.012], 5
    assert bench.decode_step_seconds(prefills, [0.020, 0.032], n) == pytest.approx([0.002, 0.005], rel=1e-12)
    with pytest.raises(bench.UnresolvedDecode, match=r"transformers: a generate of 5 tokens .*round 1: 11\.00 ms.*"
                                                     r"--new-tokens"):
        bench.decode_step_seconds(prefills, [0.020, 0.011], n, "transformers")

    def unresolved(*args, **kwargs):
        raise bench.UnresolvedDecode("deepmoe: a generate of 2 tokens took no longer than the median prefill")

    part = {"tokens_per_s": 32.0, "seconds": 1.0, "seconds_each": [1.0], "peak_seconds_each": [1.0],
            "compile_s": 0.0, "memory": {}, "layout": "segments"}
    monkeypatch.setattr(bench, "measure_peak_flops", lambda dtype: 1e9)
    monkeypatch.setattr(bench, "peak_matmul", lambda dtype: (None, 1e9))
    monkeypatch.setattr(bench, "bench_forward", lambda *args, **kwargs: dict(part))
    monkeypatch.setattr(bench, "bench_generate", unresolved)
    r = bench.run_bench(preset("tiny"), batch=1, seq=SEQ, repeats=1, new_tokens=2, compare=False, skip={"train"},
                        log=lambda line: None)
    assert "generate" not in r and "read_bandwidth" not in r and r["forward"]["tokens_per_s"] == 32.0
    assert r["generate_error"].startswith("deepmoe: a generate of 2 tokens")
    assert f"prefill + decode: not reported: {r['generate_error']}" in bench.format_result(r)


def test_peak_matmul_size_grows_until_a_product_is_busy():
    """The peak is measured on a product that takes at least min_seconds: against a cubic time model, a CPU-like
    machine (2048^3 x 2 FLOPs in ~60 ms) stays at 2048; an accelerator-like one (~800 TFLOP/s) grows to the
    first side whose product takes 10 ms, or to max_size."""
    def seconds_at(flops_per_s):
        return lambda n: 2.0 * n ** 3 / flops_per_s

    assert bench.peak_matmul_size(seconds_at(3e11)) == 2048
    # 2 * 8192^3 / 8e14 = 1.4 ms < 10 ms, 2 * 16384^3 / 8e14 = 11 ms
    assert bench.peak_matmul_size(seconds_at(8e14)) == 16384
    assert bench.peak_matmul_size(seconds_at(8e14), max_size=8192) == 8192
    assert bench.peak_matmul_size(seconds_at(8e14), min_seconds=1e-3) == 8192
    sizes = []
    bench.peak_matmul_size(lambda n: sizes.append(n) or 0.0, max_size=8192)
    assert sizes == [2048, 4096]  # the cap is never timed


@pytest.mark.parametrize("argv, message", [
    (["--skip", "trian"], "--skip takes train and/or decode, not trian"),
    (["--repeats", "0"], "--repeats must be at least 1, got 0"),
    (["--new-tokens", "1"], "--new-tokens must be at least 2"),
])
def test_bench_refuses_bad_arguments_before_measuring(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--preset", "tiny", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
