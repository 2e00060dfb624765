"""Ascend PJRT plugin hook, without hardware: library discovery, mocked loading, error messages."""

from __future__ import annotations

import importlib.metadata as metadata
import os
from unittest import mock

import pytest
from jax._src import xla_bridge
from jax._src.lib import _profiler, xla_client

from deepmoe.backend import ascend_plugin as ap

_ENV_VARS = (ap.ENV_LIBRARY, ap.ENV_VISIBLE_DEVICES, ap.JAX_PLUGIN_ENV, *ap.TOOLKIT_ENVS)


@pytest.fixture
def clean(monkeypatch):
    """No Ascend variables, no remembered probe: each test starts from a bare machine."""
    for var in _ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(ap, "_STATUS", None)
    return monkeypatch


@pytest.fixture
def registry(clean):
    """JAX's plugin registry swapped for empty ones and the .so load mocked, as JAX's own
    xla_bridge tests do, so nothing process-global changes."""
    clean.setattr(xla_bridge, "_backend_factories", {})
    clean.setattr(xla_bridge, "_topology_factories", {})
    load = mock.Mock(return_value=mock.sentinel.c_api)
    clean.setattr(xla_client, "load_pjrt_plugin_dynamically", load)
    clean.setattr(_profiler, "register_plugin_profiler", mock.Mock())
    return load


def _fake_so(tmp_path, name="libpjrt_ascend.so"):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not really a shared object")
    return str(path)


def test_missing_library_is_a_noop_and_names_every_place(clean, tmp_path):
    clean.setenv("ASCEND_HOME_PATH", str(tmp_path / "cann"))
    before = dict(xla_bridge._backend_factories)
    ap.initialize()  # must not raise
    st = ap.status()
    assert st.state == ap.NOT_FOUND and not st.ok
    assert dict(xla_bridge._backend_factories) == before
    with pytest.raises(ap.AscendPluginNotFoundError) as info:
        ap.require()
    msg = str(info.value)
    for place in ("$DEEPMOE_ASCEND_PJRT_LIBRARY", "$ASCEND_HOME_PATH/lib64/libpjrt_ascend.so",
                  "$ASCEND_TOOLKIT_HOME/lib64/libpjrt_ascend.so", "$PJRT_NAMES_AND_LIBRARY_PATHS",
                  str(tmp_path / "cann" / "lib64" / "libpjrt_ascend.so"), "no public Ascend PJRT"):
        assert place in msg, (place, msg)


def test_explicit_path_is_authoritative(clean, tmp_path):
    # A wrong explicit path must not fall through to the toolkit's library.
    clean.setenv(ap.ENV_LIBRARY, str(tmp_path / "nope.so"))
    clean.setenv("ASCEND_HOME_PATH", os.path.dirname(os.path.dirname(_fake_so(tmp_path, "lib64/libpjrt_ascend.so"))))
    st = ap.find_library()
    assert st.state == ap.NOT_FOUND
    assert "nope.so" in st.error and "no such file" in st.error
    assert [c.found for c in st.candidates] == [False, True, False, False]


def test_toolkit_location_found(clean, tmp_path):
    lib = _fake_so(tmp_path, "toolkit/lib64/libpjrt_ascend.so")
    clean.setenv("ASCEND_TOOLKIT_HOME", str(tmp_path / "toolkit"))
    st = ap.find_library()
    assert (st.state, st.library, st.source) == (ap.NOT_INITIALIZED, lib, "$ASCEND_TOOLKIT_HOME/lib64/libpjrt_ascend.so")


def test_register_with_mocked_load_and_client(registry, tmp_path):
    lib = _fake_so(tmp_path)
    with mock.patch.dict(os.environ, {ap.ENV_LIBRARY: lib}):
        ap.initialize()
        ap.initialize()  # idempotent: a second JAX discovery must not load twice
    registry.assert_called_once_with("ascend", lib)
    st = ap.status()
    assert (st.state, st.library, st.source) == (ap.REGISTERED, lib, "$DEEPMOE_ASCEND_PJRT_LIBRARY")
    reg = xla_bridge._backend_factories["ascend"]
    assert reg.priority == ap.PRIORITY and reg.fail_quietly and reg.c_api is mock.sentinel.c_api

    # Creating the client: options are read from the environment at creation time.
    with mock.patch.dict(os.environ, {ap.ENV_VISIBLE_DEVICES: "0,1"}), \
            mock.patch.object(xla_client, "pjrt_plugin_initialized", return_value=True), \
            mock.patch.object(xla_client, "make_c_api_client", return_value="client") as make:
        assert reg.factory() == "client"
    make.assert_called_once_with("ascend", {"visible_devices": [0, 1]}, None)


