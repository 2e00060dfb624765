"""PNG plots of a run's metrics.jsonl (matplotlib, Agg backend): loss curves, expert load, router-bias drift."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(train rows, validation rows) of a metrics.jsonl file (cut or malformed lines are skipped)."""
    train, val = [], []
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "val_loss" in row:
            val.append(row)
        elif "loss" in row:
            train.append(row)
    return train, val


def _per_layer(ax, rows: list[dict], key: str, title: str, ylabel: str, mtp_key: str | None = None) -> None:
    rows = [r for r in rows if isinstance(r.get(key), list)]
    if not rows:
        ax.set_visible(False)
        return
    steps = [r["step"] for r in rows]
    for layer in range(len(rows[0][key])):
        ax.plot(steps, [r[key][layer] for r in rows], label=f"layer {layer}", lw=1)
    if mtp_key and any(mtp_key in r for r in rows):
        ax.plot(steps, [r.get(mtp_key, float("nan")) for r in rows], label="MTP", lw=1, ls="--")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize="small", ncol=2)
    ax.grid(alpha=0.3)


def write_plots(metrics_path: str | Path, out_dir: str | Path) -> list[Path]:
    """loss.png, expert_load.png, router_bias.png under out_dir; returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = read_metrics(metrics_path)
    out = Path(out_dir)
    written = []
    if not train:
        return written

    fig, ax = plt.subplots(figsize=(7, 4.5))
    steps = [r["step"] for r in train]
    ax.plot(steps, [r["loss"] for r in train], label="train CE", lw=1)
    if any("mtp_loss" in r for r in train):
        ax.plot(steps, [r.get("mtp_loss", float("nan")) for r in train], label="train MTP CE", lw=1, alpha=0.7)
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation CE")
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in val], [r["val_bpb"] for r in val], "s--", color="tab:red", alpha=0.6,
                 label="val bits/byte")
        ax2.set_ylabel("validation bits per byte")
        ax2.legend(loc="upper center", fontsize="small")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title("loss")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)
    written.append(out / "loss.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    _per_layer(ax, train, "load_max_over_mean", "expert load per layer (max / mean tokens per expert)",
               "max / mean load", mtp_key="mtp_load_max_over_mean")
    fig.tight_layout()
    fig.savefig(out / "expert_load.png", dpi=110)
    plt.close(fig)
    written.append(out / "expert_load.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    _per_layer(ax, train, "bias_abs_mean", "router bias drift (mean |bias| per layer; hash layers stay 0)",
               "mean |router bias|")
    fig.tight_layout()
    fig.savefig(out / "router_bias.png", dpi=110)
    plt.close(fig)
    written.append(out / "router_bias.png")
    return written
