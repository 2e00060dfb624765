"""Load-balancing ablation: aux-loss-free router bias vs auxiliary balance loss vs none (vs V4's recipe: both).

    python experiments/ablation_balancing.py [--quick] [--out runs/ablation_balancing] [--steps N]
                                             [--bias-speed 1e-3] [--aux-weight 1e-2]

Every variant runs deepmoe.train's step function (`train.step.build_step_fn` through
`ablations.make_options_step`, one compilation for all variants) with the two balancing options of
TrainConfig set per variant:

  variant     bias_update_speed (gamma)   balance_weight (alpha)
  aux_free    --bias-speed                0          bias_i -= gamma * sign(load_i - mean load) after every step
  aux_loss    0                           --aux-weight   alpha * sum_i f_i P_i (sequence-wise, V3 form)
  none        0                           0
  v4          --bias-speed                1e-4       the report's recipe (bias + a tiny sequence-wise loss)

Same initialisation and batches for all (default corpus). Per step and per score-routed layer (hash layers are a
fixed table and are left out) the expert load of the step's batch (tokens routed to each expert, top-k counted k
times) gives the imbalance statistics
  max/mean = max_i load_i / mean_i load_i   (1 = perfectly balanced, E/k = everything on k experts)
  CV       = std_i load_i / mean_i load_i
reported per step (results.json: `max_over_mean` [steps, layers], `cv`), averaged over the score layers and the
last 20 % of steps (`final_*`), with the loss, the measured sequence-wise balance loss (logged for every
variant, whatever its weight) and the mean |router bias|. Plots: balancing.png.

--quick (tests): 2 layers (CSA, HCA; both score-routed), 3 Sinkhorn iterations, AdamW, 12 steps of 4 x 64
tokens, compiled with most XLA optimizations off; it shares its compilation with ablation_attention --quick.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from deepmoe import experiment as ex

NAME = "ablation_balancing"
VARIANTS = ("aux_free", "aux_loss", "none", "v4")
QUICK = dict(steps=12, batch=4, seq=64, optimizer="adamw")
FULL = dict(steps=200, batch=8, seq=256, optimizer="muon")
COLORS = {"aux_free": "C0", "aux_loss": "C1", "none": "C3", "v4": "C2"}


def parse_args(argv: Sequence[str] | None):
    p = ex.parser(__doc__, NAME, variants=VARIANTS, replot=True)
    ex.add_train_args(p, QUICK, FULL)
    p.add_argument("--bias-speed", type=float, default=1e-3, help="gamma of the aux-loss-free rule (V4: 1e-3)")
    p.add_argument("--aux-weight", type=float, default=1e-2, help="alpha of the aux_loss variant")
    p.add_argument("--v4-aux-weight", type=float, default=1e-4, help="alpha of the v4 variant (report: 1e-4)")
    return ex.parse(p, argv, QUICK, FULL)


def options(args) -> dict[str, tuple[float, float]]:
    """variant -> (bias_update_speed, balance_weight)."""
    return {"aux_free": (args.bias_speed, 0.0), "aux_loss": (0.0, args.aux_weight), "none": (0.0, 0.0),
            "v4": (args.bias_speed, args.v4_aux_weight)}


def run_variant(cfg, tcfg, dataset, speed: float, weight: float) -> dict:
    from deepmoe.ablations import train_options
    from deepmoe.analysis import load_imbalance
    from deepmoe.train.step import score_layer_indices

    score = score_layer_indices(cfg)
    _, rows, seconds = train_options(cfg, tcfg, dataset, speed, weight)
    load = np.stack([np.asarray(r["expert_load"])[score] for r in rows])  # [steps, score layers, E]
    stats = load_imbalance(load)
    loss = np.array([float(r["loss"]) for r in rows])
    return {
        "bias_update_speed": speed, "balance_weight": weight, "score_layers": score,
        "loss": loss, "balance_loss": np.array([float(r["balance_loss"]) for r in rows]),
        "max_over_mean": stats["max_over_mean"], "cv": stats["cv"],
        "bias_abs_mean": np.stack([np.asarray(r["bias_abs_mean"])[score] for r in rows]),
        "final_loss": float(ex.tail(loss).mean()),
        "final_max_over_mean": float(ex.tail(stats["max_over_mean"]).mean()),
        "final_cv": float(ex.tail(stats["cv"]).mean()),
        "final_load": ex.tail(load).mean(0),  # [score layers, E] tokens per expert per step
        "seconds": seconds,
    }


def _smooth(x: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(x) < window:
        return x
    return np.convolve(x, np.ones(window) / window, mode="valid")


def plot(results: dict, out: Path) -> list[Path]:
    path = out / "balancing.png"
    with ex.figure(path, 4, figsize=(18, 4.2)) as (fig, axes):
        for name, r in results.items():
            c, steps = COLORS[name], len(r["loss"])
            window = max(1, steps // 20)
            x = np.arange(1, steps + 1)[window - 1:] if steps >= window else np.arange(1, steps + 1)
            label = f"{name} (γ={r['bias_update_speed']:g}, α={r['balance_weight']:g})"
            axes[0].plot(x, _smooth(np.asarray(r["loss"]), window), color=c, label=label)
            axes[1].plot(x, _smooth(np.mean(r["max_over_mean"], axis=1), window), color=c, label=name)
            axes[2].plot(x, _smooth(np.mean(r["cv"], axis=1), window), color=c, label=name)
            final = np.sort(np.asarray(r["final_load"]), axis=-1)[:, ::-1]  # experts sorted by load, per layer
            share = final / final.sum(-1, keepdims=True)
            axes[3].plot(np.arange(1, share.shape[-1] + 1), share.mean(0), "o-", color=c, label=name)
        e = np.asarray(next(iter(results.values()))["final_load"]).shape[-1]
        axes[3].axhline(1 / e, color="gray", lw=0.8, ls=":")
        axes[0].set(xlabel="step", ylabel="train CE (nats/token)", title="loss (moving average)")
        axes[1].set(xlabel="step", ylabel="max / mean tokens per expert", title="imbalance: max/mean (score layers)")
        axes[2].set(xlabel="step", ylabel="std / mean", title="imbalance: coefficient of variation")
        axes[3].set(xlabel="expert rank", ylabel="share of routed tokens", title="final load, experts sorted")
        for ax in axes:
            ax.legend(fontsize=7)
    return [path]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from deepmoe.ablations import ablation_model, train_config

    out = ex.output_dir(args)
    if args.replot:
        return ex.replot(out, plot, "variants")
    cfg = ablation_model(args.quick)
    tcfg = train_config(**ex.train_settings(args))
    dataset = ex.text_data(args)
    results = ex.run_variants(
        args.variants, lambda name: run_variant(cfg, tcfg, dataset, *options(args)[name]), quick=args.quick,
        describe=lambda r: f"final loss {r['final_loss']:.4f}, max/mean {r['final_max_over_mean']:.3f}, "
                           f"CV {r['final_cv']:.3f}")
    plots = plot(results, out)
    summary = {name: {k: r[k] for k in ("bias_update_speed", "balance_weight", "final_loss", "final_max_over_mean",
                                        "final_cv")} for name, r in results.items()}
    settings = {**ex.train_settings(args), "num_experts": cfg.num_experts,
                "experts_per_token": cfg.experts_per_token, "layer_types": list(cfg.layer_types),
                "num_hash_layers": cfg.num_hash_layers}
    ex.write_results(out, NAME, args.quick, plots, settings=settings, summary=summary, variants=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
