"""What this CPU can compute in: the one place that asks, so a run, its report and the tests agree.

``TUNEFLOW_CPU_BF16=0`` makes tuneflow behave as on a CPU without bfloat16 arithmetic
(``precision=auto`` picks float32, OpenVINO computes at f32 and says so); the suite runs its
precision tests both ways on any machine with it. ``=1`` cannot add what the silicon lacks to
OpenVINO (its CPU plugin silently computes f32 there), so it only steers ``precision=auto``.
"""
from __future__ import annotations

import functools
import os

# OpenVINO inference precision -> the CPU plugin capability it needs. Without it the plugin
# computes in f32 without a word (OpenVINO 2025-2026); we say so instead (``openvino_precision``).
_OV_NEEDS = {"bf16": "BF16", "f16": "FP16"}


def _forced() -> bool | None:
    v = os.environ.get("TUNEFLOW_CPU_BF16", "").strip().lower()
    return {"0": False, "false": False, "no": False, "1": True, "true": True, "yes": True}.get(v)


def cpu_supports_bf16() -> bool:
    """True on CPUs with AVX512-BF16 or AMX-BF16 (Linux ``/proc/cpuinfo``), or as forced by
    ``TUNEFLOW_CPU_BF16``."""
    forced = _forced()
    if forced is not None:
        return forced
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@functools.lru_cache(maxsize=None)
def _openvino_capabilities() -> frozenset[str]:
    import openvino as ov
    return frozenset(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def openvino_precision(hint: str) -> str:
    """The precision OpenVINO's CPU plugin really computes at when asked for ``hint``
    (``f32``/``bf16``/``f16``): ``hint`` where the CPU has it, else ``f32``."""
    need = _OV_NEEDS.get(hint)
    if need is None:
        return hint
    if need == "BF16" and _forced() is False:
        return "f32"
    return hint if need in _openvino_capabilities() else "f32"
