"""Where a compiled program's time goes: a `jax.profiler` trace of a few runs, every executed HLO op's time
attributed to the model component that emitted it and to the forward or the backward pass.

Components come from the named scopes of layers/block.py (`attention`, `moe`, `mhc_pre` / `mhc_post` -> `mhc`)
in each op's `op_name` metadata; the backward is what JAX emits under `transpose(...)`. Ops outside those scopes
are either the layer scan moving weights and gradients in and out of their stacks (dynamic slices / updates:
`layer slices`) or the rest (embedding, head, loss: `other`); ops XLA made without source metadata count
for a neighbour's source (`hlo_ops`), `no source` when none has one. Times are summed over the executing
threads (XLA:CPU runs independent ops on several cores at once, so the sum can exceed the wall time). A while
loop's or call's event spans the events of its body's ops: each op counts its self time (its duration less
that of the events nested in it), so nothing is counted twice and a loop keeps only its own overhead.

Beside the components, the matmuls: each op's matmul FLOPs per execution, read from the HLO (a `dot`, the dots
of the computation a fusion calls, a library GEMM custom call: 2 x output elements x contracted size; or one of
`pallas_kernels`' grouped matmuls on GPU: 2 x rows x contracted size x columns), times
its executions, against the op time of the ops that hold them. Their rate, next to the measured peak, says how
much of the MFU gap is slow matmuls and how much is time spent outside them.
Used by `deepmoe bench --profile`.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import re
import time
from typing import Any, Callable, Iterable

SCOPES = {"attention": "attention", "moe": "moe", "mhc_pre": "mhc", "mhc_post": "mhc"}
_OP_LINE = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*)$")
_COMPUTATION = re.compile(r"(?:ENTRY )?%?([\w.\-]+) .*\{$")  # `%fused_computation.3 (p: f32[2]) -> f32[2] {`
_GEMM_TARGETS = ("gemm", "matmul")  # custom-call targets of library matmuls: __cublas$gemm, __cublas$lt$matmul, ...
# pallas_kernels' grouped matmuls, Triton custom calls named in their backend config: kernel -> operand index of
# their lhs [M, K] (gmm: offsets, tile bounds, lhs, rhs [G, K, N] -> [M, N]; tgmm: offsets, lhs, dout -> [G, K, N]).
# Each of the M rows meets one group's matrix: 2 M K N.
_GROUPED_MATMULS = {"gmm": 3, "tgmm": 1}


@dataclasses.dataclass(frozen=True)
class HloOp:
    name: str
    opcode: str
    op_name: str  # the JAX source path (named scopes) from the op's metadata; "" when it has none
    flops: int = 0  # matmul FLOPs per execution (module docstring)


@dataclasses.dataclass
class OpTime:
    module: str
    op: HloOp
    ms_per_run: float  # summed over the op's executions in one run
    count_per_run: float  # executions per run (a loop body's op runs once per iteration)


def _opcode(rest: str) -> str:
    """The opcode in `TYPE opcode(...)`, TYPE possibly a tuple `(s32[], f32[2]{0})`."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                rest = rest[i + 1:]
                break
    else:
        rest = rest.split(" ", 1)[1] if " " in rest else ""
    match = re.match(r"\s*([\w\-]+)\(", rest)
    return match.group(1) if match else ""


def keep_ops_in_trace() -> None:
    """Turn XLA's GPU command buffers off for this process: they run many ops as one CUDA-graph launch, and the
    trace then has no per-op events to attribute (openxla/xprof#3070). Call it before JAX starts a backend (XLA
    reads XLA_FLAGS once, so once one has started this does nothing); an explicit
    `xla_gpu_enable_command_buffer` in XLA_FLAGS is left as it is. No effect off GPU."""
    from deepmoe.backend.xla_options import add_xla_flag

    add_xla_flag("--xla_gpu_enable_command_buffer=")


def _dims(type_text: str) -> list[int]:
    """The dimensions of the first array shape in an HLO type (`f32[8,160,256]{2,1,0}`, or a tuple's first)."""
    match = re.search(r"\w+\[([\d,]*)\]", type_text)
    return [int(d) for d in match.group(1).split(",") if d] if match else []


