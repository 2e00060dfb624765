"""The harness shared by `experiments/*.py`: command line, running variants, results files and figures.

An experiment script keeps only what it measures (its config, its variants, its metrics and its plots); the
rest is here so every script behaves the same way:

* command line: `--quick` (the tiny run the tests execute), `--out` (default `runs/<name>`), `--variants`,
  `--replot`, and the training options `--steps --batch --seq --lr --optimizer --seed --data` whose defaults
  come from the script's `quick` / `full` settings (an explicit flag always wins, `--quick` included);
* `run_variants`: one variant after another under `fast_compile(quick)`, a progress line each;
* `write_results`: `OUT/results.json` = {experiment, metadata (machine, versions, date), quick, <sections>,
  plots}, strict JSON (non-finite numbers -> null); `read_results` gives them back (null -> nan) for `--replot`;
* figures: `figure(path)` opens a headless (Agg) matplotlib figure and saves it as PNG on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from deepmoe.backend.host_memory import keep_host_buffers

DPI = 110


# ----- command line ----------------------------------------------------------------------------------------

def parser(doc: str, name: str, *, variants: Sequence[str] = (), replot: bool = False,
           quick_help: str = "tiny run for tests") -> argparse.ArgumentParser:
    """--quick, --out (default runs/NAME), --variants (if the script has any), --replot (if it can)."""
    p = argparse.ArgumentParser(description=doc.strip().split("\n")[0])
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--out", default=f"runs/{name}", help="output directory")
    if variants:
        p.add_argument("--variants", nargs="+", default=list(variants), choices=variants)
    if replot:
        p.add_argument("--replot", action="store_true", help="redraw the plots from OUT/results.json, no training")
    return p


_TRAIN_HELP = {"steps": "train steps", "batch": "sequences per step", "seq": "tokens per sequence",
               "optimizer": "muon or adamw"}


def add_train_args(p: argparse.ArgumentParser, quick: Mapping[str, Any], full: Mapping[str, Any], *,
                   seed_and_data: bool = True) -> None:
    """--steps --batch --seq --lr --optimizer [--seed --data]. Options named in `quick` / `full` default to None
    here and are filled by `parse` (help says both defaults); the others have fixed defaults."""
    def default_help(key: str) -> str:
        return f"{_TRAIN_HELP[key]} (default {full[key]}; quick {quick[key]})"

    p.add_argument("--steps", type=int, help=default_help("steps"))
    p.add_argument("--batch", type=int, help=default_help("batch"))
    p.add_argument("--seq", type=int, help=default_help("seq"))
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--optimizer", choices=("muon", "adamw"), help=default_help("optimizer"))
    if seed_and_data:
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--data", nargs="*", default=None, help="training text (default: the Python stdlib)")


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None, quick: Mapping[str, Any] | None = None,
          full: Mapping[str, Any] | None = None) -> argparse.Namespace:
    """Parse argv; every option still None takes its value from `quick` (with --quick) or `full`."""
    args = p.parse_args(argv)
    keep_host_buffers()  # before the script's first JAX op
    for key, value in ((quick if args.quick else full) or {}).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def train_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The training options as results.json's `settings` records them (and `ablations.train_config` takes them)."""
    return {"steps": args.steps, "batch": args.batch, "seq_len": args.seq, "lr": args.lr,
            "optimizer": args.optimizer, "seed": args.seed}


