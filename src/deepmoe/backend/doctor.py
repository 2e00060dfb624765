"""Data behind `deepmoe doctor`: versions, devices, PJRT plugins, and the choices that will run.

Every section is gathered independently and a failure becomes an `error` entry in that section:
doctor is what people run when something is broken, so it must not break itself.
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import platform as py_platform
from collections import Counter
from collections.abc import Callable
from typing import Any

from jax._src import xla_bridge

from deepmoe.backend import ascend_plugin
from deepmoe.backend.capabilities import ENV_PLATFORM, select
from deepmoe.backend.compile_cache import cache_contents

# Variables that change which platform, plugin or devices JAX uses.
_ENV_PREFIXES = ("DEEPMOE_", "JAX_", "PJRT_", "ASCEND_", "XLA_FLAGS", "CUDA_VISIBLE_DEVICES",
                 "TPU_", "LD_LIBRARY_PATH")


def _guard(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - report, never raise (see module docstring)
        return {"error": f"{type(err).__name__}: {err}"}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _versions() -> dict[str, Any]:
    return {"python": py_platform.python_version(), "jax": _version("jax"),
            "jaxlib": _version("jaxlib"), "deepmoe": _version("deepmoe"),
            "system": f"{py_platform.system()} {py_platform.machine()}"}


def _environment() -> dict[str, str]:
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(_ENV_PREFIXES)}


def _backends() -> dict[str, Any]:
    # Initialising backends is the point: it runs plugin discovery exactly as a real run would.
    clients = xla_bridge.backends()
    default = xla_bridge.get_backend()
    out: dict[str, Any] = {}
    for name, client in clients.items():
        devices = client.devices()
        out[name] = {
            "default": client is default,
            "client_platform": client.platform,
            "platform_version": getattr(client, "platform_version", ""),
            "device_count": len(devices),
            "local_device_count": client.local_device_count(),
            "device_kinds": dict(Counter(d.device_kind for d in devices)),
            "process_index": client.process_index(),
        }
    return out


def _plugins() -> dict[str, Any]:
    entry_points = [
        {"name": ep.name, "module": ep.value, "distribution": ep.dist.name if ep.dist else None}
        for ep in metadata.entry_points(group="jax_plugins")
    ]
    registrations = getattr(xla_bridge, "_backend_factories", {})
    return {
        "entry_points": entry_points,
        "registered": sorted(registrations),
        "pjrt_c_api": sorted(n for n, r in registrations.items() if getattr(r, "c_api", None) is not None),
        "failed": dict(getattr(xla_bridge, "_backend_errors", {})),
        "ascend": ascend_plugin.status().as_dict(),
    }


def doctor_report() -> dict[str, Any]:
    """Everything `deepmoe doctor` shows, as JSON-serialisable data."""
    report: dict[str, Any] = {"versions": _guard(_versions), "environment": _guard(_environment)}
    report["backends"] = _guard(_backends)
    report["plugins"] = _guard(_plugins)  # after backends: discovery has run by then
    report["selection"] = _guard(lambda: select().as_dict())
    # The hypothetical is sized as one 8-NPU server so it shows the expert-parallel strategy.
    report["selection_ascend"] = _guard(lambda: select("ascend", device_count=8).as_dict())
    report["compilation_cache"] = _guard(cache_contents)
    return report


def _section(title: str, body: Any, lines: list[str]) -> None:
    lines.append(f"== {title}")
    if isinstance(body, dict) and "error" in body and len(body) == 1:
        lines.append(f"  ERROR {body['error']}")
        return
    for key, value in (body.items() if isinstance(body, dict) else [("", body)]):
        lines.append(f"  {key}: {value}")


def format_doctor(report: dict[str, Any]) -> str:
    """Human-readable rendering of doctor_report()."""
    lines: list[str] = []
    _section("versions", report.get("versions", {}), lines)
    _section("environment", report.get("environment", {}) or {"(none set)": ""}, lines)

    backends = report.get("backends", {})
    lines.append("== backends")
    if "error" in backends:
        lines.append(f"  ERROR {backends['error']}")
    for name, info in backends.items():
        if name == "error":
            continue
        star = " (default)" if info["default"] else ""
        lines.append(f"  {name}{star}: {info['device_count']} device(s) {info['device_kinds']}, "
                     f"client platform {info['client_platform']!r} {info['platform_version']}".rstrip())

    plugins = report.get("plugins", {})
    lines.append("== PJRT plugins")
    if "error" in plugins:
        lines.append(f"  ERROR {plugins['error']}")
    else:
        eps = ", ".join(f"{e['name']}={e['module']}" for e in plugins["entry_points"]) or "none"
        lines.append(f"  jax_plugins entry points: {eps}")
        lines.append(f"  registered backends: {', '.join(plugins['registered'])}")
        lines.append(f"  PJRT C API plugins: {', '.join(plugins['pjrt_c_api']) or 'none'}")
        for name, err in plugins["failed"].items():
            lines.append(f"  FAILED {name}: {err}")
        asc = plugins["ascend"]
        lines.append(f"  ascend: {asc['state']}" + (f" from {asc['library']} ({asc['source']})"
                                                    if asc["library"] else ""))
        if asc["error"]:
            lines.append(f"    reason: {asc['error']}")
        for cand in asc["candidates"]:
            where = f" -> {cand['path']}" if cand["path"] else ""
            lines.append(f"    looked at {cand['source']}{where}: {cand['detail']}")

    for key, title in (("selection", "what will run"), ("selection_ascend", "what would run on one 8-NPU Ascend server")):
        sel = report.get(key, {})
        lines.append(f"== {title}")
        if "error" in sel:
            lines.append(f"  ERROR {sel['error']}")
            continue
        lines.append(f"  platform: {sel['platform']}  ({sel['platform_reason']})")
        lines.append(f"  kernels: {sel['kernels']}  ({sel['kernels_reason']})")
        lines.append(f"  MoE strategy: {sel['moe_strategy']}  ({sel['moe_strategy_reason']})")
        lines.append(f"  compute dtype: {sel['compute_dtype']}, FP8 {'yes' if sel['fp8_compute'] else 'no'}"
                     f"  ({sel['compute_dtype_reason']})")
        mesh = ",".join(f"{k}={v}" for k, v in sel["mesh"].items())
        lines.append(f"  suggested mesh: {mesh}  ({sel['mesh_reason']})")
    cache = report.get("compilation_cache", {})
    lines.append("== compilation cache (deepmoe.backend.compile_cache)")
    if "error" in cache:
        lines.append(f"  ERROR {cache['error']}")
    elif cache.get("directory"):
        limit = "no limit" if cache["max_bytes"] == -1 else f"at most {cache['max_bytes'] / 2**20:.0f} MiB"
        lines.append(f"  {cache['directory']}: {cache['programs']} programs, {cache['bytes'] / 2**20:.1f} MiB "
                     f"({limit})")
    else:
        lines.append("  off: every run compiles its programs")
    lines.append(f"(override the platform with --platform or ${ENV_PLATFORM}; see docs/ascend.md)")
    return "\n".join(lines)


def run(as_json: bool = False) -> int:
    """`deepmoe doctor` body: print the report; exit code 0 (doctor reports problems, it does not fail)."""
    report = doctor_report()
    print(json.dumps(report, indent=2, default=str) if as_json else format_doctor(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="deepmoe doctor", description="Platform, devices, PJRT plugins and "
                                     "the kernel / MoE choices that will run, and why.")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return run(as_json=parser.parse_args(argv).json)