def _matmul_flops(opcode: str, rest: str, operands: list[str], dims: dict[str, list[int]]) -> int:
    """2 x output elements x contracted size of a `dot` or a library GEMM custom call, 2 M K N of a Pallas grouped
    matmul; 0 for any other op."""
    target = re.search(r'custom_call_target="([^"]*)"', rest) if opcode == "custom-call" else None
    kernel = re.search(r'\bname = "(\w+)"', rest) if target and "triton" in target.group(1) else None
    if kernel and kernel.group(1) in _GROUPED_MATMULS:
        index = _GROUPED_MATMULS[kernel.group(1)]
        lhs, out = (dims.get(operands[index], []) if len(operands) > index else []), _dims(rest)
        return 2 * lhs[0] * lhs[1] * out[-1] if len(lhs) == 2 and out else 0
    if opcode == "dot":
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
    elif target and any(t in target.group(1).lower() for t in _GEMM_TARGETS):
        contracting = re.search(r'"lhs_?[cC]ontracting_?[dD]imensions":\[([^\]]*)\]', rest)
    else:
        return 0
    lhs = dims.get(operands[0], []) if operands else []
    if not contracting or not lhs:
        return 0
    size = 1
    for d in re.findall(r"\d+", contracting.group(1)):
        size *= lhs[int(d)]
    out = 1
    for d in _dims(rest):
        out *= d
    return 2 * out * size


def hlo_ops(hlo_text: str) -> tuple[str, dict[str, HloOp]]:
    """(module name, {op name: HloOp}) of a compiled program's HLO text (`compiled.as_text()`). An op XLA made
    without a source path (e.g. a dot it split off a fusion) takes the path of an op that consumes it or, failing
    that, of one it consumes. A fusion's matmul FLOPs are those of the computation it calls (a loop or call
    is not a fusion: its body's ops are traced, and counted, on their own)."""
    header = re.match(r"HloModule ([\w.\-]+)", hlo_text)
    parsed: dict[str, tuple[str, str, list[str]]] = {}
    lines: list[tuple[str, str, str]] = []  # (computation, op name, text after ` = `)
    dims: dict[str, list[int]] = {}
    computation = ""
    for line in hlo_text.splitlines():
        match = _OP_LINE.match(line)
        if not match:
            started = _COMPUTATION.match(line) if not line.startswith(" ") else None
            computation = started.group(1) if started else computation
            continue
        name, rest = match.groups()
        op_name = re.search(r'op_name="([^"]*)"', rest)
        parsed[name] = (_opcode(rest), op_name.group(1) if op_name else "", re.findall(r"%([\w.\-]+)", rest))
        lines.append((computation, name, rest))
        dims[name] = _dims(rest)
    own = {name: _matmul_flops(parsed[name][0], rest, parsed[name][2], dims) for _, name, rest in lines}
    fused = {name: re.findall(r"calls=%([\w.\-]+)", rest) if parsed[name][0] == "fusion" else []
             for _, name, rest in lines}
    members: dict[str, list[str]] = collections.defaultdict(list)
    for comp, name, _ in lines:
        members[comp].append(name)
    memo: dict[str, int] = {}

    def flops(name: str) -> int:  # the op's own matmuls and, for a fusion, those of its (nested) computations
        if name not in memo:
            memo[name] = own[name] + sum(flops(member) for comp in fused[name] for member in members[comp])
        return memo[name]

    paths = {name: path for name, (_, path, _) in parsed.items()}
    users: dict[str, list[str]] = collections.defaultdict(list)
    for name, (_, _, operands) in parsed.items():
        for operand in operands:
            users[operand].append(name)
    for _ in range(4):  # chains of such ops: a few passes reach a named neighbour
        for name, (_, _, operands) in parsed.items():
            if not paths[name]:
                paths[name] = next((paths[n] for n in users[name] + operands if paths.get(n)), "")
    ops = {name: HloOp(name, opcode, paths[name], flops(name)) for name, (opcode, _, _) in parsed.items()}
    return (header.group(1) if header else ""), ops


