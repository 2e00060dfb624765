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

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

NAME = "ablation_balancing"
VARIANTS = ("aux_free", "aux_loss", "none", "v4")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny run for tests")
    p.add_argument("--out", default=f"runs/{NAME}")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--steps", type=int, help="default 200; quick 12")
    p.add_argument("--batch", type=int, help="default 8; quick 4")
    p.add_argument("--seq", type=int, help="default 256; quick 64")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--optimizer", choices=("muon", "adamw"), help="default muon; quick adamw")
    p.add_argument("--bias-speed", type=float, default=1e-3, help="gamma of the aux-loss-free rule (V4: 1e-3)")
    p.add_argument("--aux-weight", type=float, default=1e-2, help="alpha of the aux_loss variant")
    p.add_argument("--v4-aux-weight", type=float, default=1e-4, help="alpha of the v4 variant (report: 1e-4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", nargs="*", default=None)
    args = p.parse_args(argv)
    quick = dict(steps=12, batch=4, seq=64, optimizer="adamw")
    full = dict(steps=200, batch=8, seq=256, optimizer="muon")
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def options(args) -> dict[str, tuple[float, float]]:
    """variant -> (bias_update_speed, balance_weight)."""
    return {"aux_free": (args.bias_speed, 0.0), "aux_loss": (0.0, args.aux_weight), "none": (0.0, 0.0),
            "v4": (args.bias_speed, args.v4_aux_weight)}


def run_variant(cfg, tcfg, dataset, speed: float, weight: float) -> dict:
    import jax

    from deepmoe.ablations import make_options_step
    from deepmoe.analysis import load_imbalance
    from deepmoe.train import init_state
    from deepmoe.train.data import DataState
    from deepmoe.train.step import score_layer_indices

    score = score_layer_indices(cfg)
    state = init_state(cfg, tcfg, jax.random.key(tcfg.seed))
    step = make_options_step(cfg, tcfg)
    data = DataState()
    rows = []
    start = time.perf_counter()
    for _ in range(tcfg.steps):
        batch, data = dataset.batch(data)
        state, metrics = step(state, batch, speed, weight)
        m = jax.device_get(metrics)
        rows.append({"loss": float(m["loss"]), "balance_loss": float(m["balance_loss"]),
                     "load": np.asarray(m["expert_load"])[score], "bias": np.asarray(m["bias_abs_mean"])[score]})
    load = np.stack([r["load"] for r in rows])  # [steps, score layers, E]
    stats = load_imbalance(load)
    tail = max(1, len(rows) // 5)
    loss = np.array([r["loss"] for r in rows])
    return {
        "bias_update_speed": speed, "balance_weight": weight, "score_layers": score,
        "loss": loss, "balance_loss": np.array([r["balance_loss"] for r in rows]),
        "max_over_mean": stats["max_over_mean"], "cv": stats["cv"],
        "bias_abs_mean": np.stack([r["bias"] for r in rows]),
        "final_loss": float(loss[-tail:].mean()),
        "final_max_over_mean": float(stats["max_over_mean"][-tail:].mean()),
        "final_cv": float(stats["cv"][-tail:].mean()),
        "final_load": load[-tail:].mean(0),  # [score layers, E] tokens per expert per step
        "seconds": time.perf_counter() - start,
    }


def _smooth(x: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(x) < window:
        return x
    return np.convolve(x, np.ones(window) / window, mode="valid")


def plot(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"aux_free": "C0", "aux_loss": "C1", "none": "C3", "v4": "C2"}
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for name, r in results.items():
        steps = len(r["loss"])
        window = max(1, steps // 20)
        x = np.arange(1, steps + 1)[window - 1:] if steps >= window else np.arange(1, steps + 1)
        label = f"{name} (γ={r['bias_update_speed']:g}, α={r['balance_weight']:g})"
        axes[0].plot(x, _smooth(r["loss"], window), color=colors[name], label=label)
        axes[1].plot(x, _smooth(np.mean(r["max_over_mean"], axis=1), window), color=colors[name], label=name)
        axes[2].plot(x, _smooth(np.mean(r["cv"], axis=1), window), color=colors[name], label=name)
        final = np.sort(np.asarray(r["final_load"]), axis=-1)[:, ::-1]  # experts sorted by load, per layer
        share = final / final.sum(-1, keepdims=True)
        axes[3].plot(np.arange(1, share.shape[-1] + 1), share.mean(0), "o-", color=colors[name], label=name)
    e = np.asarray(next(iter(results.values()))["final_load"]).shape[-1]
    axes[3].axhline(1 / e, color="gray", lw=0.8, ls=":")
    axes[0].set(xlabel="step", ylabel="train CE (nats/token)", title="loss (moving average)")
    axes[1].set(xlabel="step", ylabel="max / mean tokens per expert", title="imbalance: max/mean (score layers)")
    axes[2].set(xlabel="step", ylabel="std / mean", title="imbalance: coefficient of variation")
    axes[3].set(xlabel="expert rank", ylabel="share of routed tokens", title="final load, experts sorted")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "balancing.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from deepmoe.ablations import ablation_model
    from deepmoe.analysis import fast_compile, run_metadata, write_json
    from deepmoe.train import TrainConfig
    from deepmoe.train.data import TextDataset

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = ablation_model(args.quick)
    tcfg = TrainConfig(steps=args.steps, batch_size=args.batch, seq_len=args.seq, lr=args.lr,
                       warmup_steps=max(1, args.steps // 10), optimizer=args.optimizer, mtp_weight=0.0,
                       mtp_weight_after_decay=0.0, seed=args.seed)
    dataset = TextDataset.from_paths(args.data, seq_len=args.seq, batch_size=args.batch, seed=args.seed)
    results = {}
    for name in args.variants:
        speed, weight = options(args)[name]
        t0 = time.perf_counter()
        with fast_compile(args.quick):
            results[name] = run_variant(cfg, tcfg, dataset, speed, weight)
        r = results[name]
        print(f"{name:>8}: final loss {r['final_loss']:.4f}, max/mean {r['final_max_over_mean']:.3f}, "
              f"CV {r['final_cv']:.3f} ({time.perf_counter() - t0:.1f}s incl. compile)", flush=True)
    plots = plot(results, out)
    summary = {name: {k: r[k] for k in ("bias_update_speed", "balance_weight", "final_loss", "final_max_over_mean",
                                        "final_cv")} for name, r in results.items()}
    write_json(out / "results.json", {
        "experiment": NAME, "metadata": run_metadata(), "quick": args.quick,
        "settings": {"steps": args.steps, "batch": args.batch, "seq_len": args.seq, "lr": args.lr,
                     "optimizer": args.optimizer, "seed": args.seed, "num_experts": cfg.num_experts,
                     "experts_per_token": cfg.experts_per_token, "layer_types": list(cfg.layer_types),
                     "num_hash_layers": cfg.num_hash_layers},
        "summary": summary, "variants": results, "plots": [p.name for p in plots]})
    print(f"wrote {out / 'results.json'} and {', '.join(p.name for p in plots)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
