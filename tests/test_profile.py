"""deepmoe.profile: op times from a real jax.profiler trace, attributed by named scope, forward vs backward,
loop bodies counted per iteration and loops not counted twice (self times); checked on programs whose structure
(scopes, trip counts, which part does ~all the FLOPs) is known by construction."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax._src import xla_bridge

from deepmoe.profile import (_matmul_label, _self_times, component, hlo_ops, keep_ops_in_trace, plot_profiles,
                             profile_runs)


def _scoped(w, x, n):
    with jax.named_scope("attention"):  # ~all the FLOPs: a chain of 512^3 matmuls
        for _ in range(4):
            x = jnp.tanh(x @ w)
    with jax.named_scope("moe"):  # n iterations of a small loop body
        def body(i, v):
            return jnp.sin(v @ w[:64, :64]) + i.astype(v.dtype)
        y = jax.lax.fori_loop(0, n, body, x[:64, :64] / 8)
    return x.sum() + y.sum()


@pytest.fixture(scope="module")
def scoped_program():
    w = jax.random.normal(jax.random.key(0), (512, 512)) / 23
    x = jax.random.normal(jax.random.key(1), (512, 512))
    n = jnp.int32(7)  # traced: the loop stays a while loop
    compiled = jax.jit(_scoped).lower(w, x, n).compile()
    compiled(w, x, n).block_until_ready()
    return compiled, (w, x, n)


def test_hlo_ops_reads_opcodes_and_sources(scoped_program):
    compiled, _ = scoped_program
    module, ops = hlo_ops(compiled.as_text())
    assert module.startswith("jit__scoped")
    whiles = [op for op in ops.values() if op.opcode == "while"]
    assert len(whiles) == 1 and "moe" in whiles[0].op_name.split("/")
    dots = {component(op) for op in ops.values() if op.op_name.endswith("dot_general")}
    assert dots == {"attention", "moe"}


def test_profile_attributes_time_and_counts_loop_iterations(scoped_program, tmp_path):
    compiled, args = scoped_program
    runs = 3
    prof = profile_runs(lambda: compiled(*args), [(compiled.as_text(), None)], str(tmp_path), runs=runs)
    comps = prof["components"]
    assert set(comps) <= {"attention", "moe", "other", "no source"} and {"attention", "moe"} <= set(comps)
    # 4 x 2*512^3 FLOPs against 7 x 2*64^3 (~150x): the first scope takes the bulk of the op time
    assert comps["attention"] > comps["moe"]
    assert abs(sum(comps.values()) - prof["op_ms_per_run"]) < 1e-9
    # an op of the loop body runs once per iteration: 7 per run; the rest once
    body = [op for op in prof["ops"] if "/while/body/" in op.op.op_name]
    assert body and all(op.count_per_run == 7 for op in body)
    assert all(op.count_per_run == 1 for op in prof["ops"] if "while" not in op.op.op_name)
    loop = [op for op in prof["ops"] if op.op.opcode == "while"]  # kept with its self time (see below)
    assert len(loop) == 1 and loop[0].count_per_run == 1 and loop[0].ms_per_run >= 0
    # the matmuls executed per run, by hand: 4 products of 512^3 and 7 loop iterations of a 64^3 one
    matmul = prof["matmul"]
    assert matmul["flops_per_run"] == 4 * 2 * 512 ** 3 + 7 * 2 * 64 ** 3
    holders = [op for op in prof["ops"] if op.op.flops]
    assert 0 < matmul["op_ms_per_run"] == pytest.approx(sum(op.ms_per_run for op in holders), rel=1e-12)
    assert matmul["op_ms_per_run"] <= prof["op_ms_per_run"] and not any(op.op.opcode == "while" for op in holders)
    assert matmul["flops_per_s"] == pytest.approx(matmul["flops_per_run"] / (matmul["op_ms_per_run"] / 1e3))


_GPU_LIKE_HLO = """HloModule jit_step, entry_computation_layout={(f32[64,32]{1,0}, f32[32,16]{1,0})->f32[64,16]{1,0}}

