"""`deepmoe bench`: speed and memory on this machine, against its measured peak and against transformers.

Measured, in one process:
- peak matmul FLOP/s (fp32 and bf16 `jnp.dot` of two N x N matrices, N from 2048 doubled until one product
  takes 10 ms, so that an accelerator is measured busy; the best of several runs, at the start and again at
  the end);
- forward tokens/s, train-step tokens/s (AdamW, no MTP loss, like transformers' training; fp32 master params,
  compute in cfg.compute_dtype), compile times; programs compile with deepmoe's XLA options
  (deepmoe.backend.xla_options; DEEPMOE_XLA_OPTIONS=0 for XLA's defaults);
  large host buffers stay mapped between runs (deepmoe.backend.host_memory; DEEPMOE_KEEP_HOST_BUFFERS=0 to
  compare without); the train step donates its state, as the training loop does;
- MFU = model FLOPs per token x tokens/s / measured peak of the compute dtype. Model FLOPs per token come from
  `deepmoe.plan.flops_per_token` (2 x active matmul parameters + attention 4*H*c*keys + indexer terms; a train
  step counts 3x the forward, no remat); also per round against the peak's matmul timed in the same round
  (`paired_mfu`: the median, each round's in the JSON), as the peak of a shared machine moves;
- prefill and decode tokens/s (`deepmoe.infer.generate`, greedy, over per-layer weights converted once);
- decode MBU (memory-bandwidth utilisation, decode's MFU) = bytes a step must read x steps/s / measured read
  bandwidth. Bytes: the weights of `deepmoe.plan.decode_weight_bytes` (every matrix once, the routed experts
  the tokens pick, one embedding row per sequence) + the whole decode cache; bandwidth: a float32 sum over a
  working set of the same size, 16 MiB to 1 GiB (`measure_read_bandwidth`). transformers' MBU uses the same
  bytes;
- peak memory: XLA's `memory_analysis()` of each compiled program, the process's peak RSS and, on an
  accelerator, the device's peak bytes in use (`Device.memory_stats()`);
- with --compare-transformers: transformers' `DeepseekV4ForCausalLM` on the same config (eager attention, float32,
  torch threads = this machine's cores): forward, an AdamW train step, and `generate`, each timed in alternation
  with ours (`interleaved_times`: round after round, one timed run of each after an untimed one), reported as
  speedups: the median over rounds of their time / ours in the same round (each round's ratio in the JSON,
  their range printed).
- with --profile: where the time of the forward, the train step and a decode step goes, per model component
  (attention, moe, mhc, the layer scan's weight slices, optimizer update; forward and backward apart), from a
  jax.profiler trace (deepmoe.profile): printed, in the JSON, as a PNG bar chart next to it, and the trace itself
  for TensorBoard or Perfetto (runs/bench/<name>-trace/). Beside it, the program's matmuls: the FLOPs its
  matmul ops execute per run (read from the HLO; as a multiple of the model's FLOPs, padding and masked blocks
  included), their op time and rate as a share of the measured peak, and the op time of everything else: an
  MFU below target is slow matmuls, time outside them, or both. On a GPU, --profile turns XLA's command buffers
  off for the run (they hide the ops from the trace; `xla_flags` in the JSON records it).
Times are medians over repeats after a warm-up; each repeat's time is in the JSON (`seconds_each`) and their
spread is printed (a busy machine shows it). Writes JSON (default runs/bench/<preset>.json).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from deepmoe.backend.host_memory import keep_host_buffers
from deepmoe.bench_plot import plot_comparison
from deepmoe.profile import format_profile, keep_ops_in_trace, plot_profiles, profile_runs, summary


PROFILED = (("forward", "forward"), ("train", "train step"), ("generate", "decode step"))  # result key, title


def interleaved_times(runs: dict[str, Callable[[], Any]], repeats: int, pause_s: float = 0.05,
                      clock: Callable[[], float] = time.perf_counter,
                      sleep: Callable[[float], None] = time.sleep) -> dict[str, list[float]]:
    """Seconds of each of `runs` (callables that return once their work is done), `repeats` times each: one
    warm-up call of each, then rounds that time every run once, in turn. With deepmoe and transformers
    alternating like this a busy spell of a shared machine falls on both (seen on this 2-core VM: the same
    product at 141-215 GFLOP/s in processes a minute apart), so the ratio of a round's two times stays honest
    where two medians measured minutes apart need not.
    With more than one run, each turn is a pause, an untimed call, then the timed one, so that every run is
    timed as it runs back to back: the other runtime's worker threads (torch's OpenMP team, XLA's pool) spin a
    while after their work, and its data displaces ours from the caches (a `small` generate of 32 tokens took
    9 % longer right after transformers' than right after its own; transformers' did not mind)."""
    for run in runs.values():
        run()
    alternating = len(runs) > 1
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            if alternating:
                sleep(pause_s)
                run()
            start = clock()
            run()
            times[name].append(clock() - start)
    return times


def _best_time(fn: Callable[[], Any], repeats: int) -> float:
    """The fastest of `repeats` back-to-back calls of `fn` (a JAX computation) after one warm-up."""
    import jax

    return min(interleaved_times({"run": lambda: jax.block_until_ready(fn())}, repeats)["run"])


def _others(rival: Callable[[], Any] | None, peak: Callable[[], Any] | None) -> dict[str, Callable[[], Any]]:
    """The runs timed in alternation with ours: transformers' (rival) and the peak's matmul (peak)."""
    return {**({"transformers": rival} if rival else {}), **({"peak": peak} if peak else {})}


def _paired(result: dict[str, Any], times: dict[str, list[float]], work: float) -> dict[str, Any]:
    """`result` plus transformers' timing and our speedup over it, and each round's seconds of the peak's
    matmul, where they ran."""
    if "transformers" in times:
        result["transformers"] = versus(times["deepmoe"], times["transformers"], work)
    if "peak" in times:
        result["peak_seconds_each"] = times["peak"]
    return result


def paired_mfu(part: dict[str, Any], flops_per_token: float, peak_flops: float, work: float) -> dict[str, Any]:
    """MFU per round against the peak measured in the same round: model FLOPs of the round's tokens / its
    seconds / (`peak_flops`, the FLOPs of one peak matmul, / that round's matmul seconds). Their median, and
    each round's. On a shared machine the peak itself moves (seen: 219-303 GFLOP/s on one VM within an hour),
    so an MFU against a peak measured minutes apart moves with it."""
    each = [flops_per_token * work / seconds / (peak_flops / peak_s)
            for seconds, peak_s in zip(part["seconds_each"], part["peak_seconds_each"], strict=True)]
    return {"mfu_paired": statistics.median(each), "mfu_paired_each": each}


def timing(seconds: list[float], work: float) -> dict[str, Any]:
    """JSON of one timed part: median seconds, each repeat's, and `work` (tokens) per median second."""
    median = statistics.median(seconds)
    return {"seconds": median, "seconds_each": seconds, "tokens_per_s": work / median}


def versus(ours: list[float], theirs: list[float], work: float) -> dict[str, Any]:
    """The other side's `timing` of a part (transformers', or a baseline's) and our speedup over it: the median
    over rounds of their seconds / ours in the same round (`interleaved_times`), and each round's."""
    each = [t / o for o, t in zip(ours, theirs, strict=True)]
    return {**timing(theirs, work), "speedup": statistics.median(each), "speedup_each": each}


def versus_transformers(result: dict[str, Any]) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """{part: (our timing, transformers' timing and our speedup)} for the parts `run_bench` compared (forward,
    train, prefill, decode)."""
    generate = result.get("generate", {})
    ours = {"forward": result["forward"], "train": result.get("train"), "prefill": generate.get("prefill"),
            "decode": generate.get("decode")}
    theirs = {"forward": result["forward"].get("transformers"), "train": result.get("train", {}).get("transformers"),
              **generate.get("transformers", {})}
    return {part: (ours[part], other) for part, other in theirs.items() if other}


def peak_matmul_size(seconds_at: Callable[[int], float], size: int = 2048, min_seconds: float = 0.01,
                     max_size: int = 16384) -> int:
    """The side of the square product the peak is measured on: doubled from `size` until one product takes at
    least `min_seconds` (`seconds_at(n)`), at most `max_size`. A 2048 product keeps this 2-core CPU busy for
    ~60 ms, but an H200 finishes it in ~20 us, mostly launch and dispatch, and would report a fraction of its
    peak (inflating every MFU measured against it)."""
    while size < max_size and seconds_at(size) < min_seconds:
        size *= 2
    return size


def peak_matmul(dtype: str, size: int | None = None) -> tuple[Callable[[], Any], float]:
    """(run, FLOPs): a run of the square matmul in `dtype` that the peak is measured on (returns once done) and
    its FLOPs; size: the product's side (default `peak_matmul_size`)."""
    import jax
    import jax.numpy as jnp

    matmul = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))

    @functools.lru_cache(maxsize=1)  # the search's last size is the one measured: its operands are made once
    def operands(n):
        return (jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype)),
                jax.random.normal(jax.random.key(1), (n, n), jnp.dtype(dtype)))

    def seconds_at(n):
        a, b = operands(n)
        return _best_time(lambda: matmul(a, b), 1)

    size = size or peak_matmul_size(seconds_at)
    a, b = operands(size)
    return (lambda: jax.block_until_ready(matmul(a, b))), 2.0 * size ** 3


