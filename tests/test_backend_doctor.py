"""`deepmoe doctor` data and rendering."""

from __future__ import annotations

import json

import jax
import pytest

from deepmoe.backend import ascend_plugin as ap
from deepmoe.backend import doctor


@pytest.fixture
def clean(monkeypatch):
    for var in (ap.ENV_LIBRARY, ap.JAX_PLUGIN_ENV, *ap.TOOLKIT_ENVS, "DEEPMOE_PLATFORM"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(ap, "_STATUS", None)
    return monkeypatch


def test_report_contents(clean):
    report = doctor.doctor_report()
    json.dumps(report)  # `deepmoe doctor --json` must work
    assert report["versions"]["jax"] == jax.__version__
    assert report["versions"]["jaxlib"]
    cpu = report["backends"]["cpu"]
    assert cpu["device_count"] == jax.device_count("cpu") and cpu["default"]
    assert "cpu" in report["plugins"]["registered"]
    asc = report["plugins"]["ascend"]
    assert asc["state"] == ap.NOT_FOUND and not asc["ok"] and len(asc["candidates"]) == 4
    sel = report["selection"]
    assert (sel["platform"], sel["kernels"]) == ("cpu", "reference") and sel["kernels_reason"]
    hypo = report["selection_ascend"]
    assert (hypo["kernels"], hypo["moe_strategy"], hypo["fp8_compute"]) == ("reference", "ep_all_to_all", False)


def test_format_names_places_choices_and_reasons(clean):
    text = doctor.format_doctor(doctor.doctor_report())
    for needle in ("== versions", "jax: ", "cpu (default)", "ascend: not-found",
                   "looked at $DEEPMOE_ASCEND_PJRT_LIBRARY: not set", "ASCEND_TOOLKIT_HOME not set",
                   "kernels: reference", "MoE strategy: sorted", "suggested mesh: data="):
        assert needle in text, (needle, text)


def test_a_broken_section_is_reported_not_raised(clean):
    def boom(*args, **kwargs):
        raise RuntimeError("no platform for you")

    clean.setattr(doctor, "select", boom)
    report = doctor.doctor_report()
    assert report["selection"] == {"error": "RuntimeError: no platform for you"}
    assert "ERROR RuntimeError: no platform for you" in doctor.format_doctor(report)
    assert report["backends"]["cpu"]["device_count"] >= 1  # other sections unaffected


def test_run_prints(clean, capsys):
    assert doctor.run(as_json=True) == 0
    assert json.loads(capsys.readouterr().out)["selection"]["platform"] == "cpu"