%gemm_fusion_dot (p0: bf16[8,64,32], p1: bf16[8,32,16]) -> bf16[8,64,16] {
  %p0 = bf16[8,64,32]{2,1,0} parameter(0)
  %p1 = bf16[8,32,16]{2,1,0} parameter(1)
  ROOT %dot.1 = bf16[8,64,16]{2,1,0} dot(bf16[8,64,32]{2,1,0} %p0, bf16[8,32,16]{2,1,0} %p1), lhs_batch_dims={0}, \
lhs_contracting_dims={2}, rhs_batch_dims={0}, rhs_contracting_dims={1}
}

%body (carry: f32[64,32]) -> f32[64,32] {
  %carry = f32[64,32]{1,0} parameter(0)
  %w = f32[32,32]{1,0} constant({...})
  ROOT %dot.2 = f32[64,32]{1,0} dot(f32[64,32]{1,0} %carry, f32[32,32]{1,0} %w), lhs_contracting_dims={1}, \
rhs_contracting_dims={0}
}

ENTRY %main (x: f32[64,32], y: f32[32,16]) -> f32[64,16] {
  %x = f32[64,32]{1,0} parameter(0)
  %y = f32[32,16]{1,0} parameter(1)
  %gemm = (f32[64,16]{1,0}, s8[4194304]{0}) custom-call(f32[64,32]{1,0} %x, f32[32,16]{1,0} %y), \
custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"alpha_real":1,"dot_dimension_numbers":\
{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],\
"rhs_batch_dimensions":[]}}}
  %a = bf16[8,64,32]{2,1,0} broadcast(%x), dimensions={1,2}
  %b = bf16[8,32,16]{2,1,0} broadcast(%y), dimensions={1,2}
  %fusion = bf16[8,64,16]{2,1,0} fusion(%a, %b), kind=kCustom, calls=%gemm_fusion_dot
  %loop = f32[64,32]{1,0} while(%x), condition=%cond, body=%body
  %sizes = s32[9]{0} constant({0, 8, 8, 20, 30, 40, 50, 60, 64})
  %bounds = s32[1]{0} constant({0})
  %gmm = f32[64,16]{1,0} custom-call(s32[9]{0} %sizes, s32[1]{0} %bounds, s32[1]{0} %bounds, f32[64,32]{1,0} \
%x, bf16[8,32,16]{2,1,0} %b), custom_call_target="__gpu$xla.gpu.triton", backend_config={debug = false, grid_x \
= 1 : i32, ir = "MLIR", name = "gmm", num_stages = 2 : i32, num_warps = 4 : i32}
  %tgmm = f32[8,32,16]{2,1,0} custom-call(s32[9]{0} %sizes, f32[64,32]{1,0} %x, f32[64,16]{1,0} %gmm), \
custom_call_target="__gpu$xla.gpu.triton", backend_config={debug = false, ir = "MLIR", name = "tgmm"}
  %flash = f32[64,16]{1,0} custom-call(f32[64,32]{1,0} %x), custom_call_target="__gpu$xla.gpu.triton", \