def measure_peak_flops(dtype: str, size: int | None = None, repeats: int = 5) -> float:
    """FLOP/s of a large square matmul in `dtype` (the machine's practical peak for that dtype), the best of
    `repeats` runs; size: the product's side (default `peak_matmul_size`)."""
    run, flops = peak_matmul(dtype, size)
    return flops / _best_time(run, repeats)


def measure_read_bandwidth(nbytes: float, repeats: int = 10) -> dict[str, float]:
    """{bytes, bytes_per_s} of summing a float32 array of `nbytes`, the best of `repeats` runs. Sized like the
    decode step's working set on purpose: how fast bytes arrive depends on which cache level holds them (this
    VM's L3 is 300 MB: ~53 GB/s at 100 MB, ~38 at 1 GiB). Clamped to [16 MiB, 1 GiB]: below, a call's time is
    mostly its dispatch; above, memory streams at its own rate and a larger array would only risk running out
    of it."""
    import jax
    import jax.numpy as jnp

    rows = min(max(int(nbytes), 16 * 2**20), 2**30) // (4 * 1024)
    x = jnp.ones((rows, 1024), jnp.float32)
    total = jax.jit(jnp.sum)
    return {"bytes": float(x.nbytes), "bytes_per_s": x.nbytes / _best_time(lambda: total(x), repeats)}