def component(op: HloOp) -> str:
    """`attention`, `moe`, `mhc`, `layer slices`, `other` (from the source, outside those scopes) or `no source`,
    with ` (backward)` for the backward pass."""
    if not op.op_name:
        return "no source"
    # a scope at the top of a transformed function reads `jvp(moe)`, `transpose(jvp(moe))`, ...
    path = [re.sub(r"^(?:[\w]+\()+([^()]*)\)+$", r"\1", part) for part in op.op_name.split("/")]
    name = next((SCOPES[p] for p in path if p in SCOPES), None)
    if name is None:
        name = "layer slices" if re.search(r"dynamic_(update_)?(slice|index_in_dim)", op.op_name) else "other"
    return name + (" (backward)" if "transpose(" in op.op_name else "")


def _self_times(events: list[tuple[int, int, Any]]) -> list[tuple[Any, float]]:
    """(start ns, duration ns, key) events of one thread -> (key, self time ms): each event's duration less its
    directly nested events' (a while loop's or call's event spans the ops of its body)."""
    events = sorted(events, key=lambda e: (e[0], -e[1]))
    self_ns = [float(d) for _, d, _ in events]
    open_: list[int] = []
    for i, (start, duration, _) in enumerate(events):
        while open_ and events[open_[-1]][0] + events[open_[-1]][1] <= start:
            open_.pop()
        if open_:
            self_ns[open_[-1]] -= duration
        open_.append(i)
    return [(key, ns / 1e6) for (_, _, key), ns in zip(events, self_ns)]


def _trace_events(trace_dir: str) -> list[tuple[tuple[str, str], float]]:
    """((hlo module, hlo op), self time ms) of every op event in the newest trace under trace_dir. On
    accelerators the device planes hold the op events (host planes only their launches): used when present."""
    from jax.profiler import ProfileData

    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"jax.profiler wrote no trace under {trace_dir}")
    events: dict[bool, list] = {True: [], False: []}
    for plane in ProfileData.from_file(files[-1]).planes:
        on_device = plane.name.startswith("/device:") and not plane.name.startswith("/device:CPU")
        for line in plane.lines:
            ops = []
            for event in line.events:
                stats = dict(event.stats)
                if "hlo_op" in stats:
                    key = (str(stats.get("hlo_module", "")), str(stats["hlo_op"]))
                    ops.append((event.start_ns, event.duration_ns, key))
            events[on_device] += _self_times(ops)
    return events[True] or events[False]


def profile_runs(run: Callable[[], Any], programs: Iterable[tuple[str, str | None]], trace_dir: str,
                 runs: int = 3) -> dict[str, Any]:
    """Trace `runs` calls of `run` (already compiled and warmed up) and attribute the op time of the programs
    it runs: (HLO text from `compiled.as_text()`, None to split it into components or one component name for
    all its ops, e.g. "optimizer update"). Returns {"wall_ms_per_run", "op_ms_per_run",
    "components": {name: ms per run}, "ops": [OpTime, ...] slowest first}."""
    import jax

    modules, lumped = {}, {}
    for text, lump in programs:
        module, ops = hlo_ops(text)
        if module in modules:  # the trace names ops by (module, op): two programs of one name cannot be told apart
            raise ValueError(f"two programs are both named {module!r}: give their functions different names")
        modules[module], lumped[module] = ops, lump
    jax.profiler.start_trace(trace_dir)
    start = time.perf_counter()
    try:
        for _ in range(runs):
            jax.block_until_ready(run())
    finally:
        wall = time.perf_counter() - start
        jax.profiler.stop_trace()
    ms: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for (module, op), duration in _trace_events(trace_dir):
        # XLA names the module after the jitted function; the trace may add a suffix (jit_step.1)
        base = next((m for m in modules if module == m or module.startswith(m + ".")), None)
        if base is None or op not in modules[base]:
            continue
        ms[(base, op)] += duration
        count[(base, op)] += 1
    ops = sorted((OpTime(m, modules[m][o], ms[(m, o)] / runs, count[(m, o)] / runs) for m, o in ms),
                 key=lambda t: -t.ms_per_run)
    components: collections.Counter = collections.Counter()
    for t in ops:
        components[lumped[t.module] or component(t.op)] += t.ms_per_run
    matmul_ops = [t for t in ops if t.op.flops]
    matmul_flops = sum(t.op.flops * t.count_per_run for t in matmul_ops)
    matmul_ms = sum(t.ms_per_run for t in matmul_ops)
    return {"wall_ms_per_run": 1e3 * wall / runs, "op_ms_per_run": sum(t.ms_per_run for t in ops),
            "components": dict(components.most_common()), "ops": ops,
            "matmul": {"flops_per_run": matmul_flops, "op_ms_per_run": matmul_ms,
                       "flops_per_s": 1e3 * matmul_flops / matmul_ms if matmul_ms else 0.0}}


