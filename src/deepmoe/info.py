"""`deepmoe info`: the parameter table of every preset (computed without allocating)."""

from __future__ import annotations

import argparse

from deepmoe.config import PRESETS, preset
from deepmoe.params import count_params


def _human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def parameter_table(names: list[str] | None = None) -> str:
    rows = [("preset", "layers", "hidden", "experts", "total", "active", "MTP", "schedule")]
    for name in names or list(PRESETS):
        cfg = preset(name)
        count = count_params(cfg)
        kinds = {"sliding_attention": "SWA", "compressed_sparse_attention": "CSA",
                 "heavily_compressed_attention": "HCA"}
        schedule = " ".join(f"{kinds[t]}x{cfg.layer_types.count(t)}" for t in kinds if t in cfg.layer_types)
        rows.append((name, str(cfg.num_layers), str(cfg.hidden_size),
                     f"{cfg.num_experts} top-{cfg.experts_per_token}", _human(count.total), _human(count.active),
                     _human(count.mtp), schedule))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deepmoe info", description=__doc__)
    parser.add_argument("--preset", action="append", choices=sorted(PRESETS), help="only these presets")
    args = parser.parse_args(argv)
    print(parameter_table(args.preset))
    return 0