def peak_rss_bytes() -> int:
    """This process's peak resident memory. On Linux from /proc (VmHWM): getrusage's ru_maxrss survives exec,
    so a process started from a larger one (a notebook, a test worker) would report its parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def _memory(compiled) -> dict[str, int]:
    analysis = compiled.memory_analysis()
    if analysis is None:
        return {}
    return {k: int(getattr(analysis, k)) for k in ("temp_size_in_bytes", "argument_size_in_bytes",
                                                   "output_size_in_bytes") if hasattr(analysis, k)}


def bench_forward(cfg, params, ids, repeats: int, trace_dir: str | None = None,
                  rival: Callable[[], Any] | None = None, peak: Callable[[], Any] | None = None) -> dict[str, Any]:
    """rival: transformers' forward on the same ids, timed in alternation with ours (`result["transformers"]`);
    peak: the peak's matmul, timed in the same rounds (`result["peak_seconds_each"]`, for `paired_mfu`)."""
    import jax

    import deepmoe as dm
    from deepmoe.backend import xla_options
    from deepmoe.train.step import TrainConfig, training_layout

    # The layout the train step picks for this model (per-layer for a few repeating layers: no scan copying
    # weights out of their stacks, `small` ~7 % faster); `forward` runs either.
    params = training_layout(params, cfg, TrainConfig())
    fn = xla_options.jit(lambda p, x: dm.forward(p, cfg, x, mtp=False).logits)
    start = time.perf_counter()
    compiled = fn.lower(params, ids).compile()
    compile_s = time.perf_counter() - start
    runs = {"deepmoe": lambda: jax.block_until_ready(compiled(params, ids)), **_others(rival, peak)}
    times = interleaved_times(runs, repeats)
    result = _paired({"compile_s": compile_s, **timing(times["deepmoe"], ids.size), "memory": _memory(compiled),
                      "layout": "layers" if "layers" in params else "segments"}, times, ids.size)
    if trace_dir:
        result["profile"] = summary(profile_runs(lambda: compiled(params, ids), [(compiled.as_text(), None)],
                                                 trace_dir))
    return result


