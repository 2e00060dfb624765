"""PJRT plugin hook for Huawei Ascend NPUs, registered under the platform name ``ascend``.

JAX imports this module through the ``jax_plugins`` entry-point group and calls ``initialize()``
the first time it enumerates backends (``jax._src.xla_bridge.discover_pjrt_plugins``). That
happens on every JAX start-up of every user of this environment, almost all of whom have no
Ascend hardware, so a missing library is an INFO-level no-op, never an exception; what was
looked at and why it failed is kept for ``deepmoe doctor`` and for the error raised when the
user explicitly asks for ``--platform ascend`` (``require()``).

Where the library is looked for (documented in docs/ascend.md):
  1. ``$DEEPMOE_ASCEND_PJRT_LIBRARY``: authoritative when set; a wrong path is an error, not a
     silent fall-through to some other library.
  2. ``$ASCEND_HOME_PATH/lib64/libpjrt_ascend.so`` then ``$ASCEND_TOOLKIT_HOME/lib64/...``
     (the CANN toolkit variables set by ``set_env.sh``).
  3. ``PJRT_NAMES_AND_LIBRARY_PATHS`` with an ``ascend:<path>`` entry. JAX registers those
     itself right after calling the plugin modules, and loading one PJRT name twice is a hard
     error in XLA, so when that entry exists we step aside whatever 1 and 2 say.

No public Ascend PJRT library exists today: everything here is tested with mocks.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

from jax._src import xla_bridge

logger = logging.getLogger(__name__)

PLATFORM = "ascend"
ENV_LIBRARY = "DEEPMOE_ASCEND_PJRT_LIBRARY"
ENV_VISIBLE_DEVICES = "DEEPMOE_ASCEND_VISIBLE_DEVICES"
TOOLKIT_ENVS = ("ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME")
TOOLKIT_RELATIVE_PATH = os.path.join("lib64", "libpjrt_ascend.so")
JAX_PLUGIN_ENV = "PJRT_NAMES_AND_LIBRARY_PATHS"
# Same default as JAX's own register_plugin: above tpu (300) and cuda, so a machine that really
# has an Ascend plugin uses it by default.
PRIORITY = 400

# States a probe can end in. "ok" states mean JAX has (or will have) an `ascend` backend factory.
REGISTERED = "registered"
DEFERRED_TO_JAX = "deferred-to-jax"
ALREADY_REGISTERED = "already-registered"
NOT_FOUND = "not-found"
LOAD_FAILED = "load-failed"
NOT_INITIALIZED = "not-initialized"
OK_STATES = (REGISTERED, DEFERRED_TO_JAX, ALREADY_REGISTERED)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One place a library was looked for, and what was there."""

    source: str  # e.g. "$DEEPMOE_ASCEND_PJRT_LIBRARY"
    path: str | None  # None when the variable behind it is unset
    found: bool
    detail: str  # human-readable: "not set", "no such file", "found", ...


@dataclasses.dataclass(frozen=True)
class PluginStatus:
    """Outcome of looking for (and possibly registering) the Ascend PJRT library."""

    state: str
    library: str | None
    source: str | None
    candidates: tuple[Candidate, ...]
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.state in OK_STATES

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"ok": self.ok}


class AscendPluginNotFoundError(RuntimeError):
    """Platform `ascend` was requested but no usable PJRT library was found."""


# Plugin registration is process-global in JAX itself, so the record of what we did is too.
_STATUS: PluginStatus | None = None
_LOCK = threading.Lock()


def _jax_env_entry(environ: Mapping[str, str]) -> str | None:
    """The `ascend` path in PJRT_NAMES_AND_LIBRARY_PATHS, parsed the way JAX parses it."""
    for item in environ.get(JAX_PLUGIN_ENV, "").split(","):
        name, sep, path = item.partition(os.pathsep)
        if sep and name.strip() == PLATFORM:
            return path.strip()
    return None


def _check(source: str, path: str | None, unset_detail: str) -> Candidate:
    if path is None:
        return Candidate(source, None, False, unset_detail)
    if os.path.isfile(path):
        return Candidate(source, path, True, "found")
    detail = "exists but is not a file" if os.path.exists(path) else "no such file"
    return Candidate(source, path, False, detail)


def find_library(environ: Mapping[str, str] | None = None) -> PluginStatus:
    """Look in every documented place (no loading); never raises.

    Every place is checked even after a hit so that doctor can show shadowed libraries.
    The returned state is DEFERRED_TO_JAX, NOT_FOUND, or NOT_INITIALIZED (= found, not loaded).
    """
    env = os.environ if environ is None else environ
    explicit = _check(f"${ENV_LIBRARY}", env.get(ENV_LIBRARY) or None, "not set")
    toolkit = tuple(
        _check(
            f"${var}/{TOOLKIT_RELATIVE_PATH}",
            os.path.join(env[var], TOOLKIT_RELATIVE_PATH) if env.get(var) else None,
            f"{var} not set",
        )
        for var in TOOLKIT_ENVS
    )
    jax_entry = _check(f"${JAX_PLUGIN_ENV} (ascend entry)", _jax_env_entry(env), "no 'ascend' entry")
    candidates = (explicit, *toolkit, jax_entry)

    if jax_entry.path is not None:
        # JAX will register this one itself; registering too would make it load the name twice.
        error = None if jax_entry.found else f"{jax_entry.path}: {jax_entry.detail} (JAX will fail to load it)"
        return PluginStatus(DEFERRED_TO_JAX, jax_entry.path, jax_entry.source, candidates, error)
    if explicit.path is not None:
        if explicit.found:
            return PluginStatus(NOT_INITIALIZED, explicit.path, explicit.source, candidates)
        return PluginStatus(NOT_FOUND, None, None, candidates,
                            f"{ENV_LIBRARY}={explicit.path}: {explicit.detail}")
    for cand in toolkit:
        if cand.found:
            return PluginStatus(NOT_INITIALIZED, cand.path, cand.source, candidates)
    return PluginStatus(NOT_FOUND, None, None, candidates, "no Ascend PJRT library in any place looked")


