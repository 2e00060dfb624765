"""keep_host_buffers(): a program whose temporaries exceed glibc's mmap threshold runs again without faulting
its temp buffer back in (counted with getrusage against the buffer's size in pages), and says plainly when it
cannot apply. Run in subprocesses: the settings are process-wide and must precede the JAX backend."""

import json
import os
import subprocess
import sys

import pytest

from deepmoe.backend.host_memory import glibc_linux, keep_host_buffers

pytestmark = pytest.mark.skipif(not glibc_linux(), reason="glibc malloc settings")

_SCRIPT = """
import json, resource, sys
from deepmoe.backend.host_memory import keep_host_buffers
status = keep_host_buffers()
import jax, jax.numpy as jnp
# ~100 MB of temporaries: a dot's operand is materialised whole (sin(x), 96 MiB)
fn = jax.jit(lambda x, w: jnp.sin(x) @ w)
x, w = jnp.ones((12 * 2**10, 2**11), jnp.float32), jnp.ones((2**11, 8), jnp.float32)
compiled = fn.lower(x, w).compile()
temp = compiled.memory_analysis().temp_size_in_bytes
jax.block_until_ready(compiled(x, w))
faults = []
for _ in range(8):  # glibc may place the next few temp buffers elsewhere in its heap before it settles
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(compiled(x, w))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"status": status, "temp_pages": temp // 4096, "faults": min(faults)}))
"""


def _run(env_value: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", DEEPMOE_KEEP_HOST_BUFFERS=env_value)
    out = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_temp_buffer_is_not_faulted_in_again():
    off, on = _run("0"), _run("1")
    assert off["status"].startswith("off") and on["status"] == "on"
    assert on["temp_pages"] > 64 * 2**20 // 4096  # above what a per-thread malloc arena can hold
    # Without the settings each run faults in (most of) its fresh temp buffer; with them, almost nothing once the
    # heap has settled (seen on a 2-vCPU host: a run or two after the first faulting the whole buffer in again).
    assert off["faults"] > on["temp_pages"] // 2
    assert on["faults"] < on["temp_pages"] // 20


def test_says_so_when_a_backend_already_started():
    import jax

    jax.devices()  # the test process's backend is up
    assert "already started" in keep_host_buffers()