def bench_train(cfg, ids, repeats: int, trace_dir: str | None = None,
                rival: Callable[[], Any] | None = None, peak: Callable[[], Any] | None = None) -> dict[str, Any]:
    """rival: transformers' AdamW step on the same ids, timed in alternation with ours; peak: as bench_forward."""
    import jax

    from deepmoe import train
    from deepmoe.train.step import TrainStep

    # No MTP loss: transformers trains without it, and the FLOP count leaves the MTP block out too.
    tcfg = train.TrainConfig(optimizer="adamw", batch_size=ids.shape[0], seq_len=ids.shape[1], mtp_weight=0.0,
                             mtp_weight_after_decay=0.0)
    state = train.init_state(cfg, tcfg, jax.random.key(0))
    step = train.make_train_step(cfg, tcfg, donate=True)  # as the training loop runs it
    batch = {"input_ids": ids}
    start = time.perf_counter()
    # the gradient half compiled ahead, for its memory analysis (where a step's activations live); same program
    gradients = step.gradients.lower(state.params, state.step, batch).compile()
    step = TrainStep(gradients, step.update)
    state, _ = step(state, batch)
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - start

    def run():
        nonlocal state
        state, metrics = step(state, batch)
        return jax.block_until_ready(metrics)

    times = interleaved_times({"deepmoe": run, **_others(rival, peak)}, repeats)
    result = _paired({"compile_plus_first_step_s": compile_s, **timing(times["deepmoe"], ids.size),
                      "memory": _memory(gradients)}, times, ids.size)
    if trace_dir:  # the step's two programs (deepmoe.train.step.TrainStep); the update compiled again for its HLO
        grads, stats = step.gradients(state.params, state.step, batch)
        programs = [(gradients.as_text(), None),
                    (step.update.lower(state, grads, stats).compile().as_text(), "optimizer update")]
        del grads, stats
        result["profile"] = summary(profile_runs(run, programs, trace_dir))
    return result


def bench_generate(cfg, params, prompt, new_tokens: int, repeats: int, trace_dir: str | None = None,
                   rival: Callable[[int], Any] | None = None) -> dict[str, Any]:
    """Prefill: a generate of one token; decode: (a generate of `new_tokens` - the median prefill) /
    (new_tokens - 1), per round; both over a cache of prompt + new_tokens positions. rival(n): transformers'
    generate of n tokens after the same prompt, timed in alternation with ours."""
    import jax

    from deepmoe.infer.generate import generate
    from deepmoe.params import unstack_layers

    params = unstack_layers(params, cfg)  # once, as a server would; generate would copy at every call
    # One cache length for every run: the prefill a round subtracts from its generate is then the same program
    # (one compilation, the same cache to fill) as the generate's own.
    max_len = prompt.shape[1] + new_tokens

    def run(n):
        return jax.block_until_ready(generate(params, cfg, prompt, max_new_tokens=n, stop_tokens=(),
                                              max_len=max_len).tokens)

    # interleaved_times' warm-up call of each compiles prefill and decode
    runs = {"deepmoe prefill": lambda: run(1), "deepmoe generate": lambda: run(new_tokens)}
    if rival:
        runs.update({"transformers prefill": lambda: rival(1), "transformers generate": lambda: rival(new_tokens)})
    times = interleaved_times(runs, repeats)

    def decode(who):
        return decode_step_seconds(times[f"{who} prefill"], times[f"{who} generate"], new_tokens, who)

    result = {"prefill": timing(times["deepmoe prefill"], prompt.size),
              "decode": {**timing(decode("deepmoe"), prompt.shape[0]),
                         "generate_seconds_each": times["deepmoe generate"]},
              "bytes_per_step": decode_step_bytes(cfg, prompt.shape[0], max_len)}
    result["prefill_tokens_per_s"] = result["prefill"]["tokens_per_s"]
    result["decode_tokens_per_s"] = result["decode"]["tokens_per_s"]
    if rival:
        result["transformers"] = {
            "prefill": versus(times["deepmoe prefill"], times["transformers prefill"], prompt.size),
            "decode": {**versus(decode("deepmoe"), decode("transformers"), prompt.shape[0]),
                       "generate_seconds_each": times["transformers generate"]}}
    if trace_dir:
        result["profile"] = summary(profile_decode_step(cfg, params, prompt, max_len, trace_dir))
    return result


