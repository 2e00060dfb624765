"""Train-step MFU of the ~1B `medium` preset on one accelerator, against its measured bf16 peak (the GPU target of
the performance issue: >= 35 %), without and with the Pallas kernels.

The variants are `ModelConfig.kernels`. `reference`: XLA's attention, and the routed experts as the `blocked`
strategy's dense batched matmuls. `pallas`: the Pallas attention kernels, and the experts through the Pallas
grouped matmul (`sorted` on `pallas_kernels.gmm`). Neither uses `lax.ragged_dot`, which XLA:GPU expands into a
product over all 32 experts (moe_dispatch.local_strategy). On a GPU the profile's matmul totals count XLA's dots,
cuBLAS calls and the grouped matmul kernels; the Pallas attention kernels' products are in "every other op".

    python experiments/train_mfu.py                      # medium, bf16, batch 4 x seq 4096, both kernel choices
    python experiments/train_mfu.py --variants reference --batch 2
    python experiments/train_mfu.py --quick              # tiny, seq 64, XLA attention only: the CPU test run
    python experiments/train_mfu.py --variants reference --profile   # and where the step's time goes

Each variant is one `deepmoe bench` run (deepmoe.bench.run_bench, decode skipped unless --decode): the bf16 peak
of a square `jnp.dot` large enough to keep the device busy (bench.peak_matmul_size), then the forward and an
AdamW train step (fp32 master weights, bf16 compute, no MTP loss), MFU = model FLOPs per token
(deepmoe.plan.flops_per_token, 3x the forward) x tokens/s / peak. Beside it: compile times, XLA's
memory_analysis, the device's peak bytes in use, and what `deepmoe plan` predicts for the same run. A variant
that runs out of device memory is retried at half the batch; one that fails otherwise is recorded with its
error (exit status 1) and the next one still runs.

--profile (on in --quick) also traces the forward and the train step (deepmoe.profile, as `deepmoe bench
--profile`): op time per model component, and the matmuls' FLOPs, op time and rate against the peak, which
tells slow matmuls from time spent outside them. Traces go to OUT/trace-VARIANT/. On a GPU it turns XLA's command
buffers off for the whole run (they hide the ops from the trace), so a profiled run's MFU is that of this setting:
run without --profile for the default's. Should profiling fail, the variant is measured again without it, so the
MFU is not lost.

Meant for a GPU machine: there, `medium` at batch 4 x 4096 is planned at ~66 GB (fits an H100 or H200). Results
are written after every variant, so a run cut short keeps what finished. Writes results.json and train_mfu.png
(MFU per variant against the 35 % line, and tokens/s) under --out.
"""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path
from typing import Sequence

from deepmoe import experiment as ex
from deepmoe.bench import PROFILED
from deepmoe.config import PRESETS
from deepmoe.profile import format_profile, keep_ops_in_trace

NAME = "train_mfu"
VARIANTS = ("reference", "pallas")  # ModelConfig.kernels
TARGET = 0.35
QUICK = dict(preset="tiny", batch=2, seq=64, variants=["reference"], repeats=1, profile=True)
FULL = dict(preset="medium", batch=4, seq=4096, variants=list(VARIANTS), repeats=5, profile=False)


def parse_args(argv: Sequence[str] | None):
    p = ex.parser(__doc__, NAME, quick_help="tiny, seq 64, XLA attention only (for tests)")
    p.add_argument("--preset", choices=list(PRESETS), help="model preset (default medium; quick tiny)")
    p.add_argument("--batch", type=int, help="sequences per step (default 4; quick 2)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default 4096; quick 64)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, help="attention kernels to run (default both)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="compute dtype")
    p.add_argument("--repeats", type=int, help="timed steps per measurement (default 5; quick 1)")
    p.add_argument("--decode", action="store_true", help="also time prefill and decode")
    p.add_argument("--profile", action="store_true", default=None,
                   help="also trace the forward and the train step: time per component, matmul rate (quick: on)")
    return ex.parse(p, argv, QUICK, FULL)


def planned(cfg, args, batch: int) -> dict:
    """What `deepmoe plan` predicts for this run on one device: memory (bytes) and FLOPs per token."""
    from deepmoe.plan import PlanOptions, plan

    opts = PlanOptions(mode="train", global_batch=batch, seq_len=args.seq, compute_dtype=args.dtype,
                       optimizer="adamw", remat="none")
    result = plan(cfg, "data=1", opts=opts)
    return {"memory": result["memory"], "flops_per_token": result["flops_per_token"]}


def out_of_memory(err: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(err) or "out of memory" in str(err).lower()


def _error(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).strip()[:2000]}"


def run_variant(cfg, kernels: str, args, bench=None, trace_dir: str | None = None) -> dict:
    """One bench run with these attention kernels (profiled into trace_dir when given). Out of device memory, it
    tries again at half the batch (down to 1): one call of a rationed accelerator still measures something. A
    profiled run that fails otherwise is run again unprofiled (the error kept as `profile_error`); any other
    failure is recorded as {"error": ...}, so the other variant still runs."""
    from deepmoe.bench import run_bench
    from deepmoe.moe_dispatch import local_strategy

    bench = bench or run_bench
    cfg = cfg.replace(kernels=kernels)
    batch, failed_profile = args.batch, None
    while True:
        try:
            r = bench(cfg, batch=batch, seq=args.seq, repeats=args.repeats,
                      new_tokens=16, compare=False, skip=set() if args.decode else {"decode"},
                      log=lambda msg: print(f"  [{kernels}] {msg}", flush=True), trace_dir=trace_dir)
        except Exception as err:  # noqa: BLE001 - recorded in results.json, the run goes on
            if out_of_memory(err) and batch > 1:
                print(f"  [{kernels}] batch {batch} ran out of device memory; trying {batch // 2}", flush=True)
                batch //= 2
                continue
            if trace_dir:
                print(f"  [{kernels}] the profiled run failed ({_error(err)[:200]}); measuring without profiling",
                      flush=True)
                trace_dir, failed_profile = None, _error(err)
                continue
            return {"batch": batch, "error": _error(err)}
        keep = ("peak_flops", "model_flops_per_token", "forward", "train", "generate", "device_memory",
                "peak_rss_bytes", "backend", "devices")
        # what the routed experts ran as (deepmoe.moe_dispatch.local_strategy); on GPU sorted = the Pallas gmm kernel
        return {"batch": batch, "moe_strategy": local_strategy(cfg), "plan": planned(cfg, args, batch),
                **{k: r[k] for k in keep if k in r}, **({"profile_error": failed_profile} if failed_profile else {})}


