"""`deepmoe convert`: official / HF safetensors -> orbax (fast sharded reload), and orbax -> HF safetensors."""

from __future__ import annotations

import argparse
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="deepmoe convert",
        description="Convert DeepSeek-V4 weights. --hf DIR reads official or HF safetensors (FP8 / MXFP4 are "
                    "dequantized) and writes an orbax checkpoint; --orbax DIR writes HF safetensors back.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", metavar="DIR", help="official or HF-layout checkpoint directory")
    source.add_argument("--orbax", metavar="DIR", help="orbax checkpoint written by `deepmoe convert --hf`")
    parser.add_argument("--out", metavar="DIR", required=True, help="output directory")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="storage dtype of the matrices (default bfloat16)")
    parser.add_argument("--no-strict", action="store_true", help="ignore tensors the config does not use")
    args = parser.parse_args(argv)

    from deepmoe.io.orbax_io import load_orbax, save_orbax
    from deepmoe.io.pretrained import load_pretrained, save_pretrained

    start = time.perf_counter()
    if args.hf:
        cfg, params = load_pretrained(args.hf, args.dtype, strict=not args.no_strict)
        print(f"loaded {args.hf} in {time.perf_counter() - start:.1f}s; writing orbax checkpoint to {args.out}")
        save_orbax(args.out, params, cfg)
    else:
        cfg, params = load_orbax(args.orbax, dtype=args.dtype)
        print(f"restored {args.orbax} in {time.perf_counter() - start:.1f}s; writing safetensors to {args.out}")
        save_pretrained(args.out, params, cfg)
    print(f"done in {time.perf_counter() - start:.1f}s")
    return 0