class UnresolvedDecode(ValueError):
    """A generate of `new_tokens` took no longer than the prefill: the decode steps are below the timing noise."""


def decode_step_seconds(prefills: list[float], generates: list[float], new_tokens: int,
                        who: str = "deepmoe") -> list[float]:
    """Per round: a decode step's seconds, (a generate of `new_tokens` - the median prefill) / (new_tokens - 1).
    Less the median prefill, not the round's own: one spike in a short prefill run (seen: 706 ms among ~80) would
    otherwise void the round's decode. UnresolvedDecode when a round's generate took no longer than that median
    (seen on `tiny` with 4 new tokens on a busy 2-core VM): any number would be noise, down to 1e9 tokens/s."""
    prefill = statistics.median(prefills)
    short = {i: full for i, full in enumerate(generates) if full <= prefill}
    if short:
        rounds = ", ".join(f"round {i}: {1e3 * full:.2f} ms" for i, full in short.items())
        raise UnresolvedDecode(f"{who}: a generate of {new_tokens} tokens took no longer than the median prefill "
                               f"({1e3 * prefill:.2f} ms; {rounds}), so its decode steps are below this machine's "
                               "timing noise: time more of them with --new-tokens")
    return [(full - prefill) / (new_tokens - 1) for full in generates]


def profile_decode_step(cfg, params, prompt, max_len: int, trace_dir: str) -> dict[str, Any]:
    """Trace the decode steps after `prompt` that fill a cache of `max_len` positions (its own jitted step, over
    the same per-layer weights and the same prefill program as generate's, which runs that step inside an
    on-device loop) and break their op time down by model component."""
    import jax
    import jax.numpy as jnp

    from deepmoe.infer.decode import decode_step_jit, main_params, prefill_jit

    params = main_params(params)  # as generate: the step's arguments without the MTP module
    lengths = jnp.full((prompt.shape[0],), prompt.shape[1], jnp.int32)
    steps = max_len - prompt.shape[1] - 1  # and one untimed step first
    if steps < 1:
        raise ValueError(f"max_len={max_len} leaves no decode step to trace after {prompt.shape[1]} prompt tokens")
    # moe_strategy passed as generate passes it: jit tells an omitted default from an explicit one
    state = {"cache": prefill_jit(params, cfg, prompt, lengths, max_len=max_len, moe_strategy="auto").cache}
    token = jnp.zeros((prompt.shape[0],), jnp.int32)
    text = decode_step_jit.lower(params, cfg, state["cache"], token).compile().as_text()

    def step():  # the cache is donated: keep the returned one
        logits, state["cache"] = decode_step_jit(params, cfg, state["cache"], token)
        return logits

    jax.block_until_ready(step())
    return profile_runs(step, [(text, None)], trace_dir, runs=steps)


def decode_step_bytes(cfg, batch: int, max_len: int) -> dict[str, float]:
    """What one decode step reads: the weights (`deepmoe.plan.decode_weight_bytes`) and the whole cache (its
    buffers have static shapes: a step reads every slot up to max_len and masks the empty ones)."""
    from deepmoe.infer.cache import cache_shapes, tree_bytes
    from deepmoe.plan import decode_weight_bytes

    weights = decode_weight_bytes(cfg, cfg.param_dtype, batch)
    cache = float(tree_bytes(cache_shapes(cfg, batch, max_len)))
    return {"weights": weights, "cache": cache, "total": weights + cache}


def memory_bandwidth_utilization(step_bytes: float, tokens_per_s: float, batch: int, bandwidth: float) -> float:
    """MBU: bytes a decode step must read x steps/s / the measured read bandwidth (decode's MFU)."""
    return step_bytes * tokens_per_s / batch / bandwidth


