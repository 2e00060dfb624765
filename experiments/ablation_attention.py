"""Attention ablation: V4's hybrid (CSA / HCA + sliding window) vs sliding-window only vs dense causal attention.

    python experiments/ablation_attention.py [--quick] [--out runs/ablation_attention] [--steps N] [--seq T]

Variants (`deepmoe.ablations.attention_variants`), same widths, same MoE, same optimizer:
  hybrid   the model's own schedule: SWA / CSA (top-k of 1-in-4 compressed entries) / HCA (all 1-in-16 entries),
           every layer also attends to its sliding window
  sliding  every layer sliding-window only (window W)
  dense    every layer sliding with W >= seq_len, i.e. dense causal attention

1. Loss at equal steps: each variant trains from the same seed on the same batches of the default corpus with
   deepmoe.train's step function (`build_step_fn`; Muon + AdamW, clipping, aux-loss-free bias). final_loss =
   mean train CE over the last 20 % of steps (batches are never repeated).
2. Cost vs sequence length, per attention layer type and summed over each variant's layer schedule:
   compiled FLOPs and bytes accessed (XLA `cost_analysis`), temporary memory (`memory_analysis`) and the best
   wall time of 3 runs of one layer's jitted forward (batch 1); and the algorithmic FLOPs of the attention core
   (sum_t 4 H c k_t, k_t = visible window keys + selected / all compressed entries) + the CSA indexer
   (sum_t 2 H_I (c_I+1) N_t) from `deepmoe.analysis.sequence_attention_flops`. The compiled count also holds
   the projections and the compressor, and the jnp reference layers score every compressed entry densely
   against a mask (O(T^2 / ratio) for CSA: all entries, not just the top-k) and compute the window block-wise
   over 2W keys; the algorithmic count is what sparse kernels (pallas_kernels) can realise.

--quick (tests): 2 layers (CSA, HCA), 3 Sinkhorn iterations, AdamW, 12 steps of 4 x 64 tokens; training and
the cost sweep (T = 64, 256: a 4x step, enough to tell linear from quadratic growth; every point is a compilation
per layer kind) compiled with most XLA optimizations off (`experiment.fast_compile`: identical FLOP and memory
counts, but quick wall times are those of unoptimized code). Writes results.json, loss.png, cost.png.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from deepmoe import experiment as ex

NAME = "ablation_attention"
VARIANTS = ("hybrid", "sliding", "dense")
QUICK = dict(steps=12, batch=4, seq=64, optimizer="adamw", cost_seq=[64, 256])
FULL = dict(steps=200, batch=8, seq=256, optimizer="muon", cost_seq=[128, 256, 512, 1024, 2048])
COLORS = {"hybrid": "C0", "sliding": "C1", "dense": "C3"}


def parse_args(argv: Sequence[str] | None):
    p = ex.parser(__doc__, NAME, variants=VARIANTS, replot=True)
    ex.add_train_args(p, QUICK, FULL)
    p.add_argument("--cost-seq", type=int, nargs="+", help="sequence lengths of the cost sweep "
                   "(default 128 256 512 1024 2048; quick 64 256)")
    return ex.parse(p, argv, QUICK, FULL)


def train_variant(cfg, tcfg, dataset) -> tuple[dict, dict]:
    from deepmoe.ablations import train_options

    state, rows, seconds = train_options(cfg, tcfg, dataset)
    loss = np.array([float(r["loss"]) for r in rows])
    return {"loss": loss, "final_loss": float(np.mean(ex.tail(loss))), "seconds": seconds,
            "layer_types": list(cfg.layer_types), "sliding_window": cfg.sliding_window}, state.params


def cost_sweep(variants: dict, params: dict, seq_lens: list[int], seed: int) -> dict:
    """Per layer type (sliding / csa / hca / dense at each T) and per variant (sum over its schedule)."""
    from deepmoe.ablations import attention_cost, layer_params
    from deepmoe.analysis import sequence_attention_flops
    from deepmoe.config import CSA, HCA, SLIDING

    short = {SLIDING: "sliding", CSA: "csa", HCA: "hca"}
    sources = {}  # layer kind -> (cfg, attention params) taken from a trained variant that has that layer
    for name, cfg in variants.items():
        if name not in params:
            continue
        for i, t in enumerate(cfg.layer_types):
            kind = "dense" if name == "dense" else short[t]
            sources.setdefault(kind, (cfg, layer_params(params[name], cfg, i)["attn"], t))
    hybrid = variants["hybrid"]
    if "sliding" not in sources:  # sliding layers also exist without training the sliding variant
        cfg = variants["sliding"]
        import jax

        from deepmoe.params import init_params

        sources["sliding"] = (cfg, layer_params(init_params(cfg, jax.random.key(seed)), cfg, 0)["attn"], SLIDING)
    per_type: dict[str, dict[str, list]] = {}
    keys = ("flops", "bytes_accessed", "temp_bytes", "seconds", "analytic_flops")
    for kind, (cfg, attn, layer_type) in sources.items():
        rows = {k: [] for k in keys}
        for T in seq_lens:
            c = cfg.replace(sliding_window=max(T, hybrid.sliding_window)) if kind == "dense" else cfg
            measured = attention_cost(attn, c, layer_type, T, seed=seed)
            for k in keys[:4]:
                rows[k].append(measured[k])
            rows["analytic_flops"].append(sequence_attention_flops(c, layer_type, T)["total"])
            print(f"  cost {kind:>7} T={T:>5}: {measured['flops'] / 1e6:9.1f} MFLOP compiled, "
                  f"{rows['analytic_flops'][-1] / 1e6:9.1f} MFLOP algorithmic, {measured['seconds'] * 1e3:7.2f} ms, "
                  f"temp {measured['temp_bytes'] / 1e6:.2f} MB", flush=True)
        per_type[kind] = rows
    per_variant = {}
    for name, cfg in variants.items():
        kinds = ["dense" if name == "dense" else short[t] for t in cfg.layer_types]
        if any(k not in per_type for k in kinds):
            continue
        per_variant[name] = {k: list(np.sum([per_type[kind][k] for kind in kinds], axis=0)) for k in keys}
        per_variant[name]["layers"] = kinds
    return {"seq_lens": list(seq_lens), "per_layer_type": per_type, "per_variant": per_variant}


def plot(training: dict, cost: dict, out: Path) -> list[Path]:
    import matplotlib.ticker

    paths = [out / "loss.png", out / "cost.png"]
    with ex.figure(paths[0], figsize=(6, 4)) as (fig, ax):
        ex.loss_curves(ax, training, COLORS, "Attention ablation: loss at equal steps")
    T = np.array(cost["seq_lens"])
    with ex.figure(paths[1], 3, figsize=(16, 4.2)) as (fig, axes):
        for name, r in cost["per_variant"].items():
            c = COLORS[name]
            axes[0].plot(T, r["flops"], "o-", color=c, label=f"{name} compiled (jnp reference)")
            axes[0].plot(T, r["analytic_flops"], "--", color=c,
                         label=f"{name} algorithmic (attention core + indexer)")
            axes[1].plot(T, r["temp_bytes"], "o-", color=c, label=name)
            axes[2].plot(T, np.array(r["seconds"]) * 1e3, "o-", color=c, label=name)
        axes[0].set(title="FLOPs of the attention layers vs sequence length", ylabel="FLOPs (one sequence)")
        axes[1].set(title="XLA temporary memory", ylabel="bytes")
        axes[2].set(title="wall time (jitted, best of 3, this CPU)", ylabel="ms")
        for ax in axes:
            ax.set(xscale="log", yscale="log", xlabel="sequence length T")
            ax.set_xticks(T, [str(t) for t in T])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.legend(fontsize=7)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from deepmoe.ablations import ablation_model, attention_variants, train_config

    out = ex.output_dir(args)
    if args.replot:
        return ex.replot(out, plot, "training", "cost")
    tcfg = train_config(**ex.train_settings(args))
    variants = attention_variants(ablation_model(args.quick), args.seq)
    dataset = ex.text_data(args)
    trained = ex.run_variants(args.variants, lambda name: train_variant(variants[name], tcfg, dataset),
                              lambda r: f"final loss {r[0]['final_loss']:.4f}", quick=args.quick)
    training = {name: r for name, (r, _) in trained.items()}
    with ex.fast_compile(args.quick):  # same FLOP and memory counts; quick wall times are of unoptimized code
        cost = cost_sweep(variants, {name: p for name, (_, p) in trained.items()}, args.cost_seq, args.seed)
    plots = plot(training, cost, out)
    T = cost["seq_lens"][-1]
    summary = {name: {"final_loss": training[name]["final_loss"],
                      **({f"compiled_flops_T{T}": cost["per_variant"][name]["flops"][-1],
                          f"algorithmic_flops_T{T}": cost["per_variant"][name]["analytic_flops"][-1],
                          f"seconds_T{T}": cost["per_variant"][name]["seconds"][-1]}
                         if name in cost["per_variant"] else {})}
               for name in training}
    model = {name: {"layer_types": list(cfg.layer_types), "sliding_window": cfg.sliding_window,
                    "csa_compress_ratio": cfg.csa_compress_ratio, "hca_compress_ratio": cfg.hca_compress_ratio,
                    "indexer_topk": cfg.indexer_topk, "sinkhorn_iterations": cfg.sinkhorn_iterations}
             for name, cfg in variants.items()}
    ex.write_results(out, NAME, args.quick, plots,
                     settings={**ex.train_settings(args), "cost_seq_lens": args.cost_seq, "model": model},
                     summary=summary, training=training, cost=cost)
    return 0


if __name__ == "__main__":
    sys.exit(main())