def _paired(part: dict) -> str:
    """The MFU against the peak's matmul timed in the same rounds (`deepmoe.bench.paired_mfu`), where measured."""
    return f", {100 * part['mfu_paired']:.1f} % paired" if "mfu_paired" in part else ""


def describe(r: dict, dtype: str) -> str:
    if "error" in r:
        return f"failed at batch {r['batch']}: {r['error'].splitlines()[0][:200]}"
    t, f = r["train"], r["forward"]
    text = (f"batch {r['batch']}, MoE {r.get('moe_strategy', '?')}: train {t['tokens_per_s']:,.0f} tok/s, MFU "
            f"{100 * t['mfu']:.1f} %{_paired(t)} (target {100 * TARGET:.0f} %); "
            f"forward {f['tokens_per_s']:,.0f} tok/s, MFU {100 * f['mfu']:.1f} %{_paired(f)}; "
            f"peak {r['peak_flops'][dtype] / 1e12:.1f} TFLOP/s {dtype}")
    temp, planned = t.get("memory", {}).get("temp_size_in_bytes"), r.get("plan", {}).get("memory", {})
    if temp is not None and "activations" in planned:  # XLA's temporaries against the plan's activations
        text += (f"; gradient program temp {temp / 2**30:.2f} GiB "
                 f"(plan: activations {planned['activations'] / 2**30:.2f})")
    profiles = [(title, r[part]["profile"]) for part, title in PROFILED if "profile" in r.get(part, {})]
    return "\n".join([text] + [textwrap.indent(format_profile(f"profile, {title}", p), "  ") for title, p in profiles])


def plot(results: dict, out: Path, title: str, dtype: str) -> list[Path]:
    import numpy as np

    names = [n for n, r in results.items() if "error" not in r]
    x = np.arange(len(names))
    path = out / f"{NAME}.png"
    with ex.figure(path, 2, figsize=(11, 4.2)) as (fig, axes):
        for offset, part in ((-0.2, "train"), (0.2, "forward")):
            bars = axes[0].bar(x + offset, [100 * results[n][part]["mfu"] for n in names], 0.4, label=part)
            axes[0].bar_label(bars, fmt="%.1f", fontsize=8)
            bars = axes[1].bar(x + offset, [results[n][part]["tokens_per_s"] for n in names], 0.4, label=part)
            axes[1].bar_label(bars, fmt="%.0f", fontsize=8)
        axes[0].axhline(100 * TARGET, color="k", ls="--", lw=1, label=f"target {100 * TARGET:.0f} % (train)")
        axes[0].set(title=f"MFU of the measured {dtype} peak", ylabel="%")
        axes[1].set(title="tokens/s", ylabel="tokens/s")
        for ax in axes:
            ax.set_xticks(x, [f"{n}\nbatch {results[n]['batch']}" for n in names])
            ax.set_xlabel("attention kernels")
            ax.legend(fontsize=8)
        fig.suptitle(title)
    return [path]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.profile:
        keep_ops_in_trace()  # before JAX starts a backend
    import jax

    import deepmoe as dm

    if jax.default_backend() == "cpu" and args.preset == "medium":
        print("train_mfu: `medium` is the accelerator benchmark (a train step of 16k tokens would take minutes on "
              "a CPU); use --quick, or another --preset with --batch / --seq to run it here", file=sys.stderr)
        return 2
    out = ex.output_dir(args)
    cfg = dm.preset(args.preset).replace(compute_dtype=args.dtype)
    settings = {"preset": args.preset, "batch": args.batch, "seq": args.seq, "dtype": args.dtype,
                "repeats": args.repeats, "target_train_mfu": TARGET, "profile": args.profile,
                "xla_flags": os.environ.get("XLA_FLAGS", "")}
    device = jax.devices()[0].device_kind
    planned_bytes = planned(cfg, args, args.batch)["memory"]["total"]
    print(f"{args.preset} on {device} ({jax.default_backend()}): batch {args.batch} x seq {args.seq}, planned "
          f"{planned_bytes / 2**20:,.0f} MiB on the device", flush=True)
    results: dict = {}
    for kernels in args.variants:  # one at a time, results written after each (a run cut short keeps them)
        trace_dir = str(out / f"trace-{kernels}") if args.profile else None
        results.update(ex.run_variants([kernels], lambda k: run_variant(cfg, k, args, trace_dir=trace_dir),
                                       lambda r: describe(r, args.dtype), quick=args.quick))
        plots = plot(results, out, f"{args.preset}, seq {args.seq}, {args.dtype}, {device}", args.dtype)
        ex.write_results(out, NAME, args.quick, plots, settings=settings, variants=results)
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
