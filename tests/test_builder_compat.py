"""The one module that touches onnxruntime-genai's builder internals: the version pin, and that nothing else does."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import edgekit
from edgekit.errors import EdgekitError, MissingDependencyError
from edgekit.exporters import builder_compat
from edgekit.exporters.builder_compat import SUPPORTED_VERSIONS, MatMulCall, check_builder_version
from edgekit.sources.registry import registered_architectures

ROOT = Path(edgekit.__file__).parent
FIX = 'pip install "onnxruntime-genai>=0.18,<0.19"'


@pytest.mark.parametrize("version", ["0.18.0", "0.18.3", "0.18.1.dev20260101"])
def test_a_supported_version_passes(version: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builder_compat, "installed_version", lambda: version)
    check_builder_version()


@pytest.mark.parametrize("version", ["0.17.2", "0.19.0", "0.19.0rc1", "1.18.0", "unknown"])
def test_an_unsupported_version_is_refused_in_one_line(version: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builder_compat, "installed_version", lambda: version)
    with pytest.raises(MissingDependencyError) as error:
        check_builder_version()
    message = str(error.value)
    assert "\n" not in message
    assert f"onnxruntime-genai {version} is installed" in message
    assert "supports onnxruntime-genai>=0.18,<0.19 only" in message
    assert FIX in message


def test_a_missing_builder_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builder_compat, "installed_version", lambda: None)
    with pytest.raises(MissingDependencyError, match=re.escape(f"onnxruntime-genai is not installed. {FIX}")):
        check_builder_version()


def test_the_installed_version_is_the_pinned_one() -> None:
    """The tests ran on the installed builder; pyproject.toml pins the range the run-time check accepts."""
    check_builder_version()
    pyproject = (ROOT.parent / "pyproject.toml").read_text(encoding="utf-8")
    assert f'"onnxruntime-genai{SUPPORTED_VERSIONS}"' in pyproject


@pytest.mark.parametrize("streamed", [False, True])
def test_exports_refuse_an_unsupported_version_before_writing_anything(
    streamed: bool, tiny_checkpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgekit.exporters.onnx_builder import run_builder
    from edgekit.exporters.streaming import run_streaming_builder

    monkeypatch.setattr(builder_compat, "installed_version", lambda: "0.19.1")
    log = tmp_path / "build.log"
    log.touch()
    export = run_streaming_builder if streamed else run_builder
    with pytest.raises(MissingDependencyError, match=r"onnxruntime-genai 0\.19\.1 is installed"):
        export(
            tiny_checkpoints("qwen3"), tmp_path / "pkg" / "int4", precision="int4", provider="cpu", options={},
            cache_dir=tmp_path / "cache", log_path=log,
        )  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build.log"]
    assert log.read_text() == ""


def _imports_of_the_builder(path: Path) -> list[str]:
    """The ``onnxruntime_genai.models`` modules ``path`` imports (lazy imports and ``import_module`` strings too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found += [node.module] if node.module.startswith("onnxruntime_genai.models") else []
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("onnxruntime_genai.models")]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found += [node.value] if node.value.startswith("onnxruntime_genai.models.") else []
    return found


def test_only_builder_compat_touches_the_builder_internals() -> None:
    users = {
        path.relative_to(ROOT).as_posix(): imports
        for path in sorted(ROOT.rglob("*.py"))
        if (imports := _imports_of_the_builder(path))
    }
    assert list(users) == ["exporters/builder_compat.py"], users
    # The scan must see builder_compat's own imports, or it proves nothing.
    assert any(name.startswith("onnxruntime_genai.models.") for name in users["exporters/builder_compat.py"])


def test_type_ignores_live_in_builder_compat_only_and_say_why() -> None:
    for name in ("streaming.py", "onnx_builder.py"):
        assert "type: ignore" not in (ROOT / "exporters" / name).read_text(encoding="utf-8"), name
    for line in (ROOT / "exporters" / "builder_compat.py").read_text(encoding="utf-8").splitlines():
        if "type: ignore" in line:
            assert re.search(r"type: ignore\[[\w-]+\]\s+#\s*\w", line), f"an ignore without its reason: {line}"


@pytest.mark.parametrize(
    "architecture",
    [arch for arch in registered_architectures() if arch.streamed_builder is not None],
    ids=lambda arch: arch.model_type,
)
def test_every_streamed_builder_exists_in_the_installed_builder(architecture) -> None:
    """The registry names classes of the pinned builder; each hook overrides a method the class has."""
    spec = architecture.streamed_builder
    streamed = builder_compat.streamed_builder_class(spec)
    assert streamed.__name__ == f"Streaming{spec.class_name}"
    graph_class = streamed.get_decoder_model_class(None) if spec.decoder_class else streamed  # type: ignore[attr-defined]
    for hook in ("load_weights", "make_embedding", "make_layer", "make_layernorm", "make_lm_head", "save_model"):
        assert hook in vars(graph_class), hook
    assert ("make_matmul_nbits" in vars(graph_class)) == bool(spec.nbits_output_aliases)


def test_a_hook_on_a_method_the_builder_lacks_is_refused() -> None:
    class RenamedBuilder:  # a future builder whose make_lm_head was renamed
        def make_embedding(self) -> None: ...

    with pytest.raises(EdgekitError, match=r"RenamedBuilder has no .*make_lm_head.* which the streamed export hooks"):
        builder_compat._streamed_subclass(RenamedBuilder, ())


def test_matmul_call_names_its_weight_as_the_builder_does() -> None:
    call = MatMulCall("/model/layers.0/attn/q_proj/MatMul", "x", "/model/layers.0/attn/q_proj/MatMul/output_0", "s")
    assert call.weight_name == "model.layers.0.attn.q_proj.MatMul.weight"


def test_the_repacker_knows_gptq_and_awq_only() -> None:
    from edgekit.exporters.builder_compat import PackedLinearRepacker

    assert PackedLinearRepacker.METHODS == ("gptq", "awq")
    with pytest.raises(ValueError, match="no repacking for 'exl2' checkpoints"):
        PackedLinearRepacker("exl2")
