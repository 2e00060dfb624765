"""How the model's memory grows with context: XLA's memory analysis of the forward (a prefill's work) and of the
train step's gradient program for growing T, with the score tensors in query chunks (`layers.query_chunks`,
the default) and in one piece (budget lifted: the program before chunking), next to `deepmoe plan`'s estimate.

    python experiments/memory_vs_context.py                    # small, T = 1K..8K, fp32, remat full
    python experiments/memory_vs_context.py --preset mini --seq 2048 8192 --budget-mib 16
    python experiments/memory_vs_context.py --quick            # tiny, T = 512, a 1 MiB budget, the forward

Programs are compiled for abstract arguments (nothing is allocated or run), with the attention core that
`kernels="reference"` selects, the one XLA compiles on every platform (the Pallas kernels keep no score
matrices). A compiled program's temporaries (`memory_analysis().temp_size_in_bytes`) are what grows with T
beyond its inputs and outputs. Writes results.json and memory.png (temporaries vs T, log-log) to --out.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from deepmoe import experiment as ex

NAME = "memory_vs_context"
QUICK = dict(preset="tiny", seq=[512], budget_mib=1.0, grad=False)
FULL = dict(preset="small", seq=[1024, 2048, 4096, 8192], budget_mib=None, grad=True)
MODES = ("chunked", "one piece")


def _parse(argv):
    p = ex.parser(__doc__, NAME, quick_help="tiny, T 512, a 1 MiB budget, the forward only")
    p.add_argument("--preset", help="model preset (default small; quick tiny)")
    p.add_argument("--seq", type=int, nargs="+", help="tokens per sequence (default 1024 2048 4096 8192)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    p.add_argument("--remat", choices=["full", "none"], default="full", help="the train step's remat")
    p.add_argument("--budget-mib", type=float, help="score bytes per query chunk (default: deepmoe's, "
                   "query_chunks.SCORE_CHUNK_BYTES)")
    p.add_argument("--grad", action=argparse.BooleanOptionalAction, help="also the train step's gradient program "
                   "(default; quick: --no-grad, the forward only, which compiles several times faster)")
    args = ex.parse(p, argv, QUICK, FULL)
    if min(args.seq) < 1 or (args.budget_mib is not None and args.budget_mib <= 0):
        p.error("--seq and --budget-mib must be positive")
    return args


def _temporaries(cfg, tcfg, seq: int, grad: bool) -> dict[str, int]:
    """Temporaries of the forward and (grad) of the gradient program, compiled for abstract arguments."""
    import jax
    import numpy as np

    import deepmoe as dm
    from deepmoe import train

    ids = jax.ShapeDtypeStruct((1, seq), np.int32)
    params = jax.eval_shape(lambda: train.step.training_layout(dm.init_params(cfg, jax.random.key(0)), cfg, tcfg))
    forward = jax.jit(lambda p, x: dm.forward(p, cfg, x, mtp=False).logits).lower(params, ids).compile()
    out = {"forward": forward.memory_analysis().temp_size_in_bytes}
    if grad:
        state = jax.eval_shape(lambda: train.init_state(cfg, tcfg, jax.random.key(0)))
        gradients = jax.jit(train.step.build_gradient_fn(cfg, tcfg)).lower(state.params, state.step,
                                                                            {"input_ids": ids}).compile()
        out["gradients"] = gradients.memory_analysis().temp_size_in_bytes
    return out


def _planned(cfg, seq: int, remat: str, dtype: str) -> dict[str, float]:
    from deepmoe import plan

    train_opts = plan.PlanOptions(mode="train", seq_len=seq, remat=remat, compute_dtype=dtype, optimizer="adamw")
    infer_opts = plan.PlanOptions(mode="infer", seq_len=seq, compute_dtype=dtype)
    return {"forward": plan.activation_memory(cfg, {}, opts=infer_opts)["total"],
            "gradients": plan.activation_memory(cfg, {}, opts=train_opts)["total"]}


def _plot(results: dict, title: str, path: Path) -> Path:
    programs = [p for p in ("forward", "gradients") if p in results["planned"][0]]
    seqs = results["seq"]
    with ex.figure(path, ncols=len(programs), figsize=(5.5 * len(programs), 4.2)) as (fig, axes):
        axes = axes if len(programs) > 1 else [axes]
        for ax, program in zip(axes, programs):
            for mode, style in zip(MODES, ("o-", "s--")):
                ax.plot(seqs, [r[program] / 2**20 for r in results[mode]], style, label=f"XLA, {mode}")
            ax.plot(seqs, [r[program] / 2**20 for r in results["planned"]], "k:", label="deepmoe plan")
            ax.set(xscale="log", yscale="log", xlabel="tokens per sequence", ylabel="temporaries (MiB)",
                   title=program)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        fig.suptitle(title)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    import deepmoe as dm
    from deepmoe import train
    from deepmoe.layers import query_chunks

    cfg = dm.preset(args.preset).replace(compute_dtype=args.dtype, kernels="reference")
    tcfg = train.TrainConfig(optimizer="adamw", batch_size=1, seq_len=max(args.seq), mtp_weight=0.0,
                             mtp_weight_after_decay=0.0, remat=args.remat, kernels="reference")
    budget = query_chunks.SCORE_CHUNK_BYTES if args.budget_mib is None else int(args.budget_mib * 2**20)
    results = {"seq": args.seq, "planned": [], **{mode: [] for mode in MODES}}
    print(f"{args.preset}, {args.dtype}, remat {args.remat}, budget {budget / 2**20:g} MiB per query chunk: "
          "temporaries (MiB), chunked / one piece / plan")
    default_budget = query_chunks.SCORE_CHUNK_BYTES
    for seq in args.seq:
        step_cfg = tcfg.replace(seq_len=seq)
        for mode in MODES:
            query_chunks.SCORE_CHUNK_BYTES = budget if mode == "chunked" else 2**62  # read when tracing
            try:
                with ex.fast_compile():  # buffers are assigned the same: every HLO pass still runs
                    results[mode].append(_temporaries(cfg, step_cfg, seq, grad=args.grad))
            finally:
                query_chunks.SCORE_CHUNK_BYTES = default_budget
        results["planned"].append({k: v for k, v in _planned(cfg, seq, args.remat, args.dtype).items()
                                   if k in results["chunked"][-1]})
        print(f"T={seq:>6}: " + "; ".join(
            f"{program} {results['chunked'][-1][program] / 2**20:,.1f} / "
            f"{results['one piece'][-1][program] / 2**20:,.1f} / {planned / 2**20:,.1f}"
            for program, planned in results["planned"][-1].items()), flush=True)
    out = ex.output_dir(args)
    title = f"{args.preset}, {args.dtype}, batch 1, remat {args.remat}: XLA temporaries vs context"
    png = _plot(results, title, out / "memory.png")
    ex.write_results(out, NAME, args.quick, [png], preset=args.preset, dtype=args.dtype, remat=args.remat,
                     budget_bytes=budget, temporaries=results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
