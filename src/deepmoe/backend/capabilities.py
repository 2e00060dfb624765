"""Per-platform capability table and the kernel / MoE-strategy / dtype / mesh choices derived from it.

The model never asks "am I on a GPU?": it asks `select()` and gets a frozen `Selection` with the
choice and the reason for each, which `deepmoe doctor` prints verbatim.
"""

from __future__ import annotations

import dataclasses
import math
import os
from types import MappingProxyType
from typing import Any

import jax
from jax._src import xla_bridge

PLATFORMS = ("cpu", "gpu", "tpu", "ascend")
ENV_PLATFORM = "DEEPMOE_PLATFORM"
# Names JAX (or a plugin's client) may report, folded onto our four platforms.
_ALIASES = MappingProxyType({"cuda": "gpu", "rocm": "gpu", "npu": "ascend"})
MESH_AXES = ("data", "fsdp", "expert", "tensor")  # architecture.md §4 order


@dataclasses.dataclass(frozen=True)
class PlatformCapabilities:
    platform: str
    kernels: str  # "pallas" | "reference"
    kernels_reason: str
    ragged_all_to_all: bool
    expert_parallel_strategy: str  # MoE strategy when the mesh has an expert axis > 1
    strategy_reason: str
    compute_dtype: str
    fp8_compute: bool
    dtype_reason: str
    # Devices behind one fast interconnect (NVLink / ICI / HCCS): expert all-to-all is cheap
    # inside it, so the suggested expert axis does not grow past it.
    fast_group: int
    mesh_reason: str


CAPABILITIES = MappingProxyType({
    "cpu": PlatformCapabilities(
        "cpu", "reference",
        "XLA:CPU has no Pallas lowering; kernels run as their pure-jnp references "
        "(kernel tests use interpret=True explicitly)",
        False, "ep_all_to_all",
        "lax.ragged_all_to_all is unimplemented on XLA:CPU; fixed-capacity lax.all_to_all runs",
        "float32", False,
        "bf16 dots are emulated by upcasting on most CPUs, so f32 is as fast and matches the f32 oracles",
        1, "host devices share memory, so expert parallelism saves nothing: batch-parallel only"),
    "gpu": PlatformCapabilities(
        "gpu", "pallas", "Pallas lowers to Triton/Mosaic-GPU on CUDA and ROCm",
        True, "ep_ragged", "lax.ragged_all_to_all is implemented on GPU: dropless, no capacity padding",
        "bfloat16", False, "bf16 everywhere; FP8 matmuls only where the device is sm_89+ (checked per device)",
        8, "expert axis within one NVLink node (8 GPUs), data-parallel across nodes"),
    "tpu": PlatformCapabilities(
        "tpu", "pallas", "Pallas lowers to Mosaic on TPU",
        True, "ep_ragged", "lax.ragged_all_to_all is implemented on TPU: dropless, no capacity padding",
        "bfloat16", False, "bf16 is the MXU's native type; FP8 is not assumed on TPU",
        64, "expert axis over ICI (up to 64 chips, a divisor of common expert counts), data across slices"),
    "ascend": PlatformCapabilities(
        "ascend", "reference",
        "no Pallas lowering exists for Ascend; the pure-jnp references compile through the PJRT plugin",
        False, "ep_all_to_all",
        "ragged_all_to_all is not assumed in an Ascend PJRT plugin; fixed-capacity lax.all_to_all "
        "maps onto HCCL all-to-all",
        "bfloat16", False,
        "Ascend 910B/910C cube units do fp16/bf16/int8 but no FP8: FP8 weights are dequantized to bf16",
        8, "expert axis within one 8-NPU server (HCCS), data-parallel across servers"),
})

# For platforms we do not know (a future plugin): the choices that work wherever XLA works.
_FALLBACK = dataclasses.replace(
    CAPABILITIES["cpu"], platform="unknown",
    kernels_reason="unknown platform: pure-jnp reference kernels are the portable choice",
    strategy_reason="unknown platform: fixed-capacity lax.all_to_all is the portable collective",
    compute_dtype="bfloat16", dtype_reason="unknown accelerator: bf16 is the portable choice")


@dataclasses.dataclass(frozen=True)
class Selection:
    """What will run, and why. Frozen and hashable, so it can be a static jit argument."""

    platform: str
    platform_reason: str
    kernels: str
    kernels_reason: str
    moe_strategy: str  # "sorted" | "ep_all_to_all" | "ep_ragged"
    moe_strategy_reason: str
    compute_dtype: str
    fp8_compute: bool
    compute_dtype_reason: str
    device_count: int
    mesh: tuple[tuple[str, int], ...]  # (axis, size) in MESH_AXES order; product = device_count
    mesh_reason: str

    @property
    def mesh_shape(self) -> dict[str, int]:
        return dict(self.mesh)

    @property
    def use_pallas(self) -> bool:
        return self.kernels == "pallas"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"mesh": self.mesh_shape}


