"""Execution providers: the one table of per-provider differences, and what this machine can run.

Nothing outside this module branches on a provider name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ProviderSpec:
    """How edgekit drives one execution provider through onnxruntime-genai."""

    name: str
    genai_name: str | None
    """Name for ``og.Config.append_provider``; ``None`` for the CPU, which is the default."""
    ort_name: str
    one_run_at_a_time: bool = False
    """DirectML sessions allow a single concurrent run."""
    session_entries: tuple[tuple[str, str], ...] = ()
    """Session config entries used when ``strict`` loading forbids silent CPU fallback."""


_NO_SILENT_FALLBACK = (("session.disable_cpu_ep_fallback", "1"),)

PROVIDERS: dict[str, ProviderSpec] = {
    "cpu": ProviderSpec("cpu", None, "CPUExecutionProvider"),
    "cuda": ProviderSpec("cuda", "cuda", "CUDAExecutionProvider", session_entries=_NO_SILENT_FALLBACK),
    "dml": ProviderSpec("dml", "dml", "DmlExecutionProvider", True, _NO_SILENT_FALLBACK),
}


def _genai_check(function_name: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            import onnxruntime_genai as og

            return bool(getattr(og, function_name)())
        except Exception:
            return False

    return check


_DETECTORS: dict[str, Callable[[], bool]] = {
    "cpu": lambda: True,
    "cuda": _genai_check("is_cuda_available"),
    "dml": _genai_check("is_dml_available"),
}


def available_providers() -> list[str]:
    """Providers the installed onnxruntime-genai can start on this machine, in table order."""
    return [name for name in PROVIDERS if _DETECTORS[name]()]


def provider_report() -> list[dict[str, Any]]:
    """For each known provider: whether onnxruntime-genai and onnxruntime report it available."""
    try:
        import onnxruntime

        ort_names = set(onnxruntime.get_available_providers())
    except Exception:
        ort_names = set()
    return [
        {"provider": name, "genai": _DETECTORS[name](), "onnxruntime": spec.ort_name in ort_names}
        for name, spec in PROVIDERS.items()
    ]
