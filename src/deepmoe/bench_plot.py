"""`deepmoe bench --compare-transformers` as a picture: per compared part, each round's time of deepmoe and of
transformers (rounds alternate the two, `deepmoe.bench.interleaved_times`), so a busy spell of the machine shows
as both lines rising together and the speedup as the gap between them (`deepmoe.experiment.figure`: matplotlib,
Agg backend)."""

from __future__ import annotations

from typing import Any

UNITS = {"forward": "ms per forward", "train": "ms per train step", "gradients": "ms per forward + backward",
         "prefill": "ms per prefill", "decode": "ms per decode step"}


def plot_comparison(versus: dict[str, tuple[dict[str, Any], dict[str, Any]]], title: str, path: str,
                    labels: tuple[str, str] = ("deepmoe", "transformers")) -> str:
    """versus: {part: (timing, the other's timing with the first's "speedup" over it)}, as
    `deepmoe.bench.versus_transformers(result)`; labels: the two sides' names. Writes the PNG to `path`."""
    from deepmoe.experiment import figure

    with figure(path, len(versus), figsize=(3.6 * len(versus), 3.4), squeeze=False) as (fig, axes):
        for ax, (part, (ours, theirs)) in zip(axes[0], versus.items()):
            rounds = range(1, len(ours["seconds_each"]) + 1)
            ax.plot(rounds, [1e3 * s for s in ours["seconds_each"]], "o-", label=labels[0])
            ax.plot(rounds, [1e3 * s for s in theirs["seconds_each"]], "s-", label=labels[1])
            each = theirs["speedup_each"]
            ax.set_title(f"{part}: {theirs['speedup']:.2f}x\n(rounds {min(each):.2f}-{max(each):.2f}x)", fontsize=9)
            ax.set_xlabel("round")
            ax.set_ylabel(UNITS.get(part, "ms"))
            ax.set_xticks(list(rounds))
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(title, fontsize=10)
    return path
