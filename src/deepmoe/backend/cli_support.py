"""`--platform` flag and multi-host start-up for the `deepmoe` CLI (and scripts).

Both must run first thing in `main()`: JAX fixes its platform list and its distributed client
when the first backend is created (any jnp op, jit, jax.devices()), and silently ignores a later
`jax_platforms` update. We check and say so instead of letting the wrong device run.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping

import jax
from jax._src import distributed as _distributed
from jax._src import xla_bridge

from deepmoe.backend import ascend_plugin
from deepmoe.backend.capabilities import ENV_PLATFORM, current_platform

logger = logging.getLogger(__name__)

PLATFORM_CHOICES = ("auto", "cpu", "gpu", "tpu", "ascend")

ENV_COORDINATOR = "DEEPMOE_COORDINATOR"  # "host:port" of process 0, or "auto"
ENV_NUM_PROCESSES = "DEEPMOE_NUM_PROCESSES"
ENV_PROCESS_ID = "DEEPMOE_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "DEEPMOE_LOCAL_DEVICE_IDS"  # optional, "0,1,2,3"


def add_platform_argument(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `--platform {auto,cpu,gpu,tpu,ascend}` (default auto = $DEEPMOE_PLATFORM, else JAX's choice)."""
    parser.add_argument(
        "--platform", choices=PLATFORM_CHOICES, default="auto",
        help="device platform to run on; 'auto' uses $DEEPMOE_PLATFORM if set, else JAX's default "
             "(which honours JAX_PLATFORMS). 'ascend' needs a PJRT plugin: see docs/ascend.md")
    return parser


def _gpu_plugin_name() -> str:
    # JAX's "gpu" alias expands to cuda,rocm,oneapi and an explicit platform list fails loudly on
    # each one that is not installed, so name the GPU plugin that is actually registered.
    # Private, but it is what jax.devices() runs first; it imports plugins and creates no backend.
    getattr(xla_bridge, "_discover_and_register_pjrt_plugins", lambda: None)()
    for name in ("cuda", "rocm"):
        if name in xla_bridge._backend_factories:
            return name
    raise RuntimeError(
        "--platform gpu was requested but no CUDA or ROCm JAX plugin is installed "
        "(e.g. pip install 'jax[cuda12]').")


def jax_platforms_for(name: str) -> str:
    """The `jax_platforms` value for one of our platform names.

    Accelerators keep `cpu` listed second: host-side work (callbacks, host copies, checkpoints)
    needs a CPU backend, and the first listed platform stays the default.
    """
    if name == "cpu":
        return "cpu"
    if name == "gpu":
        return f"{_gpu_plugin_name()},cpu"
    return f"{name},cpu"


def apply_platform(name: str | None) -> str | None:
    """Point JAX at `name` before any backend exists; returns the `jax_platforms` value set.

    `auto`/None falls back to $DEEPMOE_PLATFORM, then leaves JAX's own choice alone (None).
    Raises ValueError for an unknown name, AscendPluginNotFoundError (naming every place looked)
    for `ascend` without a library, and RuntimeError when backends already exist on another platform.
    """
    requested = (name or "auto").strip().lower()
    if requested == "auto":
        requested = os.environ.get(ENV_PLATFORM, "auto").strip().lower() or "auto"
    if requested not in PLATFORM_CHOICES:
        raise ValueError(f"unknown platform {requested!r}; expected one of {', '.join(PLATFORM_CHOICES)}")
    if requested == "auto":
        return None

    if xla_bridge.backends_are_initialized():
        live = current_platform()
        if live == requested:
            return jax.config.jax_platforms  # already where we were asked to be
        raise RuntimeError(
            f"--platform {requested}: JAX backends are already initialised (default platform: {live}), "
            "and the platform cannot change afterwards. Call apply_platform() at the very start of "
            "main(), before any jax.devices(), jnp operation, jit call or device_put.")

    if requested == "ascend":
        ascend_plugin.require()
    value = jax_platforms_for(requested)
    jax.config.update("jax_platforms", value)
    logger.info("jax_platforms set to %r for --platform %s", value, requested)
    return value


def _int_env(env: Mapping[str, str], var: str) -> int:
    raw = env.get(var, "").strip()
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"${var}={raw!r} is not an integer") from None


def maybe_initialize_distributed(environ: Mapping[str, str] | None = None) -> bool:
    """Start jax.distributed from environment variables; a no-op when they are absent.

    Launch each process with:
      DEEPMOE_COORDINATOR=host0:1234   address of process 0 (the coordinator service binds there)
      DEEPMOE_NUM_PROCESSES=N          total processes
      DEEPMOE_PROCESS_ID=i             this process, 0..N-1
      DEEPMOE_LOCAL_DEVICE_IDS=0,1     optional: restrict this process's local devices
    or DEEPMOE_COORDINATOR=auto to let JAX detect SLURM / Open MPI / Cloud TPU by itself.
    Must run before any backend is created, like apply_platform() (call that first).
    Returns True when this call initialised the distributed system.
    """
    env = os.environ if environ is None else environ
    coordinator = env.get(ENV_COORDINATOR, "").strip()
    if not coordinator:
        return False
    if _distributed.global_state.client is not None:
        logger.info("jax.distributed already initialised; %s ignored", ENV_COORDINATOR)
        return False
    if xla_bridge.backends_are_initialized():
        raise RuntimeError(
            f"${ENV_COORDINATOR} is set but JAX backends already exist; call "
            "maybe_initialize_distributed() before any JAX computation or jax.devices().")

    # Nothing to configure for CPU: jax >= 0.10 already defaults to gloo cross-process collectives.
    if coordinator == "auto":
        jax.distributed.initialize()
        return True
    missing = [v for v in (ENV_NUM_PROCESSES, ENV_PROCESS_ID) if not env.get(v, "").strip()]
    if missing:
        raise ValueError(f"${ENV_COORDINATOR}={coordinator} also needs {' and '.join('$' + m for m in missing)}")
    kwargs: dict[str, object] = {
        "coordinator_address": coordinator,
        "num_processes": _int_env(env, ENV_NUM_PROCESSES),
        "process_id": _int_env(env, ENV_PROCESS_ID),
    }
    if ids := env.get(ENV_LOCAL_DEVICE_IDS, "").strip():
        try:
            kwargs["local_device_ids"] = [int(x) for x in ids.split(",")]
        except ValueError:
            raise ValueError(f"${ENV_LOCAL_DEVICE_IDS}={ids!r}: expected ids like 0,1,2") from None
    jax.distributed.initialize(**kwargs)
    logger.info("jax.distributed initialised: process %s of %s via %s",
                kwargs["process_id"], kwargs["num_processes"], coordinator)
    return True
