"""A persistent compilation cache for the deepmoe commands: a later run loads its compiled programs from disk
instead of compiling them again.

On CPU, XLA compiling is most of a command's start-up: `make demo` spends ~36 of its ~80 s compiling the
training programs, `deepmoe generate --preset tiny` ~13 of ~20 s compiling prefill and decoding. JAX can keep
executables on disk, keyed by the program, the compile options, the jax / jaxlib version and the devices, and
then loads a program instead of compiling it. `use_compilation_cache()` turns that on; the `deepmoe` commands
call it (all but `deepmoe bench`, which measures compile time) and so does `make demo`. Library users call it
too, before their first jitted call, or set JAX's own options.

- The cache lives in $DEEPMOE_COMPILATION_CACHE if set, else in $XDG_CACHE_HOME/deepmoe/xla (by default
  ~/.cache/deepmoe/xla). DEEPMOE_COMPILATION_CACHE=0 turns it off.
- A cache directory already given to JAX (JAX_COMPILATION_CACHE_DIR, `jax.config`) is kept, with its settings.
- It holds at most MAX_BYTES: JAX deletes the least recently used programs beyond that
  (JAX_COMPILATION_CACHE_MAX_SIZE, in bytes, overrides it). Programs that compile in under a second are not
  stored (JAX's default threshold).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Mapping

ENV_CACHE = "DEEPMOE_COMPILATION_CACHE"
MAX_BYTES = 2 * 2**30


def cache_directory(environ: Mapping[str, str], configured: str | None) -> tuple[Path | None, str]:
    """Where the commands' cache goes -> (directory or None, why). `configured`: JAX's current cache directory."""
    if configured:
        return None, f"kept JAX's configured cache directory {configured}"
    chosen = environ.get(ENV_CACHE, "")
    if chosen == "0":
        return None, f"off ({ENV_CACHE}=0)"
    if chosen:
        return Path(chosen).expanduser(), f"from {ENV_CACHE}"
    base = environ.get("XDG_CACHE_HOME") or Path("~/.cache").expanduser()
    return Path(base) / "deepmoe" / "xla", "default"


def use_compilation_cache() -> str:
    """Turn on JAX's persistent compilation cache as the module docstring describes (before the first compile:
    JAX reads the settings then). Returns what happened, for logs."""
    import jax

    directory, why = cache_directory(os.environ, jax.config.jax_compilation_cache_dir)
    if directory is None:
        return why
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a read-only home, say: run without the cache rather than fail
        return f"off (cannot create {directory}: {e.strerror})"
    if not os.access(directory, os.W_OK):
        return f"off ({directory} is not writable)"
    jax.config.update("jax_compilation_cache_dir", str(directory))
    # -1 is JAX's default (no limit); its eviction needs the filelock package (a deepmoe dependency)
    if jax.config.jax_compilation_cache_max_size == -1 and importlib.util.find_spec("filelock"):
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return f"{directory} ({why})"


def cache_contents() -> dict:
    """JAX's cache directory now and what it holds: {"directory", "programs", "bytes", "max_bytes"}."""
    import jax

    directory = jax.config.jax_compilation_cache_dir
    if not directory:
        return {"directory": None}
    entries = [p for p in Path(directory).glob("*-cache") if p.is_file()]  # one file per program (JAX's naming)
    return {"directory": directory, "programs": len(entries), "bytes": sum(p.stat().st_size for p in entries),
            "max_bytes": jax.config.jax_compilation_cache_max_size}
