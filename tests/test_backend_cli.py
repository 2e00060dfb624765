"""`--platform`, apply_platform() and the jax.distributed start-up helper."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from unittest import mock

import jax
import pytest
from jax._src import xla_bridge

from deepmoe.backend import ascend_plugin as ap
from deepmoe.backend import cli_support as cs


@pytest.fixture
def clean(monkeypatch):
    for var in (ap.ENV_LIBRARY, ap.JAX_PLUGIN_ENV, *ap.TOOLKIT_ENVS, "DEEPMOE_PLATFORM",
                cs.ENV_COORDINATOR, cs.ENV_NUM_PROCESSES, cs.ENV_PROCESS_ID, cs.ENV_LOCAL_DEVICE_IDS):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(ap, "_STATUS", None)
    return monkeypatch


def test_platform_argument():
    parser = cs.add_platform_argument(argparse.ArgumentParser())
    assert parser.parse_args([]).platform == "auto"
    assert parser.parse_args(["--platform", "ascend"]).platform == "ascend"
    with pytest.raises(SystemExit):
        parser.parse_args(["--platform", "metal"])


def test_apply_platform_auto_and_unknown(clean):
    assert cs.apply_platform("auto") is None and cs.apply_platform(None) is None
    with pytest.raises(ValueError, match="unknown platform 'metal'"):
        cs.apply_platform("metal")


def test_apply_platform_too_late_is_a_clear_error(clean):
    jax.devices()  # backends now exist, on CPU
    assert cs.apply_platform("cpu") == jax.config.jax_platforms  # same platform: fine, no-op
    with pytest.raises(RuntimeError, match="already initialised"):
        cs.apply_platform("tpu")
    clean.setenv("DEEPMOE_PLATFORM", "ascend")  # auto defers to the env var, same check
    with pytest.raises(RuntimeError, match="before any jax.devices"):
        cs.apply_platform("auto")


def test_apply_platform_ascend_without_library_names_every_place(clean):
    clean.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    with mock.patch.object(jax.config, "update") as update, \
            pytest.raises(ap.AscendPluginNotFoundError) as info:
        cs.apply_platform("ascend")
    update.assert_not_called()
    for place in ("$DEEPMOE_ASCEND_PJRT_LIBRARY", "$ASCEND_HOME_PATH", "$ASCEND_TOOLKIT_HOME",
                  "$PJRT_NAMES_AND_LIBRARY_PATHS"):
        assert place in str(info.value)


def test_distributed_noop_and_errors(clean):
    with mock.patch.object(jax.distributed, "initialize") as init:
        assert cs.maybe_initialize_distributed({}) is False
        init.assert_not_called()
    clean.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    with pytest.raises(ValueError, match=cs.ENV_PROCESS_ID):
        cs.maybe_initialize_distributed({cs.ENV_COORDINATOR: "h:1", cs.ENV_NUM_PROCESSES: "2"})
    with pytest.raises(ValueError, match="not an integer"):
        cs.maybe_initialize_distributed({cs.ENV_COORDINATOR: "h:1", cs.ENV_NUM_PROCESSES: "two",
                                         cs.ENV_PROCESS_ID: "0"})


def test_distributed_initialize_arguments(clean):
    clean.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    env = {cs.ENV_COORDINATOR: "10.0.0.1:1234", cs.ENV_NUM_PROCESSES: "2", cs.ENV_PROCESS_ID: "1",
           cs.ENV_LOCAL_DEVICE_IDS: "0,1"}
    with mock.patch.object(jax.distributed, "initialize") as init:
        assert cs.maybe_initialize_distributed(env) is True
        init.assert_called_once_with(coordinator_address="10.0.0.1:1234", num_processes=2,
                                     process_id=1, local_device_ids=[0, 1])
    with mock.patch.object(jax.distributed, "initialize") as init:
        assert cs.maybe_initialize_distributed({cs.ENV_COORDINATOR: "auto"}) is True
        init.assert_called_once_with()


def test_distributed_after_backends_is_a_clear_error(clean):
    clean.setattr(xla_bridge, "backends_are_initialized", lambda: True)
    with pytest.raises(RuntimeError, match="before any JAX computation"):
        cs.maybe_initialize_distributed({cs.ENV_COORDINATOR: "h:1"})


_ALIASED_ASCEND_SCRIPT = """
import argparse, os
from unittest import mock
import numpy as np
import deepmoe.backend.cli_support as cs          # importing the platform layer starts no backend
from jax._src import xla_bridge
assert not xla_bridge.backends_are_initialized()
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from deepmoe.backend import ascend_plugin
from deepmoe.backend.capabilities import select

