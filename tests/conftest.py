"""Shared fixtures: a CLI runner and tiny checkpoints built once per session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="session")
def private_user_cache(tmp_path_factory: pytest.TempPathFactory):
    """The user's cache (verdicts, sensitivity tables, tuning records) in a folder of this test session only:
    a record ``edgekit tune`` left on the machine must not change what a test loads."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("user-cache")))
        yield


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory):
    """Factory: the tiny checkpoint folder of a model_type, made on first use."""
    from tiny_models import make_tiny_checkpoint

    made: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in made:
            folder = tmp_path_factory.mktemp(f"tiny-{model_type}")
            made[model_type] = make_tiny_checkpoint(model_type, folder)
        return made[model_type]

    return get


@pytest.fixture(scope="session")
def tiny_llama_package(tiny_checkpoints, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A package built once from the tiny llama checkpoint for ``laptop-cpu-rtn`` (its default variant int4-rtn)."""
    from edgekit.pipeline import build

    out = tmp_path_factory.mktemp("pkg") / "llama"
    build(tiny_checkpoints("llama"), out, "laptop-cpu-rtn", progress=False)
    return out


@pytest.fixture(scope="session")
def smollm2_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo SmolLM2-135M-Instruct GGUF built once for ``laptop-cpu`` with the CLI (the tests only read it)."""
    from edgekit.cli import main
    from edgekit.demo import demo_gguf_path

    out = tmp_path_factory.mktemp("smollm2") / "pkg"
    result = CliRunner().invoke(main, ["build", str(demo_gguf_path()), "-o", str(out), "--target", "laptop-cpu"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def kept_gptq_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A copy of the GPTQ checkpoint the next build writes (in its temporary folder) goes to ``["folder"]``."""
    import edgekit.quant.gptq_checkpoint as checkpoint_module

    kept: dict[str, Path] = {}
    original = checkpoint_module.write_gptq_checkpoint

    def keep_copy(hf_folder, out, *args, **kwargs):  # type: ignore[no-untyped-def]
        result = original(hf_folder, out, *args, **kwargs)
        kept["folder"] = Path(shutil.copytree(out, tmp_path / "gptq-checkpoint"))
        return result

    monkeypatch.setattr(checkpoint_module, "write_gptq_checkpoint", keep_copy)
    return kept


def snapshot(folder: Path) -> set[str]:
    """Every path under ``folder`` (to assert that a failed command wrote nothing)."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}