def output_dir(args: argparse.Namespace) -> Path:
    """--out, created."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def text_data(args: argparse.Namespace):
    """The byte-level training text of --data (default: the Python stdlib) in batches of --batch x --seq."""
    from deepmoe.train.data import TextDataset

    return TextDataset.from_paths(args.data, seq_len=args.seq, batch_size=args.batch, seed=args.seed)


# ----- running ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def fast_compile(enabled: bool = True):
    """Within the block, XLA compiles with most optimizations off (`jax_disable_most_optimizations`): CPU
    compile time of the tiny models drops ~2x, run time rises. For --quick runs and tests, where compilation
    dominates; the previous setting is restored on exit."""
    import jax

    previous = bool(jax.config.values.get("jax_disable_most_optimizations", False))
    if enabled:
        jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)


def run_variants(names: Iterable[str], run: Callable[[str], Any], describe: Callable[[Any], str], *,
                 quick: bool) -> dict[str, Any]:
    """{name: run(name)} in order, each under `fast_compile(quick)`, printing `name: describe(result) (time)`
    as it goes (the time includes compilation, which dominates quick runs)."""
    results = {}
    for name in names:
        start = time.perf_counter()
        with fast_compile(quick):
            results[name] = run(name)
        print(f"{name:>8}: {describe(results[name])} ({time.perf_counter() - start:.1f}s incl. compile)", flush=True)
    return results


def tail(x) -> np.ndarray:
    """The last 20 % of a per-step series (at least one step), along the first axis: what the experiments'
    `final_*` numbers average (batches are never repeated, so late steps estimate held-out loss)."""
    x = np.asarray(x)
    return x[-max(1, len(x) // 5):]


# ----- results files ---------------------------------------------------------------------------------------

def run_metadata() -> dict[str, Any]:
    """Machine, software and date of a run (for results files and the README tables)."""
    import jax

    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores",
        "processor": platform.processor() or _cpu_model(),
        "python": platform.python_version(), "jax": jax.__version__,
        "backend": jax.default_backend(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def jsonable(x: Any) -> Any:
    """numpy / jax values -> plain JSON (non-finite floats -> None, so the file stays strict JSON)."""
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        a = np.asarray(x)
        return jsonable(a.tolist()) if a.ndim else jsonable(a.item())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, (np.floating,)):
        return jsonable(float(x))
    if isinstance(x, (np.integer,)):
        return int(x)
    return x


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(obj), indent=1, allow_nan=False))
    return path


def write_results(out: Path, name: str, quick: bool, plots: Sequence[Path], **sections: Any) -> Path:
    """OUT/results.json: experiment, metadata, quick, the sections in the given order, then the plots' names."""
    path = write_json(out / "results.json", {"experiment": name, "metadata": run_metadata(), "quick": quick,
                                             **sections, "plots": [p.name for p in plots]})
    print(f"wrote {path} and {', '.join(p.name for p in plots)}")
    return path


def _nan_for_none(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _nan_for_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [math.nan if v is None else _nan_for_none(v) for v in x]
    return x


def read_results(out: Path) -> dict[str, Any]:
    """OUT/results.json as written by `write_results`, nulls in lists (non-finite numbers) back to nan."""
    return _nan_for_none(json.loads((Path(out) / "results.json").read_text()))


def replot(out: Path, plot: Callable[..., Any], *sections: str) -> int:
    """--replot: `plot(*saved sections, out)` from OUT/results.json, nothing recomputed. -> exit status 0."""
    saved = read_results(out)
    plot(*(saved[s] for s in sections), out)
    return 0


# ----- figures ---------------------------------------------------------------------------------------------

def pyplot():
    """matplotlib.pyplot on the Agg backend: scripts and tests run headless."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextlib.contextmanager
def figure(path: Path, ncols: int = 1, **subplots: Any) -> Iterator[tuple[Any, Any]]:
    """`with figure(out / "x.png", 3, figsize=(16, 4)) as (fig, axes):` -- one row of `ncols` axes, laid out
    tightly and saved at DPI when the block ends without an error; always closed (figures hold memory)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, ncols, **subplots)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(path, dpi=DPI)
    finally:
        plt.close(fig)


def loss_curves(ax, results: Mapping[str, Mapping[str, Any]], colors: Mapping[str, str], title: str) -> None:
    """Train loss vs step, one line per variant, labelled with its final loss."""
    for name, r in results.items():
        ax.plot(np.arange(1, len(r["loss"]) + 1), r["loss"], color=colors[name],
                label=f"{name} (final {r['final_loss']:.3f})")
    ax.set(xlabel="step", ylabel="train CE (nats/token)", title=title)
    ax.legend()


__all__ = ["DPI", "parser", "add_train_args", "parse", "train_settings", "output_dir", "text_data",
           "fast_compile", "run_variants", "tail", "run_metadata", "jsonable", "write_json", "write_results",
           "read_results", "replot", "pyplot", "figure", "loss_curves"]