def test_invalid_library_load_failure_is_recorded(clean, tmp_path):
    # Real dlopen of a file that is not a shared object: fails without touching global state.
    clean.setattr(xla_bridge, "_backend_factories", {})
    lib = _fake_so(tmp_path)
    clean.setenv(ap.ENV_LIBRARY, lib)
    ap.initialize()
    st = ap.status()
    assert st.state == ap.LOAD_FAILED and lib in st.error
    assert "ascend" not in xla_bridge._backend_factories
    with pytest.raises(ap.AscendPluginNotFoundError) as info:
        ap.require()
    assert lib in str(info.value) and "$ASCEND_HOME_PATH" in str(info.value)


def test_jax_env_entry_is_left_to_jax(registry, tmp_path):
    lib = _fake_so(tmp_path)
    with mock.patch.dict(os.environ, {ap.JAX_PLUGIN_ENV: f"other:/x.so,ascend{os.pathsep}{lib}",
                                      ap.ENV_LIBRARY: lib}):
        ap.initialize()
        st = ap.require()
    assert st.state == ap.DEFERRED_TO_JAX and st.library == lib
    registry.assert_not_called()  # JAX loads it; a second load of one name is an XLA error


def test_jax_env_entry_with_missing_file_fails_require(clean, tmp_path):
    clean.setenv(ap.JAX_PLUGIN_ENV, f"ascend{os.pathsep}{tmp_path / 'gone.so'}")
    with pytest.raises(ap.AscendPluginNotFoundError, match="gone.so"):
        ap.require()


def test_already_registered_by_another_package(registry, tmp_path):
    xla_bridge._backend_factories["ascend"] = mock.sentinel.registration
    with mock.patch.dict(os.environ, {ap.ENV_LIBRARY: _fake_so(tmp_path)}):
        ap.initialize()
    assert ap.status().state == ap.ALREADY_REGISTERED
    registry.assert_not_called()


def test_bad_visible_devices_message(clean):
    with pytest.raises(ValueError, match=ap.ENV_VISIBLE_DEVICES):
        ap.plugin_options({ap.ENV_VISIBLE_DEVICES: "0,x"})
    assert ap.plugin_options({ap.ENV_VISIBLE_DEVICES: "all"}) == {}


def test_entry_point_in_installed_metadata():
    """Needs `[project.entry-points.jax_plugins] deepmoe_ascend = "deepmoe.backend.ascend_plugin"`
    in pyproject.toml and a reinstall (pip install -e .) to refresh the metadata."""
    eps = [ep for ep in metadata.entry_points(group="jax_plugins") if ep.value == ap.__name__]
    assert eps, "jax_plugins entry point for deepmoe.backend.ascend_plugin is not installed"
    assert eps[0].dist is not None and eps[0].dist.name == "deepmoe"
    assert eps[0].load().initialize is ap.initialize


_DISCOVERY_SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout)
import jax
from deepmoe.backend import ascend_plugin
assert ascend_plugin._STATUS is None          # importing JAX alone does not run discovery
print(jax.devices())                          # JAX discovers plugins here and calls initialize()
st = ascend_plugin._STATUS
assert st is not None and st.state == "load-failed", st
print("DISCOVERY-OK")
"""


def test_jax_discovery_through_an_entry_point(tmp_path):
    """JAX's own discovery imports us through a `jax_plugins` entry point (a throw-away dist-info
    here, independent of pyproject) and a library that fails to load leaves CPU JAX working."""
    import subprocess
    import sys

    dist = tmp_path / "site" / "deepmoe_probe-0.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: deepmoe-probe\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text(f"[jax_plugins]\ndeepmoe_probe = {ap.__name__}\n")
    env = {k: v for k, v in os.environ.items() if k not in _ENV_VARS and k != "JAX_PLATFORMS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path / "site"), env.get("PYTHONPATH")]))
    env[ap.ENV_LIBRARY] = _fake_so(tmp_path)
    proc = subprocess.run([sys.executable, "-c", _DISCOVERY_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "DISCOVERY-OK" in proc.stdout, proc.stdout + proc.stderr
    assert "Could not load Ascend PJRT library" in proc.stdout + proc.stderr