calls = []
def fake_register_plugin(name, *, priority=400, library_path=None, options=None, **kw):
    # Stands in for loading a vendor .so: the `ascend` name is served by XLA's CPU client.
    calls.append((name, library_path, priority, options()))
    xla_bridge.register_backend_factory(name, xla_bridge.make_cpu_client, priority=priority,
                                        fail_quietly=False)

args = cs.add_platform_argument(argparse.ArgumentParser()).parse_args(["--platform", "ascend"])
with mock.patch.object(xla_bridge, "register_plugin", fake_register_plugin):
    assert cs.apply_platform(args.platform) == "ascend,cpu"
assert calls == [("ascend", os.environ["DEEPMOE_ASCEND_PJRT_LIBRARY"], 400, {"visible_devices": [0, 1, 2, 3]})], calls
assert ascend_plugin.status().state == "registered"

backends = xla_bridge.backends()
assert set(backends) == {"ascend", "cpu"}, backends
devices = jax.devices()
assert len(devices) == 4 and all(d.client is backends["ascend"] for d in devices)
sel = select()
assert (sel.platform, sel.kernels, sel.moe_strategy, sel.compute_dtype) == (
    "ascend", "reference", "ep_all_to_all", "bfloat16"), sel
assert sel.mesh_shape == {"data": 1, "fsdp": 1, "expert": 4, "tensor": 1}, sel

# The fixed-capacity expert-parallel pattern on a (data=2, expert=2) mesh of `ascend` devices:
# a self-inverse all_to_all round trip plus a psum-reduced sharded matmul.
mesh = Mesh(np.array(devices).reshape(2, 2), ("data", "expert"))
def body(x, w):
    back = jax.lax.all_to_all(jax.lax.all_to_all(x, "expert", 0, 0, tiled=True), "expert", 0, 0, tiled=True)
    return back, jax.lax.psum(x @ w, "expert")
f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("data", "expert"), P("expert", None)),
                          out_specs=(P("data", "expert"), P("data", None))))
x = np.arange(48, dtype=np.float32).reshape(8, 6) / 10
w = np.linspace(-1, 1, 30, dtype=np.float32).reshape(6, 5)
xs = jax.device_put(x, NamedSharding(mesh, P("data", "expert")))
back, y = f(xs, w)
np.testing.assert_allclose(np.asarray(back), x)
np.testing.assert_allclose(np.asarray(y), x @ w, rtol=1e-5, atol=1e-5)
assert y.sharding.device_set <= set(devices)
print("ALIASED-OK")
"""


def test_platform_flag_selects_a_backend_aliased_to_cpu(tmp_path):
    """`--platform ascend` end to end, with the `ascend` name registered to XLA's CPU client
    (fresh process: the platform list is process-global and fixed at first use)."""
    lib = tmp_path / "libpjrt_ascend.so"
    lib.write_bytes(b"stand-in")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DEEPMOE_", "ASCEND_", "JAX_", "PJRT_"))}
    env.update({"XLA_FLAGS": "--xla_force_host_platform_device_count=4",
                ap.ENV_LIBRARY: str(lib), ap.ENV_VISIBLE_DEVICES: "0,1,2,3"})
    proc = subprocess.run([sys.executable, "-c", _ALIASED_ASCEND_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and "ALIASED-OK" in proc.stdout, proc.stdout + proc.stderr
