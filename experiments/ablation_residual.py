"""Residual ablation: mHC (V4) vs unconstrained hyper-connections (HC) vs a plain residual stream.

    python experiments/ablation_residual.py [--quick] [--out runs/ablation_residual] [--steps N] [--layers L]

Each variant trains the same model (tiny widths; every layer sliding-window attention + MoE so the L layers
share one scanned body and depth is cheap to vary; no MTP) from the same initialisation on the same batches of
the default corpus (Python stdlib sources, byte tokens), with deepmoe.train's optimizer (Muon + AdamW),
schedule, clipping and router-bias rule. The variants (see `deepmoe.ablations`):

  mhc    comb = Sinkhorn(softmax(.)): doubly stochastic, exactly deepmoe.forward's path
  hc     comb = I + tanh(.): the same parameters used raw (identity-initialised free matrix)
  plain  h += F(RMSNorm(h)), one stream

Measured (results.json, per variant):
  loss                 next-token CE of every step (batches are never repeated, so it is a held-out estimate);
                       final_loss = mean over the last 20 % of steps
  signal_gain          rms(X_l) / rms(X_0) after every layer l (X_0 = embedding), at step 1 and the last step
  layer_grad_norm      |dL/dtheta_l| per layer;  activation_grad_norm |dL/dX_l| per layer
  comb_forward_gain    max |row sum| of the composite mixing map P_s = comb_s^T ... comb_1^T over the 2L
  comb_backward_gain   sub-blocks (max |column sum|), max over tokens: the mHC paper's "Amax gain";
                       1 for doubly stochastic mixing, unbounded for HC, (identity) for plain
Plots: loss.png (loss vs step), depth.png (gains and gradient norms vs depth).
--quick (tests): 4 layers, 12 steps of 4 x 64 tokens, AdamW, compiled with most XLA optimizations off.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

NAME = "ablation_residual"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny run for tests (4 layers, 12 steps of 4 x 64 tokens, "
                   "AdamW, compiled with most XLA optimizations off)")
    p.add_argument("--out", default=f"runs/{NAME}", help="output directory")
    p.add_argument("--variants", nargs="+", default=["mhc", "hc", "plain"], choices=["mhc", "hc", "plain"])
    p.add_argument("--steps", type=int, help="train steps per variant (default 200; quick 12)")
    p.add_argument("--layers", type=int, help="decoder layers (default 12; quick 4)")
    p.add_argument("--batch", type=int, help="sequences per step (default 8; quick 4)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default 128; quick 64)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--optimizer", choices=("muon", "adamw"), help="default muon; quick adamw")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", nargs="*", default=None, help="training text (default: the Python stdlib)")
    args = p.parse_args(argv)
    defaults = (dict(steps=12, layers=4, batch=4, seq=64, optimizer="adamw") if args.quick
                else dict(steps=200, layers=12, batch=8, seq=128, optimizer="muon"))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def model_config(layers: int):
    import deepmoe as dm

    return dm.preset("tiny", num_layers=layers, layer_types=("sliding_attention",) * layers, num_hash_layers=0,
                     num_mtp_layers=0)


def run_variant(cfg, tcfg, residual: str, dataset, seed: int) -> dict:
    import jax

    from deepmoe.ablations import init_residual_state, make_residual_step
    from deepmoe.train.data import DataState

    params, opt_state = init_residual_state(cfg, tcfg, jax.random.key(seed))
    step = make_residual_step(cfg, tcfg, residual)
    state = DataState()
    rows = []
    start = time.perf_counter()
    for i in range(tcfg.steps):
        batch, state = dataset.batch(state)
        params, opt_state, metrics = step(params, opt_state, batch, i)
        rows.append(jax.device_get(metrics))
    seconds = time.perf_counter() - start
    loss = np.array([r["loss"] for r in rows], np.float64)
    tail = max(1, len(loss) // 5)
    result = {
        "loss": loss, "final_loss": float(np.nanmean(loss[-tail:])),
        "grad_norm": np.array([r["grad_norm"] for r in rows]), "skipped": int(sum(r["skipped"] for r in rows)),
        "seconds": seconds,
    }
    per_layer = ["layer_grad_norm", "activation_grad_norm", "comb_forward_gain", "comb_backward_gain",
                 "comb_forward_mean_gain", "comb_backward_mean_gain"]
    for key in per_layer:
        if key in rows[0]:
            result[key] = {"first": rows[0][key], "last": rows[-1][key]}
    result["signal_gain"] = {when: r["stream_rms"] / r["stream_rms"][0] for when, r in (("first", rows[0]),
                                                                                         ("last", rows[-1]))}
    return result


def plot(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"mhc": "C0", "hc": "C3", "plain": "C2"}
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        ax.plot(np.arange(1, len(r["loss"]) + 1), r["loss"], label=f"{name} (final {r['final_loss']:.3f})",
                color=colors[name])
    ax.set_xlabel("step")
    ax.set_ylabel("train CE (nats/token)")
    ax.set_title("Residual ablation: loss at equal steps")
    ax.legend()
    fig.tight_layout()
    paths = [out / "loss.png"]
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    for name, r in results.items():
        c = colors[name]
        gain = np.asarray(r["signal_gain"]["last"])
        axes[0].plot(np.arange(len(gain)), gain, "o-", color=c, label=f"{name} (last step)")
        axes[0].plot(np.arange(len(gain)), r["signal_gain"]["first"], "--", color=c, alpha=0.5)
        axes[1].plot(np.arange(1, len(gain)), r["layer_grad_norm"]["last"], "o-", color=c, label=name)
        axes[2].plot(np.arange(1, len(gain)), r["activation_grad_norm"]["last"], "o-", color=c, label=name)
        if "comb_forward_gain" in r:
            s = np.arange(1, len(r["comb_forward_gain"]["last"]) + 1)
            axes[3].plot(s, r["comb_forward_gain"]["last"], "o-", color=c, label=f"{name} forward")
            axes[3].plot(s, r["comb_backward_gain"]["last"], "s--", color=c, label=f"{name} backward")
    axes[0].set(xlabel="layer (0 = embedding)", ylabel="rms(X_l) / rms(X_0)", title="signal gain over depth")
    axes[1].set(xlabel="layer", ylabel="|dL/dθ_l|", title="parameter gradient norm per layer", yscale="log")
    axes[2].set(xlabel="layer", ylabel="|dL/dX_l|", title="gradient reaching each layer", yscale="log")
    axes[3].set(xlabel="sub-block (2 per layer)", ylabel="Amax gain of ∏ comb", yscale="log",
                title="composite residual map (max over tokens)")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "depth.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from deepmoe.analysis import fast_compile, run_metadata, write_json
    from deepmoe.train import TrainConfig
    from deepmoe.train.data import TextDataset

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model_config(args.layers)
    tcfg = TrainConfig(steps=args.steps, batch_size=args.batch, seq_len=args.seq, lr=args.lr,
                       warmup_steps=max(1, args.steps // 10), optimizer=args.optimizer, mtp_weight=0.0,
                       mtp_weight_after_decay=0.0, seed=args.seed)
    dataset = TextDataset.from_paths(args.data, seq_len=args.seq, batch_size=args.batch, seed=args.seed)
    results = {}
    for name in args.variants:
        t0 = time.perf_counter()
        with fast_compile(args.quick):
            results[name] = run_variant(cfg, tcfg, name, dataset, args.seed)
        r = results[name]
        print(f"{name:>6}: final loss {r['final_loss']:.4f}, signal gain at depth {args.layers} "
              f"{r['signal_gain']['last'][-1]:.3f}, skipped {r['skipped']}, "
              f"{time.perf_counter() - t0:.1f}s (incl. compile)", flush=True)
    plots = plot(results, out)
    summary = {name: {"final_loss": r["final_loss"], "signal_gain_last_layer": float(r["signal_gain"]["last"][-1]),
                      "comb_forward_gain_max": (float(np.max(r["comb_forward_gain"]["last"]))
                                                if "comb_forward_gain" in r else 1.0),
                      "comb_backward_gain_max": (float(np.max(r["comb_backward_gain"]["last"]))
                                                 if "comb_backward_gain" in r else 1.0)}
               for name, r in results.items()}
    write_json(out / "results.json", {
        "experiment": NAME, "metadata": run_metadata(), "quick": args.quick,
        "settings": {"layers": args.layers, "steps": args.steps, "batch": args.batch, "seq_len": args.seq,
                     "lr": args.lr, "optimizer": args.optimizer, "seed": args.seed,
                     "model": "tiny widths, all sliding-window layers, no hash layers, no MTP"},
        "summary": summary, "variants": results, "plots": [p.name for p in plots]})
    print(f"wrote {out / 'results.json'} and {', '.join(p.name for p in plots)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
