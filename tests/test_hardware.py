"""What the CPU computes in (tuneflow.hardware): read from /proc/cpuinfo, forced by TUNEFLOW_CPU_BF16,
and what OpenVINO really computes at for each precision hint."""
import pytest

from tuneflow import hardware


def _cpu_has_bf16() -> bool:
    flags = open("/proc/cpuinfo").read()
    return "avx512_bf16" in flags or "amx_bf16" in flags


@pytest.mark.parametrize("value, expected", [("0", False), ("no", False), ("false", False),
                                             ("1", True), ("yes", True), ("TRUE", True)])
def test_the_environment_forces_the_answer(monkeypatch, value, expected):
    monkeypatch.setenv("TUNEFLOW_CPU_BF16", value)
    assert hardware.cpu_supports_bf16() is expected


@pytest.mark.parametrize("value", [None, "", "maybe"])
def test_otherwise_the_cpu_flags_decide(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("TUNEFLOW_CPU_BF16", raising=False)
    else:
        monkeypatch.setenv("TUNEFLOW_CPU_BF16", value)
    assert hardware.cpu_supports_bf16() is _cpu_has_bf16()


def test_openvino_computes_bf16_only_where_the_cpu_can(monkeypatch):
    monkeypatch.delenv("TUNEFLOW_CPU_BF16", raising=False)
    assert hardware.openvino_precision("f32") == "f32"
    caps = hardware._openvino_capabilities()
    assert hardware.openvino_precision("bf16") == ("bf16" if "BF16" in caps else "f32")
    assert hardware.openvino_precision("f16") == ("f16" if "FP16" in caps else "f32")
    monkeypatch.setenv("TUNEFLOW_CPU_BF16", "0")  # a CPU without bf16: OpenVINO says f32
    assert hardware.openvino_precision("bf16") == "f32"
