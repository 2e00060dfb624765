"""Load time and peak host memory of `load_pretrained` on a synthetic ~1 GB checkpoint.

Writes a bf16 HF-layout checkpoint of a V4-shaped config (sharded into ~256 MB files), then loads it in a fresh
process and reports wall time and peak RSS relative to the size of the loaded parameters. Results go to
OUT/result.json (--out, default runs/bench_load).

    python experiments/bench_load.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _config(quick: bool):
    import deepmoe as dm

    # ~520M parameters (~1 GB in bf16); --quick: ~60M.
    size = dict(hidden_size=256, num_experts=16, expert_hidden_dim=256) if quick else \
        dict(hidden_size=1024, num_experts=32, expert_hidden_dim=1024)
    return dm.preset("small", vocab_size=8192, num_layers=8, **size)


def _write(directory: Path, quick: bool) -> None:
    import jax

    import deepmoe as dm

    cfg = _config(quick).replace(param_dtype="bfloat16")
    params = dm.init_params(cfg, jax.random.key(0))
    dm.save_pretrained(directory, params, cfg, max_shard_bytes=256 << 20)


def _load(directory: Path) -> dict:
    import jax

    import deepmoe as dm
    from deepmoe.bench import peak_rss_bytes

    base = peak_rss_bytes()
    start = time.perf_counter()
    cfg, params = dm.load_pretrained(directory, "bfloat16")
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    result_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    peak = peak_rss_bytes()
    return {"seconds": seconds, "result_bytes": result_bytes, "peak_rss_bytes": peak,
            "rss_growth_bytes": peak - base, "rss_growth_over_result": (peak - base) / result_bytes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="~120 MB instead of ~1 GB")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_load"), help="output directory")
    parser.add_argument("--_write", help=argparse.SUPPRESS)
    parser.add_argument("--_load", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._write:
        _write(Path(args._write), args.quick)
        return 0
    if args._load:
        print(json.dumps(_load(Path(args._load))))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        flags = ["--quick"] if args.quick else []
        subprocess.run([sys.executable, __file__, "--_write", tmp, *flags], check=True)
        checkpoint = sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))
        out = subprocess.run([sys.executable, __file__, "--_load", tmp], check=True, capture_output=True, text=True)
        result = {"checkpoint_bytes": checkpoint, **json.loads(out.stdout.strip().splitlines()[-1])}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    print(f"checkpoint {checkpoint / 2**20:.0f} MiB loaded in {result['seconds']:.1f}s; peak RSS growth "
          f"{result['rss_growth_bytes'] / 2**20:.0f} MiB = {result['rss_growth_over_result']:.2f}x the loaded params; "
          f"wrote {args.out / 'result.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