def plugin_options(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Client-creation options, read when JAX creates the client (not at registration).

    Only our own variable maps to `visible_devices`: ASCEND_RT_VISIBLE_DEVICES is applied by the
    CANN runtime itself and renumbers devices from 0, so forwarding it too would double-filter.
    Arbitrary extra options go through JAX's JAX_PJRT_CLIENT_CREATE_OPTIONS="key:value;...".
    """
    env = os.environ if environ is None else environ
    options: dict[str, Any] = {}
    visible = env.get(ENV_VISIBLE_DEVICES, "").strip()
    if visible and visible != "all":
        try:
            options["visible_devices"] = [int(x) for x in visible.split(",")]
        except ValueError as err:
            raise ValueError(
                f"{ENV_VISIBLE_DEVICES}={visible!r}: expected comma-separated device ids like 0,1,2"
            ) from err
    return options


def _register(found: PluginStatus) -> PluginStatus:
    if found.state == DEFERRED_TO_JAX:
        logger.info("Ascend PJRT library left to JAX (%s): %s", JAX_PLUGIN_ENV, found.library)
        return found
    if PLATFORM in xla_bridge._backend_factories:
        # Another plugin package already provides `ascend`; a second load would be an error.
        return dataclasses.replace(found, state=ALREADY_REGISTERED, error=None)
    if found.library is None:
        logger.info("No Ascend PJRT library (%s); `ascend` platform unavailable", found.error)
        return found
    try:
        xla_bridge.register_plugin(PLATFORM, priority=PRIORITY, library_path=found.library,
                                   options=lambda: plugin_options())
    except Exception as err:  # noqa: BLE001 - any load failure must stay a logged no-op
        logger.warning("Could not load Ascend PJRT library %s: %s", found.library, err)
        return dataclasses.replace(found, state=LOAD_FAILED, error=f"{found.library}: {err}")
    registration = xla_bridge._backend_factories.get(PLATFORM)
    if registration is None:  # register_plugin logs and returns on bad arguments
        return dataclasses.replace(found, state=LOAD_FAILED, error="register_plugin did not register")
    # register_plugin marks plugins fail-loudly, which would break plain CPU use of JAX on a host
    # whose NPU driver is broken. An explicit JAX_PLATFORMS / --platform ascend still fails loudly
    # (JAX treats explicitly listed platforms as must-succeed), and doctor shows the error.
    registration.fail_quietly = True
    logger.info("Registered Ascend PJRT plugin from %s (%s)", found.library, found.source)
    return dataclasses.replace(found, state=REGISTERED, error=None)


def initialize() -> None:
    """Entry point called by JAX's plugin discovery. Never raises; idempotent once registered."""
    global _STATUS
    with _LOCK:
        if _STATUS is not None and _STATUS.ok:
            return
        try:
            _STATUS = _register(find_library())
        except Exception as err:  # noqa: BLE001 - see module docstring: never break JAX start-up
            logger.warning("Ascend plugin initialisation failed: %s", err)
            _STATUS = PluginStatus(LOAD_FAILED, None, None, (), f"unexpected: {err!r}")


def status() -> PluginStatus:
    """What initialize() did, or, if JAX never called it, what it would find (state NOT_INITIALIZED
    with a library, or NOT_FOUND). Never loads anything."""
    if _STATUS is not None:
        return _STATUS
    found = find_library()
    return found if found.state != NOT_FOUND else dataclasses.replace(
        found, error=f"{found.error}; initialize() not yet called (is the jax_plugins entry point installed?)")


def describe_failure(st: PluginStatus) -> str:
    """Multi-line explanation naming every place looked, for errors and doctor."""
    lines = [f"No usable Ascend PJRT library ({st.state}): {st.error}", "Places looked, in order:"]
    for i, cand in enumerate(st.candidates, 1):
        where = f" -> {cand.path}" if cand.path else ""
        lines.append(f"  {i}. {cand.source}{where}: {cand.detail}")
    lines.append(
        f"Set {ENV_LIBRARY}=/path/to/libpjrt_ascend.so (see docs/ascend.md). "
        "Note: no public Ascend PJRT plugin exists today; one must be supplied by the vendor or built."
    )
    return "\n".join(lines)


def require() -> PluginStatus:
    """Make sure `ascend` is (or will be) a JAX backend; raise naming every place looked if not.

    Used by `--platform ascend`: re-probes, since the entry point may not have run yet.
    """
    initialize()
    st = status()
    if not st.ok or (st.state == DEFERRED_TO_JAX and st.error):
        raise AscendPluginNotFoundError(
            "Platform 'ascend' was requested but cannot be provided.\n" + describe_failure(st))
    return st
