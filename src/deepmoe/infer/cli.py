"""`deepmoe generate`: stream a completion from a checkpoint or a (randomly initialised) preset.

    deepmoe generate --checkpoint runs/tiny --prompt "def fib(" --max-new-tokens 64
    deepmoe generate --checkpoint path/to/DeepSeek-V4-Flash --prompt "Hi" --mode expert --stats
    deepmoe generate --preset tiny --prompt "hello" --speculative --stats

--checkpoint accepts a `deepmoe train` output directory (orbax checkpoints, `deepmoe.train.loop.load_trained`)
or an HF / release safetensors directory (`deepmoe.load_pretrained`). With a tokenizer.json there, --mode picks
the chat template (fast = thinking off, expert = thinking on); otherwise prompts are raw bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from deepmoe.config import KERNELS
from deepmoe.infer.chat import MODES, codec_for


def load_checkpoint(path: str, dtype: str = "bfloat16") -> tuple[Any, dict]:
    """(cfg, params) from a training run directory or a safetensors checkpoint directory."""
    import jax.numpy as jnp

    directory = Path(path)
    if not directory.is_dir():
        raise SystemExit(f"deepmoe generate: checkpoint directory {directory} does not exist")
    if (directory / "checkpoints").is_dir():  # a `deepmoe train --out DIR` directory
        from deepmoe.train.loop import load_trained

        return load_trained(directory)
    if any(directory.glob("*.safetensors")) or (directory / "model.safetensors.index.json").exists():
        from deepmoe.io.pretrained import load_pretrained

        return load_pretrained(directory, jnp.dtype(dtype))
    raise SystemExit(f"deepmoe generate: {directory} is neither a training directory (checkpoints/) nor a "
                     "safetensors checkpoint (config.json + *.safetensors)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deepmoe generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="training run dir or safetensors checkpoint dir")
    source.add_argument("--preset", help="random weights of a preset (tiny, small, ...): a smoke test")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--mode", choices=MODES, default=None,
                   help="chat template: fast (thinking off) or expert (thinking on); needs tokenizer.json")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (and the preset's init seed)")
    p.add_argument("--speculative", action="store_true", help="MTP self-speculative greedy decoding")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="compute dtype, and the storage dtype of safetensors weights (default: the checkpoint's / "
                        "preset's compute dtype, bfloat16 weights)")
    p.add_argument("--kernels", choices=KERNELS, default=None,
                   help="attention core of the prompt prefill: reference (jnp), pallas (pallas_kernels; "
                        "interpreted, so slow, where there is no Pallas lowering, e.g. CPU), auto (Pallas on GPU); "
                        "default: the checkpoint's / preset's")
    p.add_argument("--stats", action="store_true", help="print timings, tokens/s and cache bytes to stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import jax

    import deepmoe as dm
    from deepmoe.infer.accounting import cache_accounting, format_accounting
    from deepmoe.infer.decode import InferenceError
    from deepmoe.infer.generate import generate

    if args.checkpoint:
        cfg, params = load_checkpoint(args.checkpoint, args.dtype or "bfloat16")
    else:
        cfg = dm.preset(args.preset)
        params = dm.init_params(cfg, jax.random.key(args.seed))
    if args.dtype:
        cfg = cfg.replace(compute_dtype=args.dtype)
    codec, has_template = codec_for(cfg, args.checkpoint)
    if args.mode and not has_template:
        print(f"note: no tokenizer.json, so --mode {args.mode} has no chat template to apply; "
              "using the raw prompt bytes", file=sys.stderr)
    try:
        ids = codec.encode_prompt(args.prompt, args.mode if has_template else None)
    except Exception as e:  # noqa: BLE001 -- tokenizer/config mismatch: say what is wrong
        raise SystemExit(f"deepmoe generate: cannot tokenize the prompt for this model: {e}") from e
    feed = codec.stream_decoder()

    def stream(tokens, emitted):
        text = feed(tokens[0][emitted[0]])
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()

    try:
        result = generate(params, cfg, ids[None, :], args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, key=jax.random.key(args.seed), callback=stream,
                          speculative=args.speculative, kernels=args.kernels)
    except InferenceError as e:
        raise SystemExit(f"deepmoe generate: {e}") from e
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.stats:
        stats = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.stats.items()}
        stats["note"] = ("first call in this process: prefill_s / decode_s include tracing and compiling (or loading "
                         "from the compilation cache, deepmoe.backend.compile_cache)")
        print(json.dumps(stats), file=sys.stderr)
        print(format_accounting(cache_accounting(cfg, max_len=result.stats["max_len"])), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