def summary(profile: dict[str, Any], top: int = 8) -> dict[str, Any]:
    """The JSON-able part: times per component and the `top` slowest ops."""
    return {"wall_ms_per_run": profile["wall_ms_per_run"], "op_ms_per_run": profile["op_ms_per_run"],
            "components": profile["components"], "matmul": profile["matmul"],
            "top_ops": [{"module": t.module, "op": t.op.name, "opcode": t.op.opcode, "source": t.op.op_name,
                         "ms_per_run": t.ms_per_run, "count_per_run": t.count_per_run}
                        for t in profile["ops"][:top]]}


def format_profile(title: str, profile: dict[str, Any]) -> str:
    total = profile["op_ms_per_run"] or 1.0
    lines = [f"{title}: {profile['wall_ms_per_run']:.1f} ms per run (wall), {profile['op_ms_per_run']:.1f} ms of "
             "op time summed over threads"]
    lines += [f"  {name:<26} {ms:9.1f} ms {100 * ms / total:5.1f} %" for name, ms in profile["components"].items()]
    mm = profile.get("matmul", {})
    if mm.get("flops_per_s"):
        of_model = f" ({mm['per_model_flop']:.2f}x the model's)" if "per_model_flop" in mm else ""
        of_peak = f", {100 * mm['peak_share']:.0f} % of the measured peak" if "peak_share" in mm else ""
        lines.append(f"  matmuls: {mm['flops_per_run'] / 1e9:.3g} GFLOP per run{of_model} in {mm['op_ms_per_run']:.1f} "
                     f"ms of op time, {mm['flops_per_s'] / 1e9:.1f} GFLOP/s{of_peak}; every other op "
                     f"{profile['op_ms_per_run'] - mm['op_ms_per_run']:.1f} ms")
    return "\n".join(lines)


COMPONENT_ORDER = ("attention", "moe", "mhc", "layer slices", "other", "no source")


def _plot_order(name: str) -> tuple[int, str]:
    base = name.replace(" (backward)", "")
    rank = COMPONENT_ORDER.index(base) if base in COMPONENT_ORDER else len(COMPONENT_ORDER)
    return 2 * rank + ("(backward)" in name), name


def _matmul_label(profile: dict[str, Any]) -> str:
    """`matmuls 55 % at 79 GFLOP/s`: their share of the op time and their rate, when the profile has them."""
    mm = profile.get("matmul", {})
    if not (mm.get("flops_per_s") and profile["op_ms_per_run"]):
        return ""
    return (f"\nmatmuls {100 * mm['op_ms_per_run'] / profile['op_ms_per_run']:.0f} % at "
            f"{mm['flops_per_s'] / 1e9:.0f} GFLOP/s")


def plot_profiles(profiles: dict[str, dict[str, Any]], path: str) -> str:
    """One horizontal stacked bar per profile (`profile_runs` or `summary` output, keyed by title): each
    component's share of the program's op time, each component's forward and backward in a dark / light pair,
    the program's op time per run in its label (shares, not ms: a decode step is ~50x shorter than a forward);
    written to `path` (PNG). Where the profile has them, the label adds the matmuls' share of the op time and
    their rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({c for p in profiles.values() for c in p["components"]}, key=_plot_order)
    labels = [f"{title}\n{p['op_ms_per_run']:.1f} ms{_matmul_label(p)}" for title, p in profiles.items()]
    totals = [max(p["op_ms_per_run"], 1e-12) for p in profiles.values()]
    fig, ax = plt.subplots(figsize=(10, 1.4 + 0.6 * len(profiles)))
    left = [0.0] * len(profiles)
    colors = plt.get_cmap("tab20").colors
    for name in names:
        widths = [100 * p["components"].get(name, 0.0) / total for p, total in zip(profiles.values(), totals)]
        ax.barh(labels, widths, left=left, label=name, color=colors[_plot_order(name)[0] % len(colors)])
        left = [a + b for a, b in zip(left, widths)]
    ax.set_xlim(0, 100)
    ax.set_xlabel("share of the program's op time per run (%, summed over threads)")
    ax.invert_yaxis()
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
