"""The commands' persistent compilation cache (deepmoe.backend.compile_cache): where it goes, when it stays off,
which commands use it, and that a second process loads the program the first one compiled."""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from deepmoe import cli
from deepmoe.backend import compile_cache
from deepmoe.backend.compile_cache import ENV_CACHE, MAX_BYTES, cache_directory


def test_the_directory_follows_the_environment(tmp_path):
    assert cache_directory({}, None)[0] == Path("~/.cache/deepmoe/xla").expanduser()
    assert cache_directory({"XDG_CACHE_HOME": str(tmp_path)}, None)[0] == tmp_path / "deepmoe" / "xla"
    assert cache_directory({ENV_CACHE: str(tmp_path / "c"), "XDG_CACHE_HOME": "/x"}, None)[0] == tmp_path / "c"
    assert cache_directory({ENV_CACHE: "0"}, None) == (None, f"off ({ENV_CACHE}=0)")
    directory, why = cache_directory({ENV_CACHE: str(tmp_path)}, "/set/for/jax")  # JAX's own setting wins
    assert directory is None and "/set/for/jax" in why


def test_every_command_but_bench_uses_the_cache(monkeypatch, capsys):
    used = []
    for command in cli.COMMANDS:
        monkeypatch.setattr(compile_cache, "use_compilation_cache", lambda command=command: used.append(command))
        with contextlib.suppress(SystemExit):  # --help exits once the command parsed its arguments
            cli.main([command, "--help"])
    capsys.readouterr()
    assert used == [command for command in cli.COMMANDS if command != "bench"]


# A fresh interpreter: JAX reads the cache settings at its first compile, and this test process has its own.
PROGRAM = """
import json
import jax, jax.numpy as jnp
from deepmoe.backend.compile_cache import cache_contents, use_compilation_cache
events = []
jax.monitoring.register_event_listener(lambda event, **_: events.append(event))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # store even this small program
status = use_compilation_cache()
y = jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.arange(48.0).reshape(6, 8) / 48)
print(json.dumps({"status": status, "hits": events.count("/jax/compilation_cache/cache_hits"),
                  "y": y.tolist(), **cache_contents()}))
"""
X = np.arange(48.0).reshape(6, 8) / 48
EXPECTED = np.sin(X) @ X.T  # numpy's result for the program


def _run(tmp_path, **env):
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", ENV_CACHE))}
    environ.update(JAX_PLATFORMS="cpu", XDG_CACHE_HOME=str(tmp_path), **env)
    proc = subprocess.run([sys.executable, "-c", PROGRAM], env=environ, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_the_program_the_first_compiled(tmp_path):
    first = _run(tmp_path)
    assert first["directory"] == str(tmp_path / "deepmoe" / "xla") and first["max_bytes"] == MAX_BYTES
    assert first["programs"] >= 1 and first["hits"] == 0
    second = _run(tmp_path)
    assert second["hits"] >= 1 and second["programs"] == first["programs"]
    for run in (first, second):
        np.testing.assert_allclose(run["y"], EXPECTED, rtol=1e-5)
    off = _run(tmp_path, **{ENV_CACHE: "0"})
    assert off["directory"] is None and off["status"] == f"off ({ENV_CACHE}=0)" and off["hits"] == 0


def test_an_unwritable_directory_leaves_the_cache_off(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where the directory should go
    run = _run(tmp_path, **{ENV_CACHE: str(blocked / "xla")})
    assert run["directory"] is None and run["status"].startswith(f"off (cannot create {blocked / 'xla'}")
    np.testing.assert_allclose(run["y"], EXPECTED, rtol=1e-5)