backend_config={name = "flash_fwd"}
  ROOT %out = f32[64,16]{1,0} get-tuple-element(%gemm), index=0
}
"""


def test_matmul_flops_of_library_calls_fusions_and_loops():
    """2 x output elements x contracted size, by hand: a cuBLAS GEMM custom call (its first output; the dims from
    its backend config), a fusion through the computation it calls, a dot in a loop body (its own op; the loop
    holds none), the Pallas grouped matmuls (Triton calls named gmm / tgmm; not other Triton kernels), nothing
    for any other op."""
    _, ops = hlo_ops(_GPU_LIKE_HLO)
    assert ops["gemm"].opcode == "custom-call" and ops["gemm"].flops == 2 * 64 * 16 * 32
    assert ops["fusion"].flops == 2 * 8 * 64 * 16 * 32 == ops["dot.1"].flops
    assert ops["dot.2"].flops == 2 * 64 * 32 * 32 and ops["loop"].flops == 0
    # pallas_kernels' grouped matmuls: each of the 64 rows through one [32, 16] matrix, forward and weight gradient
    assert ops["gmm"].flops == ops["tgmm"].flops == 2 * 64 * 32 * 16
    assert all(ops[name].flops == 0 for name in ("x", "a", "b", "out", "carry", "sizes", "flash"))


def test_self_times_subtract_directly_nested_events():
    """A loop event [0, 100) holding ops [10, 30) and [40, 70), which holds [45, 50); then a lone op."""
    events = [(40, 30, "b"), (0, 100, "while"), (200, 5, "c"), (10, 20, "a"), (45, 5, "b.inner")]
    assert dict(_self_times(events)) == {"while": 50e-6, "a": 20e-6, "b": 25e-6, "b.inner": 5e-6, "c": 5e-6}


def test_backward_is_its_own_component_and_lumped_programs(tmp_path):
    w = jax.random.normal(jax.random.key(0), (128, 128)) / 12
    x = jax.random.normal(jax.random.key(1), (128, 128))

    def loss(w, x):
        with jax.named_scope("attention"):
            return jnp.sum(jnp.tanh(jnp.tanh(x @ w) @ w))

    grad = jax.jit(jax.grad(loss)).lower(w, x).compile()
    update = jax.jit(lambda w, g: w - 0.1 * g).lower(w, w).compile()

    def step():
        return update(w, grad(w, x))

    step().block_until_ready()
    prof = profile_runs(step, [(grad.as_text(), None), (update.as_text(), "optimizer update")], str(tmp_path), runs=2)
    assert "attention (backward)" in prof["components"] and "attention" in prof["components"]
    assert "optimizer update" in prof["components"]
    assert {op.module for op in prof["ops"]} == {hlo_ops(grad.as_text())[0], hlo_ops(update.as_text())[0]}
    # five 128^3 products per step: h = tanh(x w) and h w forward; g w^T, h^T g and x^T g' backward
    assert prof["matmul"]["flops_per_run"] == 5 * 2 * 128 ** 3
    share = round(100 * prof["matmul"]["op_ms_per_run"] / prof["op_ms_per_run"])
    assert _matmul_label(prof).startswith(f"\nmatmuls {share} % at ") and _matmul_label({"op_ms_per_run": 1.0}) == ""
    png = plot_profiles({"step": prof}, str(tmp_path / "p.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_keep_ops_in_trace_turns_gpu_command_buffers_off_before_the_backend_starts(monkeypatch):
    """Appended to XLA_FLAGS only while no backend has started and no setting of the user's is there; XLA accepts
    the flag in a fresh process on this (CPU) jaxlib, which reads it at start-up."""
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    keep_ops_in_trace()  # this test process's backend is up: too late, nothing changes
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    keep_ops_in_trace()
    flags = "--xla_force_host_platform_device_count=2 --xla_gpu_enable_command_buffer="
    assert os.environ["XLA_FLAGS"] == flags
    keep_ops_in_trace()  # once only
    assert os.environ["XLA_FLAGS"] == flags
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_command_buffer=FUSION")  # the user's choice stays
    keep_ops_in_trace()
    assert os.environ["XLA_FLAGS"] == "--xla_gpu_enable_command_buffer=FUSION"
    run = subprocess.run([sys.executable, "-c", "import jax; print(jax.device_count())"], capture_output=True,
                         text=True, env={**os.environ, "XLA_FLAGS": flags}, timeout=120)
    assert run.returncode == 0 and run.stdout.split()[-1] == "2", run.stderr[-2000:]