def normalize_platform(name: str) -> str:
    """Fold JAX / plugin platform names onto ours: cuda, rocm -> gpu; npu -> ascend."""
    name = name.strip().lower()
    return _ALIASES.get(name, name)


def current_platform() -> str:
    """The platform of JAX's default backend, by the name it was *registered* under.

    jax.default_backend() reports the client's own platform string, which for a plugin is
    whatever the vendor library says (and for a backend aliased to another client, that
    client's); the registration name is what users and `--platform` speak. Initialises backends.
    """
    default = xla_bridge.get_backend()
    for name, client in xla_bridge.backends().items():
        if client is default:
            return normalize_platform(name)
    return normalize_platform(jax.default_backend())


def resolve_platform(platform: str | None = None) -> tuple[str, str]:
    """(platform, reason): explicit argument, then $DEEPMOE_PLATFORM, then JAX's default backend."""
    if platform and platform != "auto":
        return normalize_platform(platform), f"requested explicitly ({platform!r})"
    env = os.environ.get(ENV_PLATFORM, "").strip()
    if env and env != "auto":
        return normalize_platform(env), f"from ${ENV_PLATFORM}={env}"
    return current_platform(), "JAX's default backend"


def capabilities(platform: str) -> PlatformCapabilities:
    return CAPABILITIES.get(normalize_platform(platform), _FALLBACK)


def suggest_mesh(platform: str, device_count: int) -> tuple[tuple[str, int], ...]:
    """A starting mesh: expert axis inside the fast interconnect, data across the rest.

    The model must still check that `expert` divides its routed-expert count.
    """
    caps = capabilities(platform)
    expert = math.gcd(device_count, caps.fast_group) if device_count > 1 else 1
    sizes = {"data": device_count // expert, "fsdp": 1, "expert": expert, "tensor": 1}
    return tuple((axis, sizes[axis]) for axis in MESH_AXES)


def _gpu_fp8() -> bool | None:
    """True/False if every visible GPU's compute capability is known, else None."""
    try:
        ccs = {getattr(d, "compute_capability", None) for d in jax.devices()}
    except RuntimeError:
        return None
    if not ccs or None in ccs:
        return None
    return all(tuple(int(p) for p in str(cc).split(".")[:2]) >= (8, 9) for cc in ccs)


def select(platform: str | None = None, *, device_count: int | None = None,
           expert_axis_size: int | None = None) -> Selection:
    """Resolve the platform and return the kernel, MoE strategy, dtype and mesh choices.

    device_count: defaults to JAX's device count when the platform is the live default backend,
      else 1 (nothing is initialised just to count devices of a platform we are not running on).
    expert_axis_size: size of the mesh's `expert` axis; defaults to the suggested mesh's.
    """
    name, platform_reason = resolve_platform(platform)
    caps = capabilities(name)
    if name not in PLATFORMS:
        platform_reason += f"; unknown platform, conservative defaults (known: {', '.join(PLATFORMS)})"

    live = xla_bridge.backends_are_initialized() and current_platform() == name
    if device_count is None:
        device_count = jax.device_count() if live else 1
        count_note = "live count" if live else "backend not live, so assumed; pass device_count"
    else:
        count_note = "as given"
    mesh = suggest_mesh(name, device_count)
    mesh_reason = f"{caps.mesh_reason}; {device_count} device(s), {count_note}"

    expert = dict(mesh)["expert"] if expert_axis_size is None else expert_axis_size
    if expert <= 1:
        strategy = "sorted"
        strategy_reason = ("no expert axis: on a mesh, local sort + ragged_dot per device, dropless, no collective "
                           "needed; on one device moe_dispatch.local_strategy picks sorted where the grouped matmul "
                           "is one (TPU; GPU with Pallas kernels) and blocked where XLA would expand ragged_dot")
    else:
        strategy, strategy_reason = caps.expert_parallel_strategy, caps.strategy_reason

    fp8, dtype_reason = caps.fp8_compute, caps.dtype_reason
    if name == "gpu" and live and (detected := _gpu_fp8()) is not None:
        fp8 = detected
        dtype_reason += f" (detected: FP8 {'available' if detected else 'unavailable'})"

    return Selection(
        platform=name, platform_reason=platform_reason,
        kernels=caps.kernels, kernels_reason=caps.kernels_reason,
        moe_strategy=strategy, moe_strategy_reason=strategy_reason,
        compute_dtype=caps.compute_dtype, fp8_compute=fp8, compute_dtype_reason=dtype_reason,
        device_count=device_count, mesh=mesh, mesh_reason=mesh_reason)
