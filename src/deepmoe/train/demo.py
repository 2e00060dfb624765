"""`make demo`: train the tiny model on the Python standard library for a minute or two, then sample from it.

    python -m deepmoe.train.demo [--steps N] [--out runs/demo]

Re-running continues (or just samples from) the previous demo run in the same directory.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

import jax

from deepmoe.config import preset
from deepmoe.train.checkpoint import CheckpointError
from deepmoe.train.loop import sample, train
from deepmoe.train.step import TrainConfig, model_config_for_training

DEMO_PROMPTS = ("def ", "import ", "class ")


def demo(out: str = "runs/demo", steps: int = 150, prompts: Sequence[str] = DEMO_PROMPTS, n: int = 160,
         temperature: float = 0.7, progress: bool = True) -> dict:
    """Train `tiny` for `steps` steps (batch 8 x 128 bytes, Muon) on the stdlib sources, print the validation
    bits per byte and a sampled continuation of each prompt (temperature 0: greedy, which a model this small
    quickly turns into a loop). Returns {"val_bpb", "samples", "out"}."""
    cfg = preset("tiny")
    tcfg = TrainConfig(steps=steps, batch_size=8, seq_len=128, lr=3e-3, warmup_steps=10, decay_start=0.5,
                       compute_dtype="float32")
    t0 = time.perf_counter()
    try:
        result = train(cfg, tcfg, out, save_every=max(steps // 3, 1), val_batches=4, resume=True,
                       progress=progress)
    except CheckpointError as e:  # an older demo with other settings: keep it, train next to it
        out = f"{out}-{time.strftime('%Y%m%d-%H%M%S')}"
        print(f"{e}\n-> training a new demo in {out}", file=sys.stderr)
        result = train(cfg, tcfg, out, save_every=max(steps // 3, 1), val_batches=4, progress=progress)
    params = jax.device_get(result.state.params)
    mcfg = model_config_for_training(cfg, tcfg)
    val_bpb = result.val["val_bpb"] if result.val else None
    print(f"\ntrained deepmoe tiny for {int(result.state.step)} steps in {time.perf_counter() - t0:.0f}s "
          f"-> validation {val_bpb} bits/byte (uniform over bytes = 8); run files in {out}/")
    samples = {}
    for i, prompt in enumerate(prompts):
        text = sample(params, mcfg, prompt, n, temperature=temperature, key=jax.random.key(i))
        samples[prompt] = text
        print(f"\n--- sample for {prompt!r} (temperature {temperature}) ---\n{text}")
    return {"val_bpb": val_bpb, "samples": samples, "out": str(out)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deepmoe.train.demo", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    demo(args.out, args.steps, temperature=args.temperature, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
