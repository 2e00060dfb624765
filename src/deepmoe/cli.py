"""The `deepmoe` command. Each sub-command lives in its own module with a `main(argv)`.

`--platform {auto,cpu,gpu,tpu,ascend}` is accepted by every command (anywhere on the line) and applied before
JAX initialises a backend; multi-host runs start through `jax.distributed.initialize` when the DEEPMOE_*
coordinator variables are set (see docs/ascend.md). Compiled programs are kept on disk for the next run
(`deepmoe.backend.compile_cache`; not for `bench`).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

COMMANDS = {
    "info": ("deepmoe.info", "parameter table of every preset"),
    "train": ("deepmoe.train.loop", "train a model (progress bar, metrics.jsonl, plots, checkpoints)"),
    "generate": ("deepmoe.infer.cli", "sample from a checkpoint or preset (streams to stdout)"),
    "plan": ("deepmoe.plan", "memory / FLOPs / communication per device for a mesh"),
    "convert": ("deepmoe.io.convert", "official/HF safetensors <-> orbax checkpoints"),
    "bench": ("deepmoe.bench", "tokens/s and MFU vs this machine's measured peak"),
    "doctor": ("deepmoe.backend.doctor", "platform, devices, PJRT plugins, kernel choices"),
}
UNCACHED = {"bench"}  # measures compile time, so it compiles every program (backend/compile_cache.py)


def _available() -> dict[str, tuple[str, str]]:
    return {name: entry for name, entry in COMMANDS.items() if importlib.util.find_spec(entry[0]) is not None}


def _usage() -> str:
    lines = ["usage: deepmoe COMMAND [options]   (deepmoe COMMAND --help for a command's options)", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in _available().items()]
    return "\n".join(lines)


def _pop_platform(argv: list[str]) -> tuple[str, list[str]]:
    rest, platform, i = [], "auto", 0
    while i < len(argv):
        if argv[i] == "--platform" and i + 1 < len(argv):
            platform, i = argv[i + 1], i + 2
        elif argv[i].startswith("--platform="):
            platform, i = argv[i].split("=", 1)[1], i + 1
        else:
            rest.append(argv[i])
            i += 1
    return platform, rest


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, platform_and_rest = argv[0], argv[1:]
    available = _available()
    if command not in available:
        print(f"deepmoe: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    platform, rest = _pop_platform(platform_and_rest)
    from deepmoe.backend.cli_support import apply_platform, maybe_initialize_distributed
    from deepmoe.backend.compile_cache import use_compilation_cache
    from deepmoe.backend.host_memory import keep_host_buffers

    apply_platform(platform)
    keep_host_buffers()
    if command not in UNCACHED:
        use_compilation_cache()
    maybe_initialize_distributed()
    result = importlib.import_module(available[command][0]).main(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
