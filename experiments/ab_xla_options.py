"""Does an XLA option make the model faster? A paired A/B of two compile-option sets on one preset's train-step
gradients (forward + backward: where a step's time goes) or its forward, in one process.

    python experiments/ab_xla_options.py --b "xla_cpu_prefer_vector_width=512"
    python experiments/ab_xla_options.py --preset small --program forward --rounds 20 --b "..."
    python experiments/ab_xla_options.py --quick           # tiny, A = B: a smoke run (ratio ~1, outputs equal)

Both sets start from deepmoe's own options (`deepmoe.backend.xla_options.compiler_options()`, empty off CPU);
--a and --b add or override `name=value` pairs, separated by `;` (true / false become booleans, integers
ints). The two programs are compiled from the same function and run on the same arguments in alternation, round
after round (`deepmoe.bench.interleaved_times`: a pause, an untimed run, then the timed one), so a busy spell of
a shared machine falls on both: on a 2-core VM whose two identical programs differed by up to 16 % within a
round, the median of 10 rounds' ratios was 0.99. Reported: B's speedup over A (the median over rounds of A's time
/ B's), the rounds' range, and the largest difference between the two programs' outputs (an option that changes
numerics shows there). Two option sets that compile to the same program are reported as such
(`same_program`): an option this jaxlib ignores as a compile option is then only noise. Writes results.json
and ab.png (each round's time of both) to --out.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Sequence

from deepmoe import experiment as ex

NAME = "ab_xla_options"
QUICK = dict(preset="tiny", seq=64, rounds=3)
FULL = dict(preset="mini", seq=512, rounds=10)


def parse_options(text: str) -> dict[str, object]:
    """'a=1;b=true;c=x' -> {"a": 1, "b": True, "c": "x"}."""
    options: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"an option is name=value, got {item!r}")
        lowered = value.strip().lower()
        if lowered in ("true", "false"):
            options[name.strip()] = lowered == "true"
        else:
            try:
                options[name.strip()] = int(value)
            except ValueError:
                options[name.strip()] = value.strip()
    return options


def _parse(argv):
    p = ex.parser(__doc__, NAME, quick_help="tiny, seq 64, 3 rounds")
    p.add_argument("--preset", help="model preset (default mini; quick tiny)")
    p.add_argument("--program", choices=["train", "forward"], default="train")
    p.add_argument("--seq", type=int, help="tokens per sequence (default 512; quick 64)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    p.add_argument("--a", default="", help="options of A (the baseline), name=value;...")
    p.add_argument("--b", default="", help="options of B (the candidate), name=value;...")
    p.add_argument("--rounds", type=int, help="rounds of A and B (default 10; quick 3)")
    args = ex.parse(p, argv, QUICK, FULL)
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    try:
        args.options = {"A": parse_options(args.a), "B": parse_options(args.b)}
    except ValueError as err:
        p.error(str(err))
    return args


def _program(cfg, program: str, seq: int):
    """(function, its arguments): the train step's gradient half, or the forward's logits."""
    import jax
    import numpy as np

    import deepmoe as dm
    from deepmoe import train

    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (1, seq))
    tcfg = train.TrainConfig(optimizer="adamw", batch_size=1, seq_len=seq, mtp_weight=0.0,
                             mtp_weight_after_decay=0.0)
    if program == "train":
        state = train.init_state(cfg, tcfg, jax.random.key(0))
        return train.step.build_gradient_fn(cfg, tcfg), (state.params, state.step, {"input_ids": ids})
    params = train.step.training_layout(dm.init_params(cfg, jax.random.key(0)), cfg, tcfg)
    return (lambda p, x: dm.forward(p, cfg, x, mtp=False).logits), (params, ids)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    import jax
    import numpy as np

    import deepmoe as dm
    from deepmoe import bench
    from deepmoe.backend import xla_options
    from deepmoe.bench_plot import plot_comparison

    base = xla_options.compiler_options() or {}
    for side, options in args.options.items():  # on something trivial first: a refused option fails at once
        try:
            jax.jit(lambda x: x + 1, compiler_options={**base, **options}).lower(1.0).compile()
        except Exception as err:  # noqa: BLE001 - XLA names the option or value it refuses; say which set
            print(f"option set {side} ({options}) is refused by XLA: {err}", file=sys.stderr)
            return 2
    cfg = dm.preset(args.preset).replace(compute_dtype=args.dtype)
    fn, fn_args = _program(cfg, args.program, args.seq)
    compiled, compile_s = {}, {}
    for side, options in args.options.items():
        start = time.perf_counter()
        compiled[side] = jax.jit(fn, compiler_options={**base, **options}).lower(*fn_args).compile()
        compile_s[side] = time.perf_counter() - start
    # Some options are accepted as compile options and change nothing: this jaxlib reads
    # xla_cpu_enable_concurrency_optimized_scheduler only from XLA_FLAGS. Timing two identical programs would
    # only measure noise, so say so.
    same_program = compiled["A"].as_text() == compiled["B"].as_text()
    if same_program and args.options["A"] != args.options["B"]:
        print("A and B compiled to the same program: XLA accepted the options but did not apply them as compile "
              "options. Compare them in two processes with XLA_FLAGS instead.", file=sys.stderr)
    outputs = {side: jax.tree.leaves(program(*fn_args)) for side, program in compiled.items()}
    max_diff = max((float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
                    for a, b in zip(outputs["A"], outputs["B"]) if np.asarray(a).size), default=0.0)
    print(f"{args.preset} {args.program}, seq {args.seq}, {args.dtype}: {args.rounds} rounds of A {args.options['A']}"
          f" and B {args.options['B']} (on top of {base}) ...")
    times = bench.interleaved_times({side: (lambda c=c: jax.block_until_ready(c(*fn_args)))
                                     for side, c in compiled.items()}, args.rounds)
    timing_b = bench.timing(times["B"], args.seq)
    versus = bench.versus(times["B"], times["A"], args.seq)  # A's timing, B's speedup over it
    each = versus["speedup_each"]
    out = ex.output_dir(args)
    title = (f"{args.preset} {args.program}, seq {args.seq}, {args.dtype}: "
             f"B {args.options['B']} vs A {args.options['A']}")
    part = {"train": "gradients", "forward": "forward"}[args.program]
    png = plot_comparison({part: (timing_b, versus)}, title, str(out / "ab.png"), labels=("B", "A"))
    print(f"A {1e3 * np.median(times['A']):.1f} ms, B {1e3 * np.median(times['B']):.1f} ms (medians); "
          f"B's speedup over A {versus['speedup']:.3f}x (rounds {min(each):.3f}-{max(each):.3f}x); "
          f"outputs differ by at most {max_diff:.2e}")
    ex.write_results(out, NAME, args.quick, [Path(png)], preset=args.preset, program=args.program, seq=args.seq,
                     dtype=args.dtype, base_options=base, options=args.options, compile_s=compile_s,
                     seconds_each=times, speedup_of_b=versus["speedup"], speedup_of_b_each=each,
                     max_abs_output_difference=max_diff, same_program=same_program)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
