"""The LM head precision option: every choice builds, loads and generates, for tied and untied heads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgekit.cli import main

pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

TARGETS = """
schema_version: 1
targets:
"""
for _head in ("int4", "int8", "float"):
    TARGETS += f"""
  head-{_head}:
    description: int4 body, {_head} LM head
    providers: [cpu]
    precision: int4
    block_size: 32
    accuracy_level: 4
    lm_head: {_head}
"""


@pytest.fixture(scope="module")
def targets_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("heads") / "targets.yaml"
    path.write_text(TARGETS)
    return path


def _head_node(model_file: Path) -> tuple[str, int | None]:
    graph = onnx.load(str(model_file), load_external_data=False).graph
    node = next(n for n in graph.node if n.name.startswith("/lm_head/"))
    bits = next((a.i for a in node.attribute if a.name == "bits"), None)
    return node.op_type, bits


@pytest.mark.slow
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_every_head_precision_builds_and_generates(runner, targets_file, tmp_path, tied) -> None:
    from tiny_models import make_tiny_checkpoint

    import edgekit

    source = make_tiny_checkpoint("llama", tmp_path / "source", tied=tied)
    expected = {"int4": ("MatMulNBits", 4), "int8": ("MatMulNBits", 8), "float": ("MatMul", None)}
    kl = {}
    for head, node in expected.items():
        out = tmp_path / head
        args = ["build", str(source), "-o", str(out), "-t", f"head-{head}", "--targets-file", str(targets_file)]
        result = runner.invoke(main, [*args, "--eval-windows", "2", "--eval-ctx", "64", "-q"])
        assert result.exit_code == 0, result.output
        assert _head_node(out / "int4-rtn" / "model.onnx") == node
        with edgekit.load(out) as model:
            assert len(model.generate_tokens([5, 6, 7], max_new_tokens=4)) == 4
        kl[head] = json.loads((out / "manifest.json").read_text())["evaluation"]["variants"]["int4-rtn"]["kl_mean"]
    # Same int4 body; only the head differs, so the error can only shrink as the head gets finer.
    assert kl["float"] <= kl["int8"] <= kl["int4"], kl