def transformers_runs(cfg, ids: np.ndarray) -> dict[str, Callable]:
    """transformers' `DeepseekV4ForCausalLM` on the same config (eager attention, float32, torch threads = this
    machine's cores) as runs for `interleaved_times`: "forward" (no grad), "train" (an AdamW step on the
    next-token loss) and "generate"(n) (greedy, n new tokens after the first min(64, T) ids, as ours). Each
    run puts the model in its own mode, as the parts alternate with deepmoe's, not with each other."""
    import torch
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    hf = {k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "model_type")}
    hf["num_nextn_predict_layers"] = 0
    hf_cfg = DeepseekV4Config(**hf)
    hf_cfg._attn_implementation = "eager"
    model = DeepseekV4ForCausalLM(hf_cfg).float()
    x = torch.as_tensor(np.array(ids), dtype=torch.long)
    prompt = x[:, : min(64, x.shape[1])]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def forward():
        model.eval()
        with torch.no_grad():
            return model(input_ids=x, use_cache=False)

    def train_step():
        model.train()
        optimizer.zero_grad()
        logits = model(input_ids=x, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()

    def generate(n):
        model.eval()
        with torch.no_grad():
            return model.generate(prompt, max_new_tokens=n, do_sample=False, min_new_tokens=n)

    return {"forward": forward, "train": train_step, "generate": generate}


def run_bench(cfg, *, batch: int, seq: int, repeats: int, new_tokens: int, compare: bool,
              skip: set[str], log: Callable[[str], None] = print, trace_dir: str | None = None) -> dict[str, Any]:
    """trace_dir: profile the forward, the train step and the decode step there (`result[part]["profile"]`,
    deepmoe.profile)."""
    import jax

    import deepmoe as dm
    from deepmoe.plan import PlanOptions, flops_per_token

    result: dict[str, Any] = {"config": json.loads(cfg.to_json()), "batch": batch, "seq": seq,
                              "backend": jax.default_backend(), "devices": len(jax.devices()),
                              "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
                              # None: every compile time is a compile, not a load from JAX's cache
                              "compilation_cache": jax.config.jax_compilation_cache_dir,
                              "xla_flags": os.environ.get("XLA_FLAGS", "")}
    log("measuring peak matmul FLOP/s ...")
    first_peak = {d: measure_peak_flops(d) for d in ("float32", "bfloat16")}
    flops = flops_per_token(cfg.replace(num_mtp_layers=0), PlanOptions(mode="train", seq_len=seq, remat="none"))
    result["model_flops_per_token"] = {"forward": flops["forward"], "train": flops["model"]}
    params = dm.init_params(cfg, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (batch, seq), 0, cfg.vocab_size)

    rivals: dict[str, Callable] = {}
    if compare:
        log("building transformers' model (timed in alternation with deepmoe's programs) ...")
        rivals = transformers_runs(cfg, np.asarray(ids))
    peak_run, peak_matmul_flops = peak_matmul(cfg.compute_dtype)  # also timed in every round: paired MFU
    log("forward ...")
    result["forward"] = bench_forward(cfg, params, ids, repeats, trace_dir and os.path.join(trace_dir, "forward"),
                                      rival=rivals.get("forward"), peak=peak_run)
    if "train" not in skip:
        log("train step ...")
        result["train"] = bench_train(cfg, ids, repeats, trace_dir and os.path.join(trace_dir, "train"),
                                      rival=rivals.get("train"), peak=peak_run)
    if "decode" not in skip:
        log("prefill + decode ...")
        try:
            result["generate"] = bench_generate(cfg.replace(num_mtp_layers=0), params, ids[:, : min(64, seq)],
                                                new_tokens, repeats, trace_dir and os.path.join(trace_dir, "decode"),
                                                rival=rivals.get("generate"))
        except UnresolvedDecode as e:  # the other parts stand; the JSON and the summary say why this one is absent
            result["generate_error"] = str(e)
    if compare:  # the summary the README quotes: transformers' tokens/s and our paired speedups
        compared = versus_transformers(result)
        result["transformers"] = {f"{part}_tokens_per_s": v["tokens_per_s"] for part, (_, v) in compared.items()}
        result["speedup_vs_transformers"] = {f"{part}_tokens_per_s": v["speedup"] for part, (_, v) in compared.items()}
    if "generate" in result:
        log("measuring read bandwidth ...")
        gen = result["generate"]
        step_bytes = gen["bytes_per_step"]["total"]
        result["read_bandwidth"] = measure_read_bandwidth(step_bytes)
        bandwidth = result["read_bandwidth"]["bytes_per_s"]
        gen["mbu"] = memory_bandwidth_utilization(step_bytes, gen["decode_tokens_per_s"], batch, bandwidth)
        if compare and "decode_tokens_per_s" in result["transformers"]:
            result["transformers"]["decode_mbu"] = memory_bandwidth_utilization(
                step_bytes, result["transformers"]["decode_tokens_per_s"], batch, bandwidth)
    # The peak again at the end, keeping the better: on shared cores one measurement can land in a busy spell
    # (seen: 99 instead of ~200 GFLOP/s), which would inflate every MFU below.
    log("measuring peak matmul FLOP/s again ...")
    result["peak_flops"] = {d: max(first, measure_peak_flops(d)) for d, first in first_peak.items()}
    result["peak_flops_first_measurement"] = first_peak
    peak = result["peak_flops"][cfg.compute_dtype]
    result["peak_matmul_flops"] = peak_matmul_flops
    for part, part_flops in (("forward", flops["forward"]), ("train", flops["model"])):
        if part in result:
            result[part]["mfu"] = part_flops * result[part]["tokens_per_s"] / peak
            result[part].update(paired_mfu(result[part], part_flops, peak_matmul_flops, ids.size))
            if "profile" in result[part]:
                matmul_rates(result[part]["profile"]["matmul"], peak, part_flops * ids.size)
    if "profile" in result.get("generate", {}):
        matmul_rates(result["generate"]["profile"]["matmul"], peak)
    result["peak_rss_bytes"] = peak_rss_bytes()
    stats = jax.devices()[0].memory_stats()  # None on CPU
    if stats:
        result["device_memory"] = {k: int(stats[k]) for k in ("peak_bytes_in_use", "bytes_limit") if k in stats}
    return result


def matmul_rates(matmul: dict[str, Any], peak: float, model_flops_per_run: float | None = None) -> None:
    """Adds to a profile's matmul totals (deepmoe.profile) their rate as a share of the measured peak and, where
    the model's FLOPs per run are known, how many matmul FLOPs the program executes per model FLOP (padding,
    masked blocks and recomputation make it more than 1)."""
    if matmul["flops_per_s"]:
        matmul["peak_share"] = matmul["flops_per_s"] / peak
    if model_flops_per_run:
        matmul["per_model_flop"] = matmul["flops_per_run"] / model_flops_per_run


def _spread(part: dict[str, Any]) -> str:
    """How far a part's repeats spread, as a share of their median: large on a busy machine."""
    each = part["seconds_each"]
    return f"{len(each)} runs within {100 * (max(each) - min(each)) / part['seconds']:.0f}%"


def _paired_mfu_text(part: dict[str, Any]) -> str:
    each = part["mfu_paired_each"]
    return (f"(against the peak matmul timed in the same round: {100 * part['mfu_paired']:.1f}%, rounds "
            f"{100 * min(each):.1f}-{100 * max(each):.1f}%)")


def format_result(r: dict[str, Any]) -> str:
    lines = [f"backend {r['backend']} ({r['cpu_count']} cores), batch {r['batch']} x seq {r['seq']}",
             f"peak matmul: fp32 {r['peak_flops']['float32'] / 1e9:.1f} GFLOP/s, "
             f"bf16 {r['peak_flops']['bfloat16'] / 1e9:.1f} GFLOP/s"]
    f = r["forward"]
    lines.append(f"forward: {f['tokens_per_s']:.0f} tok/s ({_spread(f)}), MFU {100 * f['mfu']:.1f}% "
                 f"{_paired_mfu_text(f)}, "
                 f"compile {f['compile_s']:.1f}s, temp memory {f['memory'].get('temp_size_in_bytes', 0) / 2**20:.1f} "
                 f"MiB, params as {f['layout']}")
    if "train" in r:
        t = r["train"]
        lines.append(f"train step: {t['tokens_per_s']:.0f} tok/s ({_spread(t)}), MFU {100 * t['mfu']:.1f}% "
                     f"{_paired_mfu_text(t)}, gradient program's temp memory "
                     f"{t.get('memory', {}).get('temp_size_in_bytes', 0) / 2**20:.1f} MiB")
    if "generate" in r:
        g = r["generate"]
        lines.append(f"prefill {g['prefill_tokens_per_s']:.0f} tok/s ({_spread(g['prefill'])}), "
                     f"decode {g['decode_tokens_per_s']:.1f} tok/s ({_spread(g['decode'])})")
        if "mbu" in g:
            b, bw = g["bytes_per_step"], r["read_bandwidth"]["bytes_per_s"]
            hf_mbu = r.get("transformers", {}).get("decode_mbu")
            lines.append(f"decode step reads {b['weights'] / 1e6:.1f} MB of weights + {b['cache'] / 1e6:.1f} MB of "
                         f"cache: MBU {100 * g['mbu']:.1f}% of {bw / 1e9:.1f} GB/s measured"
                         + (f" (transformers {100 * hf_mbu:.1f}%)" if hf_mbu is not None else ""))
    if "generate_error" in r:
        lines.append(f"prefill + decode: not reported: {r['generate_error']}")
    for part, (_, theirs) in versus_transformers(r).items():
        each = theirs["speedup_each"]
        lines.append(f"vs transformers, {part}: {theirs['speedup']:.2f}x (median of {len(each)} paired rounds: "
                     f"{min(each):.2f}-{max(each):.2f}x)")
    lines.append(f"peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB")
    if "peak_bytes_in_use" in r.get("device_memory", {}):
        lines.append(f"device memory: peak {r['device_memory']['peak_bytes_in_use'] / 2**30:.2f} GiB in use")
    for part, title in PROFILED:
        if "profile" in r.get(part, {}):
            lines.append(format_profile(f"profile, {title}", r[part]["profile"]))
    if "host_buffers" in r:
        lines.append(f"host buffers kept between runs (deepmoe.backend.host_memory): {r['host_buffers']}")
    if r.get("compilation_cache"):
        lines.append(f"note: JAX's compilation cache is on ({r['compilation_cache']}), so the compile times may be "
                     "loads from it")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from deepmoe.config import PRESETS

    parser = argparse.ArgumentParser(prog="deepmoe bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", default="small", choices=sorted(PRESETS))
    source.add_argument("--hf-config", metavar="FILE", help="an HF DeepseekV4 config.json instead of a preset")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated in the decode benchmark")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: train,decode")
    parser.add_argument("--compare-transformers", action="store_true")
    parser.add_argument("--json", metavar="FILE", help="where to write the results (default runs/bench/NAME.json)")
    parser.add_argument("--profile", action="store_true",
                        help="also trace the forward, the train step and a decode step and break their time "
                             "down by model component (printed, in the JSON, NAME-profile.png, trace in "
                             "NAME-trace/)")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    if skip - {"train", "decode"}:
        parser.error(f"--skip takes train and/or decode, not {','.join(sorted(skip - {'train', 'decode'}))}")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if "decode" not in skip and args.new_tokens < 2:
        parser.error(f"--new-tokens must be at least 2 (decode time = a generate of N tokens less the prefill, "
                     f"over N - 1 steps), got {args.new_tokens}; or --skip decode")
    if args.profile:
        keep_ops_in_trace()  # before JAX starts a backend: on a GPU, per-op events need command buffers off
    host_buffers = keep_host_buffers()  # before any JAX op (the deepmoe command has already applied it)

    import deepmoe as dm

    cfg = dm.ModelConfig.from_hf(args.hf_config) if args.hf_config else dm.preset(args.preset)
    cfg = cfg.replace(compute_dtype=args.dtype)
    name = Path(args.hf_config).stem if args.hf_config else args.preset
    out = Path(args.json or f"runs/bench/{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    trace_dir = str(out.with_name(out.stem + "-trace")) if args.profile else None
    result = run_bench(cfg, batch=args.batch, seq=args.seq, repeats=args.repeats, new_tokens=args.new_tokens,
                       compare=args.compare_transformers, skip=skip,
                       trace_dir=trace_dir)
    result["host_buffers"] = host_buffers
    result["name"] = name
    print(format_result(result))
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    profiles = {title: result[part]["profile"] for part, title in PROFILED if "profile" in result.get(part, {})}
    if profiles:
        png = plot_profiles(profiles, str(out.with_name(out.stem + "-profile.png")))
        print(f"wrote {png} and the traces under {trace_dir} (TensorBoard's profile plugin or ui.perfetto.dev)")
    if args.compare_transformers:
        title = (f"deepmoe vs transformers: {name}, batch {args.batch} x seq {args.seq}, {args.dtype}, "
                 f"{result['cpu_count']} cores, {result['date']}")
        png = plot_comparison(versus_transformers(result), title, str(out.with_name(out.stem + "-vs-transformers.png")))
        print(f"wrote {png}")
    return 0
