"""KV-cache bytes and per-token FLOPs vs context: V4-Pro and V4-Flash vs DeepSeek-V3.2 and a BF16 GQA-8 baseline,
reproducing the report's 1M-context claims (V4-Pro 27 % / V4-Flash 10 % of V3.2's single-token FLOPs, KV cache
10 % / 7 %).

    python experiments/kv_and_flops.py [--quick] [--out runs/kv_and_flops]

Formulas (implemented in `deepmoe.analysis`; L = tokens in the cache, one token decoded):

KV cache bytes per sequence = bytes_per_token * L + fixed state
  V4     bytes_per_token = sum_CSA (584 + 68) / 4 + sum_HCA 584 / 128 (SWA layers: 0), release FP8 layout from
         `deepmoe.infer.accounting`: entry = 448 FP8 nope + 64 BF16 rope (128 B) + 7 ue8m0 scales + 1 pad = 584 B,
         indexer key = 128 FP4 (64 B) + 4 ue8m0 scales = 68 B. Flash 21 CSA + 20 HCA = 3,514 B;
         Pro 30 CSA + 31 HCA = 5,031 B. Fixed: 128-entry window ring per layer (+ MTP) and fp32 compressor tails.
  V3.2   61 x (656 + 132) = 48,068 B (MLA latent 512 FP8 + 4 fp32 scales + 64 BF16 rope; FP8 indexer key + scale)
  GQA    61 x 2 (K, V) x 8 heads x 128 x 2 B = 249,856 B

FLOPs per decoded token = weights + attention + indexer
  weights      2 x active params (V4 `count_params`: Flash 13.80B, Pro 49.78B; V3.2 and GQA 37B)
  V4 attention sum over layers 4 H c k, c = 512, k = min(128, L) + CSA min(top-k, L/4) + HCA L/128
  V4 indexer   sum over CSA layers 2 H_I (c_I + 1) L/4 (H_I = 64, c_I = 128)
  V3.2 attn    61 x 2 x 128 x (576 + 512) x min(2048, L)  (absorbed MLA: q.k over 512 + 64, p.v over 512)
  V3.2 index   61 x 2 x 64 x (128 + 1) x L
  GQA attn     61 x 4 x 64 x 128 x L
  FP8-equivalent (the report's unit): weights FP8 x1, attention BF16 x2, V3.2 indexer FP8 x1, V4 indexer FP4 x0.5.

At L = 2^20: FLOPs V4-Pro 26.5 % / V4-Flash 10.0 % of V3.2 (FP8-equivalent; plain 26.3 % / 12.2 %);
KV bytes per token 10.5 % / 7.3 % of V3.2 and 2.0 % / 1.4 % of GQA-8.

Writes results.json (the claims at 1M, the curves) and kv_and_flops.png (KV bytes per sequence, FLOPs per token
and the ratios to V3.2, against context on a log axis). Analytic: --quick only uses fewer curve points.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from deepmoe import experiment as ex

NAME = "kv_and_flops"


def parse_args(argv: Sequence[str] | None):
    p = ex.parser(__doc__, NAME, quick_help="fewer curve points (the numbers are analytic anyway)")
    p.add_argument("--context", type=int, default=1 << 20, help="context of the headline comparison (1M = 2^20)")
    return ex.parse(p, argv)


def plot(curves: dict, claims: dict, out: Path) -> list[Path]:
    from deepmoe.analysis import V32Style

    base = curves[V32Style.name]
    colors = {"v4-pro": "C0", "v4-flash": "C2", V32Style.name: "C3", "BF16 GQA-8": "C7"}
    path = out / "kv_and_flops.png"
    with ex.figure(path, 3, figsize=(17, 4.6)) as (fig, axes):
        for name, c in curves.items():
            L = np.asarray(c["context"])
            color = colors.get(name)
            axes[0].plot(L, np.asarray(c["kv_total_bytes"]) / 1e9, color=color, label=name)
            axes[1].plot(L, np.asarray(c["flops_fp8_equivalent"]) / 1e9, color=color, label=f"{name}")
            axes[1].plot(L, np.asarray(c["flops"]) / 1e9, color=color, ls=":", alpha=0.7)
            if name.startswith("v4"):
                axes[2].plot(L, np.asarray(c["flops_fp8_equivalent"]) / np.asarray(base["flops_fp8_equivalent"]),
                             color=color, label=f"{name} FLOPs (FP8-eq.)")
                axes[2].plot(L, np.asarray(c["kv_total_bytes"]) / np.asarray(base["kv_total_bytes"]), color=color,
                             ls="--", label=f"{name} KV bytes")
        ctx = claims["context"]
        for name, marker in (("v4-pro", "o"), ("v4-flash", "s")):
            for reported in (claims["reported"][name]["flops"], claims["reported"][name]["kv"]):
                axes[2].scatter([ctx], [reported], marker=marker, facecolors="none", edgecolors="k", zorder=5)
        axes[2].scatter([], [], marker="o", facecolors="none", edgecolors="k", label="report's claims at 1M")
        axes[0].set(title="KV cache per sequence", ylabel="GB", yscale="log")
        axes[1].set(title="FLOPs per decoded token (solid FP8-eq., dotted plain)", ylabel="GFLOPs", yscale="log")
        axes[2].set(title="ratio to DeepSeek-V3.2", ylabel="V4 / V3.2", ylim=(0, 1.2))
        for ax in axes:
            ax.set(xscale="log", xlabel="context length (tokens)")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3, which="both")
    return [path]


def format_table(claims: dict) -> str:
    from deepmoe.analysis import GQABaseline, V32Style

    rows = [f"{'at ' + str(claims['context']) + ' tokens':<22}{'KV B/token':>12}{'vs V3.2':>9}{'GFLOPs':>10}"
            f"{'FP8-eq':>10}{'vs V3.2':>9}{'(plain)':>9}{'report':>14}"]
    for name in ("v4-pro", "v4-flash"):
        c, rep = claims[name], claims["reported"][name]
        rows.append(f"{name:<22}{c['kv_bytes_per_token']:>12,.0f}{100 * c['kv_vs_v32']:>8.1f}%"
                    f"{c['flops'] / 1e9:>10.1f}{c['flops_fp8_equivalent'] / 1e9:>10.1f}"
                    f"{100 * c['flops_fp8_equivalent_vs_v32']:>8.1f}%{100 * c['flops_vs_v32']:>8.1f}%"
                    f"{'KV ' + format(rep['kv'], '.0%') + ' F ' + format(rep['flops'], '.0%'):>14}")
    for name in (V32Style.name, GQABaseline.name):
        c = claims[name]
        rows.append(f"{name:<22}{c['kv_bytes_per_token']:>12,.0f}{'':>9}{c['flops'] / 1e9:>10.1f}"
                    f"{c['flops_fp8_equivalent'] / 1e9:>10.1f}")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from deepmoe.analysis import cost_comparison, report_claims

    out = ex.output_dir(args)
    points = 11 if args.quick else 41
    contexts = np.unique(np.round(np.logspace(10, 20, points, base=2)).astype(np.int64))
    curves = cost_comparison(contexts)
    claims = report_claims(args.context)
    plots = plot(curves, claims, out)
    print(format_table(claims))
    ex.write_results(out, NAME, args.quick, plots, claims=claims, curves=curves)
    return 0


if __name__ == "__main__":
    sys.exit(main())
