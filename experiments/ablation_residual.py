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

import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from deepmoe import experiment as ex

NAME = "ablation_residual"
QUICK = dict(steps=12, layers=4, batch=4, seq=64, optimizer="adamw")
FULL = dict(steps=200, layers=12, batch=8, seq=128, optimizer="muon")
COLORS = {"mhc": "C0", "hc": "C3", "plain": "C2"}
PER_LAYER = ("layer_grad_norm", "activation_grad_norm", "comb_forward_gain", "comb_backward_gain",
             "comb_forward_mean_gain", "comb_backward_mean_gain")


def parse_args(argv: Sequence[str] | None):
    p = ex.parser(__doc__, NAME, variants=("mhc", "hc", "plain"), replot=True,
                  quick_help="tiny run for tests (4 layers, 12 steps of 4 x 64 tokens, AdamW, compiled with most "
                  "XLA optimizations off)")
    ex.add_train_args(p, QUICK, FULL)
    p.add_argument("--layers", type=int, help="decoder layers (default 12; quick 4)")
    return ex.parse(p, argv, QUICK, FULL)


def model_config(layers: int):
    import deepmoe as dm

    return dm.preset("tiny", num_layers=layers, layer_types=("sliding_attention",) * layers, num_hash_layers=0,
                     num_mtp_layers=0)


def run_variant(cfg, tcfg, residual: str, dataset) -> dict:
    from deepmoe.ablations import train_residual

    rows, seconds = train_residual(cfg, tcfg, residual, dataset)
    loss = np.array([r["loss"] for r in rows], np.float64)
    result = {
        "loss": loss, "final_loss": float(np.nanmean(ex.tail(loss))),
        "grad_norm": np.array([r["grad_norm"] for r in rows]), "skipped": int(sum(r["skipped"] for r in rows)),
        "seconds": seconds,
    }
    for key in PER_LAYER:
        if key in rows[0]:
            result[key] = {"first": rows[0][key], "last": rows[-1][key]}
    result["signal_gain"] = {when: r["stream_rms"] / r["stream_rms"][0] for when, r in (("first", rows[0]),
                                                                                         ("last", rows[-1]))}
    return result


def plot(results: dict, out: Path) -> list[Path]:
    paths = [out / "loss.png", out / "depth.png"]
    with ex.figure(paths[0], figsize=(6, 4)) as (fig, ax):
        ex.loss_curves(ax, results, COLORS, "Residual ablation: loss at equal steps")
    with ex.figure(paths[1], 4, figsize=(17, 4)) as (fig, axes):
        for name, r in results.items():
            c = COLORS[name]
            gain = np.asarray(r["signal_gain"]["last"])
            layers = np.arange(1, len(gain))
            axes[0].plot(np.arange(len(gain)), gain, "o-", color=c, label=f"{name} (last step)")
            axes[0].plot(np.arange(len(gain)), r["signal_gain"]["first"], "--", color=c, alpha=0.5)
            axes[1].plot(layers, r["layer_grad_norm"]["last"], "o-", color=c, label=name)
            axes[2].plot(layers, r["activation_grad_norm"]["last"], "o-", color=c, label=name)
            s = np.arange(1, 2 * len(layers) + 1)
            if "comb_forward_gain" in r:
                axes[3].plot(s, r["comb_forward_gain"]["last"], "o-", color=c, label=f"{name} forward")
                axes[3].plot(s, r["comb_backward_gain"]["last"], "s--", color=c, label=f"{name} backward")
            else:  # one stream: the residual map is the identity
                axes[3].plot(s, np.ones(len(s)), ":", color=c, label=f"{name} (identity)")
        axes[0].set(xlabel="layer (0 = embedding)", ylabel="rms(X_l) / rms(X_0)", yscale="log",
                    title="signal gain over depth (dashed: step 1)")
        axes[1].set(xlabel="layer", ylabel="|dL/dθ_l|", title="parameter gradient norm per layer", yscale="log")
        axes[2].set(xlabel="layer", ylabel="|dL/dX_l|", title="gradient reaching each layer", yscale="log")
        axes[3].set(xlabel="sub-block (2 per layer)", ylabel="Amax gain of ∏ comb", yscale="log",
                    title="composite residual map (max over tokens)")
        for ax in axes:
            ax.legend(fontsize=8)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from deepmoe.ablations import train_config

    out = ex.output_dir(args)
    if args.replot:
        return ex.replot(out, plot, "variants")
    cfg = model_config(args.layers)
    tcfg = train_config(**ex.train_settings(args))
    dataset = ex.text_data(args)
    results = ex.run_variants(
        args.variants, lambda name: run_variant(cfg, tcfg, name, dataset), quick=args.quick,
        describe=lambda r: f"final loss {r['final_loss']:.4f}, signal gain at depth {args.layers} "
                           f"{r['signal_gain']['last'][-1]:.3f}, skipped {r['skipped']}")
    plots = plot(results, out)
    summary = {name: {"final_loss": r["final_loss"], "signal_gain_last_layer": float(r["signal_gain"]["last"][-1]),
                      **{f"{key}_max": float(np.max(r[key]["last"])) if key in r else 1.0
                         for key in ("comb_forward_gain", "comb_backward_gain")}}
               for name, r in results.items()}
    settings = {"layers": args.layers, **ex.train_settings(args),
                "model": "tiny widths, all sliding-window layers, no hash layers, no MTP"}
    ex.write_results(out, NAME, args.quick, plots, settings=settings, summary=summary, variants=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
