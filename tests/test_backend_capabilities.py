"""Per-platform selection: kernels, MoE strategy, dtypes, mesh suggestion, and their reasons."""

from __future__ import annotations

import dataclasses
import math

import pytest

from deepmoe.backend import capabilities as caps
from deepmoe.backend.capabilities import select


@pytest.fixture(autouse=True)
def no_platform_env(monkeypatch):
    monkeypatch.delenv(caps.ENV_PLATFORM, raising=False)


@pytest.mark.parametrize(
    "platform, kernels, ep_strategy, dtype",
    [("cpu", "reference", "ep_all_to_all", "float32"),
     ("gpu", "pallas", "ep_ragged", "bfloat16"),
     ("tpu", "pallas", "ep_ragged", "bfloat16"),
     ("ascend", "reference", "ep_all_to_all", "bfloat16")])
def test_select_each_platform(platform, kernels, ep_strategy, dtype):
    sel = select(platform, device_count=8)
    assert (sel.platform, sel.kernels, sel.compute_dtype) == (platform, kernels, dtype)
    assert sel.use_pallas == (kernels == "pallas")
    assert not sel.fp8_compute  # nothing live to prove FP8 support
    assert select(platform, device_count=8, expert_axis_size=4).moe_strategy == ep_strategy
    assert select(platform, device_count=8, expert_axis_size=1).moe_strategy == "sorted"
    assert math.prod(sel.mesh_shape.values()) == 8
    for field in dataclasses.fields(sel):
        if field.name.endswith("reason"):
            assert getattr(sel, field.name), field.name


def test_ascend_has_no_fp8_and_says_why():
    sel = select("ascend", device_count=8)
    assert not sel.fp8_compute and "FP8" in sel.compute_dtype_reason
    assert sel.mesh_shape == {"data": 1, "fsdp": 1, "expert": 8, "tensor": 1}
    assert sel.moe_strategy == "ep_all_to_all" and "all_to_all" in sel.moe_strategy_reason


def test_default_meshes():
    assert select("cpu", device_count=8).mesh_shape == {"data": 8, "fsdp": 1, "expert": 1, "tensor": 1}
    assert select("cpu", device_count=8).moe_strategy == "sorted"
    assert select("gpu", device_count=16).mesh_shape == {"data": 2, "fsdp": 1, "expert": 8, "tensor": 1}
    assert select("gpu", device_count=16).moe_strategy == "ep_ragged"
    assert select("tpu", device_count=1).mesh_shape["expert"] == 1
    for platform in caps.PLATFORMS:
        for n in (1, 2, 3, 6, 12, 24, 256):
            shape = dict(caps.suggest_mesh(platform, n))
            assert list(shape) == list(caps.MESH_AXES) and math.prod(shape.values()) == n


def test_aliases_and_unknown_platform():
    assert select("cuda", device_count=1).platform == "gpu"
    assert select("ROCm", device_count=1).platform == "gpu"
    assert select("npu", device_count=1).platform == "ascend"
    odd = select("metal", device_count=4, expert_axis_size=2)
    assert (odd.kernels, odd.moe_strategy) == ("reference", "ep_all_to_all")
    assert "unknown" in odd.platform_reason and "unknown" in odd.kernels_reason


def test_platform_resolution_order(monkeypatch):
    # Nothing given: JAX's live default backend (CPU in the test suite), by registered name.
    sel = select()
    assert sel.platform == "cpu" and "default backend" in sel.platform_reason
    assert sel.device_count >= 1 and "live" in sel.mesh_reason
    monkeypatch.setenv(caps.ENV_PLATFORM, "tpu")
    sel = select(device_count=4)
    assert sel.platform == "tpu" and caps.ENV_PLATFORM in sel.platform_reason
    assert select("ascend", device_count=4).platform == "ascend"  # explicit beats env
    monkeypatch.setenv(caps.ENV_PLATFORM, "auto")
    assert select().platform == "cpu"


def test_not_live_platform_does_not_guess_device_count():
    sel = select("tpu")
    assert sel.device_count == 1 and "assumed" in sel.mesh_reason


def test_selection_is_frozen_and_hashable():
    sel = select("gpu", device_count=8)
    assert hash(sel) == hash(select("gpu", device_count=8))
    with pytest.raises(dataclasses.FrozenInstanceError):
        sel.kernels = "reference"  # type: ignore[misc]
    assert sel.as_dict()["mesh"] == sel.mesh_shape
