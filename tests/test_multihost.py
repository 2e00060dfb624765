"""Multi-controller JAX: two local processes (4 CPU devices each, gloo collectives) run the sharded forward on
one global 8-device mesh (data=2 x expert=2 x tensor=2, expert all-to-all across the processes) and each
checks the shards it holds against its own single-device forward."""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from deepmoe.backend.xla_options import SCHEDULE_FLAG

WORKER = textwrap.dedent("""
    import os, sys
    import numpy as np
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]),
                               initialization_timeout=120)
    import jax.numpy as jnp
    import deepmoe as dm
    from deepmoe.config import CSA, HCA

    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    cfg = dm.preset("tiny").replace(compute_dtype="float32", num_layers=2, layer_types=(CSA, HCA),
                                    sinkhorn_iterations=3, num_mtp_layers=0)
    params = dm.init_params(cfg, jax.random.key(0))  # identical in both processes
    ids = np.asarray(jax.random.randint(jax.random.key(1), (4, 32), 0, cfg.vocab_size))
    fast = {"xla_backend_optimization_level": 0}  # halves CPU compile time
    ids_local = jnp.asarray(ids)
    local = jax.jit(lambda p, i: dm.forward(p, cfg, i).logits).lower(params, ids_local).compile(fast)(params,
                                                                                                      ids_local)
    local = np.asarray(local)

    mesh = dm.make_mesh(data=2, expert=2, tensor=2)  # spans both processes
    placed = dm.shard_params(params, cfg, mesh)
    global_ids = dm.shard_batch(ids, mesh)
    sharded = jax.jit(lambda p, i: dm.forward(p, cfg, i, mesh=mesh).logits)
    logits = sharded.lower(placed, global_ids).compile(fast)(placed, global_ids)
    assert logits.shape == local.shape and not logits.is_fully_addressable
    scale = float(np.abs(local).max())
    worst = 0.0
    for shard in logits.addressable_shards:
        worst = max(worst, float(np.abs(np.asarray(shard.data) - local[shard.index]).max()))
    assert worst <= 1e-5 * scale, (worst, scale)
    print(f"process {jax.process_index()}: {len(logits.addressable_shards)} shards match, max err {worst:.2e}",
          flush=True)
    jax.distributed.shutdown()
""")


def _gloo_available() -> bool:
    try:
        from jax._src.lib import _jax
    except ImportError:
        try:
            from jax._src.lib import xla_client
            _jax = xla_client._xla
        except (ImportError, AttributeError):
            return False
    return hasattr(_jax, "make_gloo_tcp_collectives")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not _gloo_available(), reason="this jaxlib has no gloo CPU collectives")
def test_two_processes_run_the_sharded_forward(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count=4 {SCHEDULE_FLAG}",
           "JAX_PLATFORMS": "cpu",
           "JAX_COMPILATION_CACHE_DIR": str(Path(__file__).resolve().parent.parent / ".jax_cache")}
    address = f"localhost:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, str(script), address, str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=600)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:  # only the two workers this test started
            proc.kill()
        pytest.fail("multi-process forward timed out:\n" + "\n".join(p.communicate()[0][-3000:] for p in procs))
    for i, (proc, out) in enumerate(zip(procs, outputs)):
        if "gloo" in out.lower() and "not" in out.lower() and proc.returncode:
            pytest.skip(f"gloo collectives unusable here: {out[-500:]}")
        assert proc.returncode == 0, f"process {i} failed:\n{out[-4000:]}"
        assert f"process {i}: 4 shards match" in out, out[-2000:]
