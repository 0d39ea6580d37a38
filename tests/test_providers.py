"""Provider detection and the fallback chain, with fakes for the providers this machine lacks."""

from __future__ import annotations

import warnings

import pytest

from edgekit.errors import ProviderUnavailableError
from edgekit.runtimes import model as runtime_model
from edgekit.runtimes.providers import PROVIDERS, available_providers, provider_report


def test_cpu_is_always_available_and_listed_first() -> None:
    assert available_providers()[0] == "cpu"
    report = {row["provider"]: row for row in provider_report()}
    assert set(report) == set(PROVIDERS)
    assert report["cpu"]["genai"] and report["cpu"]["onnxruntime"]


def test_missing_provider_falls_back_to_the_next_with_a_warning(tiny_llama_package) -> None:
    with pytest.warns(UserWarning, match="provider 'cuda' skipped"):
        model = runtime_model.load(tiny_llama_package, providers=["cuda", "cpu"])
    assert model.info.provider == "cpu"
    assert model.info.tried == ["cuda", "cpu"]


def test_missing_provider_raises_when_strict(tiny_llama_package) -> None:
    with pytest.raises(ProviderUnavailableError, match="provider 'dml' cannot start"):
        runtime_model.load(tiny_llama_package, providers=["dml", "cpu"], strict=True)


def test_provider_that_fails_at_session_start_falls_back(tiny_llama_package, monkeypatch) -> None:
    # Pretend this onnxruntime-genai was built with CUDA: the session start itself then fails.
    monkeypatch.setattr(runtime_model, "available_providers", lambda: ["cpu", "cuda"])
    with pytest.warns(UserWarning, match="provider 'cuda' skipped") as caught:
        model = runtime_model.load(tiny_llama_package, providers=["cuda", "cpu"])
    assert model.info.provider == "cpu"
    assert "not available in the installed" not in str(caught[0].message)  # the real start failure
    with pytest.raises(ProviderUnavailableError, match="cuda"):
        runtime_model.load(tiny_llama_package, providers=["cuda"], strict=True)


def test_cpu_only_chain_loads_without_warnings(tiny_llama_package) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = runtime_model.load(tiny_llama_package, "laptop-cpu-rtn")
    assert (model.info.variant, model.info.provider) == ("int4-rtn", "cpu")


def test_unknown_provider_is_a_usage_error(tiny_llama_package) -> None:
    from edgekit.errors import UsageError

    with pytest.raises(UsageError, match="unknown provider 'tpu'"):
        runtime_model.load(tiny_llama_package, providers=["tpu"])


def test_stop_strings_and_seeded_sampling(tiny_llama_package) -> None:
    with runtime_model.load(tiny_llama_package, variant="fp32") as model:
        free = model.generate("hello world", max_new_tokens=12)
        assert free
        stop = free[3:5]
        stopped = model.generate("hello world", max_new_tokens=12, stop=[stop])
        assert stopped == free[: free.find(stop)]
        first = model.generate("hello", max_new_tokens=8, temperature=1.0, seed=7)
        again = model.generate("hello", max_new_tokens=8, temperature=1.0, seed=7)
        assert first == again
