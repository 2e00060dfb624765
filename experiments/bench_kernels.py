"""Benchmark every pallas_kernels kernel against its reference (and the naive dense oracle for attention).

For growing sequence length T it records, per implementation, the median wall time of a few runs after
compilation and the compiled memory (``jitted.lower(...).compile().memory_analysis()``: temporaries, i.e.
what grows with T beyond inputs and outputs), then fits the growth exponent of that memory in T. The attention
kernels should grow ~T^1 (memory O(T * (window + k))) while the dense oracle grows ~T^2.

On a CPU host the Pallas kernels run interpreted: their memory numbers are meaningful, their times are not
(the interpreter executes the grid as a sequential loop). On a GPU they run compiled through Triton.

    python experiments/bench_kernels.py --quick          # ~1-2 min on 2 CPU cores
    python experiments/bench_kernels.py --grad           # forward + backward

Writes runs/bench_kernels/results.json and runs/bench_kernels/bench_kernels.png, and prints a table.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk

B, H, D, WINDOW = 1, 4, 64, 64  # attention
HCA_RATIO, CSA_RATIO, TOPK = 16, 4, 32  # compressed attention / indexer
IDX_HEADS, IDX_DIM = 4, 32  # indexer
EXPERTS, EXPERTS_PER_TOKEN, FFN = 64, 6, 128  # routing / grouped matmul


def _normal(seed, *shapes):
    """Standard-normal float32 arrays drawn by numpy and placed with device_put: jax.random (and jnp.asarray of a
    numpy array) would compile a program per shape."""
    rng = np.random.default_rng(seed)
    return [jax.device_put(rng.standard_normal(shape, np.float32)) for shape in shapes]


def _attention_inputs(t, ratio):
    n = t // ratio
    q, kv, sinks, ckv = _normal(0, (B, t, H, D), (B, t, D), (H,), (B, n, D))
    end_idx = jnp.broadcast_to((jnp.arange(n) + 1) * ratio - 1, (B, n)).astype(jnp.int32)
    return q, kv, sinks, ckv, end_idx


def _csa_selection(t, end_idx):
    visible = end_idx[:, None, :] <= jnp.arange(t)[None, :, None]
    uniform = np.random.default_rng(5).random(visible.shape, np.float32)
    score = jnp.where(visible, uniform, -1.0)
    vals, idx = jax.lax.top_k(score, min(TOPK, end_idx.shape[1]))
    return jnp.where(vals >= 0, idx, -1)


def problems(t, pallas_kw):
    """name -> (inputs, {impl: fn(*inputs) -> array}) at sequence length t."""
    out = {}
    (logits,) = _normal(1, (t, EXPERTS))
    bias = jnp.zeros((EXPERTS,))
    route = lambda impl: lambda lg, b: pk.route(lg, b, top_k=EXPERTS_PER_TOKEN, impl=impl, **pallas_kw(impl)).weights
    out["routing"] = ((logits, bias), {i: route(i) for i in ("pallas", "reference")})

    lhs, rhs = _normal(2, (t, FFN), (8, FFN, FFN))
    sizes = jnp.full((8,), t // 8, jnp.int32).at[0].add(t % 8)
    gmm = lambda impl: lambda a, b: pk.gmm(a, b, sizes, impl=impl, **pallas_kw(impl))
    out["grouped_matmul"] = ((lhs, rhs), {i: gmm(i) for i in ("pallas", "reference")})

    q, kv, sinks, _, _ = _attention_inputs(t, HCA_RATIO)
    win = lambda impl: functools.partial(pk.window_attention, window=WINDOW, impl=impl, **pallas_kw(impl))
    out["window_attention"] = ((q, kv, sinks), {
        "pallas": win("pallas"), "reference": win("reference"),
        "dense": functools.partial(pk.window_attention_dense, window=WINDOW)})

    q, kv, sinks, ckv, end_idx = _attention_inputs(t, HCA_RATIO)
    hca = dict(window=WINDOW, end_idx=end_idx)
    comp = lambda impl, kw: functools.partial(pk.compressed_attention, **kw, impl=impl, **pallas_kw(impl))
    out["hca_attention"] = ((q, kv, sinks, ckv), {
        "pallas": comp("pallas", hca), "reference": comp("reference", hca),
        "dense": functools.partial(pk.compressed_attention_dense, **hca)})

    q, kv, sinks, ckv, end_idx = _attention_inputs(t, CSA_RATIO)
    csa = dict(window=WINDOW, topk_idx=_csa_selection(t, end_idx))
    out["csa_attention"] = ((q, kv, sinks, ckv), {
        "pallas": comp("pallas", csa), "reference": comp("reference", csa),
        "dense": functools.partial(pk.compressed_attention_dense, **csa)})

    n = t // CSA_RATIO
    iq, iw, ik = _normal(7, (B, t, IDX_HEADS, IDX_DIM), (B, t, IDX_HEADS), (B, n, IDX_DIM))
    topk = lambda impl: lambda q, w, k: pk.indexer_topk(q, w, k, end_idx, top_k=min(TOPK, n), impl=impl,
                                                        **pallas_kw(impl))[0]
    out["indexer_topk"] = ((iq, iw, ik), {i: topk(i) for i in ("pallas", "reference")})
    return out


def _with_grad(fn, n_args):
    """fn -> forward + backward w.r.t. every float input, summed against a fixed cotangent."""
    def run(*args):
        floats = [i for i, a in enumerate(args[:n_args]) if jnp.issubdtype(a.dtype, jnp.floating)]

        def loss(*fl):
            full = list(args)
            for i, x in zip(floats, fl):
                full[i] = x
            return jnp.sum(fn(*full).astype(jnp.float32) ** 2)

        return jax.grad(loss, argnums=tuple(range(len(floats))))(*[args[i] for i in floats])
    return run


def measure(fn, args, repeats):
    jitted = jax.jit(fn)
    compiled = jitted.lower(*args).compile()
    mem = compiled.memory_analysis()
    temp = int(getattr(mem, "temp_size_in_bytes", 0)) if mem is not None else -1
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times), temp


def growth_exponent(ts, values):
    """Least-squares slope of log(value) against log(T): ~1 linear, ~2 quadratic."""
    pts = [(math.log(t), math.log(v)) for t, v in zip(ts, values) if v > 0]
    if len(pts) < 2:
        return float("nan")
    x, y = np.array(pts).T
    return float(np.polyfit(x, y, 1)[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small T range, fewer repeats")
    parser.add_argument("--grad", action="store_true", help="time forward + backward instead of forward only")
    parser.add_argument("--seq", type=int, nargs="*", help="sequence lengths (default depends on --quick)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--kernels", nargs="*", default=None, help="subset of kernel names")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_kernels"))
    args = parser.parse_args(argv)

    seqs = args.seq or ([256, 512, 1024] if args.quick else [256, 512, 1024, 2048, 4096])
    repeats = args.repeats or (3 if args.quick else 5)
    platform = jax.default_backend()
    interpret = platform not in pk.AUTO_PALLAS_PLATFORMS
    pallas_kw = lambda impl: {"interpret": interpret} if impl == "pallas" else {}
    print(f"platform={platform} pallas={'interpreted' if interpret else 'compiled'} grad={args.grad} T={seqs}")

    rows = []
    for t in seqs:
        kernels = problems(t, pallas_kw)
        unknown = sorted(set(args.kernels or ()) - set(kernels))
        if unknown:  # else they would be skipped in silence, leaving an empty table
            parser.error(f"unknown kernel name(s) {', '.join(unknown)}; known: {', '.join(kernels)}")
        for name, (inputs, impls) in kernels.items():
            if args.kernels and name not in args.kernels:
                continue
            for impl, fn in impls.items():
                fn = _with_grad(fn, len(inputs)) if args.grad else fn
                seconds, temp = measure(fn, inputs, repeats)
                rows.append(dict(kernel=name, impl=impl, T=t, time_ms=seconds * 1e3, temp_bytes=temp))
                print(f"  T={t:6d} {name:17s} {impl:9s} {seconds * 1e3:10.2f} ms {temp / 2**20:10.2f} MiB", flush=True)

    summary = {}
    for name in dict.fromkeys(r["kernel"] for r in rows):
        for impl in dict.fromkeys(r["impl"] for r in rows if r["kernel"] == name):
            sel = [r for r in rows if r["kernel"] == name and r["impl"] == impl]
            summary[f"{name}/{impl}"] = growth_exponent([r["T"] for r in sel], [r["temp_bytes"] for r in sel])

    print_table(rows, summary, seqs)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(platform=platform, interpret=interpret, grad=args.grad, seqs=seqs, repeats=repeats,
                shapes=dict(B=B, H=H, D=D, window=WINDOW, hca_ratio=HCA_RATIO, csa_ratio=CSA_RATIO, top_k=TOPK,
                            indexer_heads=IDX_HEADS, indexer_dim=IDX_DIM, experts=EXPERTS,
                            experts_per_token=EXPERTS_PER_TOKEN, ffn=FFN))
    (args.out / "results.json").write_text(json.dumps(dict(meta=meta, rows=rows, memory_exponent=summary), indent=1))
    plot(rows, summary, args.out / "bench_kernels.png", meta)
    print(f"wrote {args.out / 'results.json'} and {args.out / 'bench_kernels.png'}")
    return 0


def print_table(rows, summary, seqs):
    header = f"{'kernel':17s} {'impl':9s} " + " ".join(f"{'T=' + str(t):>19s}" for t in seqs) + "   mem ~T^x"
    print("\n" + header + "\n" + " " * 28 + "   (time ms / temp MiB)" + "\n" + "-" * len(header))
    for key, exponent in summary.items():
        name, impl = key.split("/")
        cells = []
        for t in seqs:
            r = next((r for r in rows if r["kernel"] == name and r["impl"] == impl and r["T"] == t), None)
            cells.append(f"{r['time_ms']:9.2f}/{r['temp_bytes'] / 2**20:9.2f}" if r else " " * 19)
        print(f"{name:17s} {impl:9s} " + " ".join(cells) + f"   {exponent:5.2f}")


def plot(rows, summary, path, meta):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kernels = list(dict.fromkeys(r["kernel"] for r in rows))
    fig, axes = plt.subplots(2, len(kernels), figsize=(3.6 * len(kernels), 6.5), squeeze=False)
    for col, name in enumerate(kernels):
        for impl in dict.fromkeys(r["impl"] for r in rows if r["kernel"] == name):
            sel = [r for r in rows if r["kernel"] == name and r["impl"] == impl]
            ts = [r["T"] for r in sel]
            label = f"{impl} (~T^{summary[f'{name}/{impl}']:.1f})"
            axes[0, col].loglog(ts, [r["time_ms"] for r in sel], "o-", label=impl)
            axes[1, col].loglog(ts, [max(r["temp_bytes"], 1) / 2**20 for r in sel], "o-", label=label)
        axes[0, col].set_title(name)
        axes[0, col].set_ylabel("time [ms]")
        axes[1, col].set_ylabel("compiled temp memory [MiB]")
        axes[1, col].set_xlabel("T")
        for ax in axes[:, col]:
            ax.legend(fontsize=7)
            ax.grid(True, which="both", alpha=0.3)
    mode = "interpreted" if meta["interpret"] else "compiled"
    fig.suptitle(f"pallas_kernels on {meta['platform']} (Pallas {mode}; {'fwd+bwd' if meta['grad'] else 'fwd'})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
