"""Inputs that are not what they claim to be (issue "No code from a stranger's file", defects 4, 5, 7, 8, 10,
12 and 13): FIFOs and devices are refused without being opened for a blocking read, config values are checked
before any library sizes memory by them, a killed build's scratch space is swept, a failed build keeps its log,
`check` verifies what it passes, and legacy pickles load with --allow-pickle."""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import snapshot

from edgekit.cli import main
from edgekit.errors import CorruptFileError, SourceError, UsageError

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are a POSIX thing")


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def invoke_quickly(runner, args: list[str]) -> tuple[int, str]:
    """Run the CLI; a FIFO opened for a blocking read would hang here, so time it."""
    started = time.monotonic()
    result = runner.invoke(main, args)
    assert time.monotonic() - started < 10
    return result.exit_code, result.output


def test_a_fifo_named_like_a_weight_file_is_refused(runner, tmp_path: Path, tiny_checkpoints) -> None:
    source = Path(shutil.copytree(tiny_checkpoints("llama"), tmp_path / "src"))
    fifo(source / "model-00002-of-00002.safetensors")
    code, output = invoke_quickly(runner, ["build", str(source), "-o", str(tmp_path / "out"), "-q"])
    assert code == 2 and "model-00002-of-00002.safetensors: is a FIFO" in output
    assert not (tmp_path / "out").exists()


def test_a_fifo_named_config_json_is_refused(runner, tmp_path: Path, tiny_checkpoints) -> None:
    source = Path(shutil.copytree(tiny_checkpoints("llama"), tmp_path / "src"))
    (source / "config.json").unlink()
    fifo(source / "config.json")
    code, output = invoke_quickly(runner, ["build", str(source), "-o", str(tmp_path / "out"), "-q"])
    assert code == 2 and "config.json: is a FIFO" in output


@pytest.mark.parametrize("name", ["model.gguf", "models/model.gguf"])
def test_a_fifo_ending_in_gguf_is_a_fifo_not_a_hub_id(runner, tmp_path: Path, monkeypatch, name: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    fifo(tmp_path / name)
    code, output = invoke_quickly(runner, ["build", name, "-o", "out", "-q"])
    assert code == 2 and "is a FIFO, not a checkpoint folder or a GGUF file" in output
    assert "hub" not in output


def test_a_device_is_reported_as_a_device(runner, tmp_path: Path) -> None:
    code, output = invoke_quickly(runner, ["build", "/dev/zero", "-o", str(tmp_path / "out"), "-q"])
    assert code == 2 and "/dev/zero: is a device" in output and "does not exist" not in output


def test_fifo_text_and_targets_files_are_refused(runner, tmp_path: Path, tiny_llama_package: Path) -> None:
    text = fifo(tmp_path / "text.txt")
    code, output = invoke_quickly(runner, ["eval", str(tiny_llama_package), "--text", str(text)])
    assert code == 2 and "text.txt: is a FIFO" in output
    targets = fifo(tmp_path / "targets.yaml")
    code, output = invoke_quickly(runner, ["targets", "--targets-file", str(targets)])
    assert code == 2 and "targets.yaml: is a FIFO" in output


def test_readers_refuse_fifos_directly(tmp_path: Path) -> None:
    from edgekit.accuracy.texts import load_text
    from edgekit.sources.gguf_header import read_gguf_header
    from edgekit.sources.weight_files import read_safetensors_header

    pipe = fifo(tmp_path / "pipe")
    with pytest.raises(CorruptFileError, match="is a FIFO"):
        read_safetensors_header(pipe)
    with pytest.raises(CorruptFileError, match="is a FIFO"):
        read_gguf_header(pipe)
    with pytest.raises(UsageError, match="is a FIFO"):
        load_text(pipe)


@pytest.mark.parametrize(
    ("name", "content", "phrase"),
    [
        ("deep.jsonl", '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n", "line 1 is not JSON"),
        ("big-int.jsonl", '{"text": "a", "n": ' + "9" * 5000 + "}\n", "line 1 is not JSON"),
    ],
    ids=["nested", "huge-integer"],
)
def test_a_hostile_text_file_is_refused_in_one_line(tmp_path: Path, name: str, content: str, phrase: str) -> None:
    """Each gave a traceback (a red-team pass)."""
    from edgekit.accuracy.texts import load_text

    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UsageError, match=phrase):
        load_text(path)


def test_valid_texts_with_a_byte_order_mark_or_unicode_line_separators_load(tmp_path: Path) -> None:
    """JSON Lines holding U+2028 or U+0085 unescaped (json.dumps with ensure_ascii=False) were "line 1 is not
    JSON", and a byte-order mark was either that or part of the scored text."""
    from edgekit.accuracy.texts import load_text

    lines = [json.dumps({"text": t}, ensure_ascii=False) for t in ("one\u2028two", "three\x85four")]
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode("utf-8") + b"\r\n")
    assert load_text(jsonl).text == "one\u2028two\n\nthree\x85four"
    txt = tmp_path / "t.txt"
    txt.write_bytes(b"\xef\xbb\xbfplain text")
    assert load_text(txt).text == "plain text"


def test_a_text_larger_than_the_cap_is_refused_before_tokenizing(tmp_path: Path, monkeypatch) -> None:
    """A 180 MB text took 7 GB in the tokenizer (a red-team pass)."""
    from edgekit.accuracy import texts

    monkeypatch.setattr(texts, "MAX_TEXT_BYTES", 1000)
    path = tmp_path / "big.txt"
    path.write_text("word " * 300, encoding="utf-8")
    with pytest.raises(UsageError, match="is larger than"):
        texts.load_text(path)
    path.write_text("word " * 100, encoding="utf-8")
    assert texts.load_text(path).text.startswith("word")


# --- config values are checked before any library sizes memory by them --------------------------------


@pytest.mark.parametrize(
    ("key", "value", "phrase"),
    [
        ("num_hidden_layers", 1e9, "'num_hidden_layers' is 1000000000.0"),
        ("num_hidden_layers", 10**9, "'num_hidden_layers' is 1000000000; it must be an integer from 1 to 1024"),
        ("num_hidden_layers", True, "'num_hidden_layers' is True"),
        ("num_hidden_layers", 3, "declares 3 layers but the weight files hold layers 0..1"),
        ("hidden_size", -64, "'hidden_size' is -64"),
        ("vocab_size", "512", "'vocab_size' is 512"),
    ],
)
def test_config_values_are_checked_before_the_builder(runner, tmp_path: Path, tiny_checkpoints, key, value, phrase):
    source = Path(shutil.copytree(tiny_checkpoints("llama"), tmp_path / "src"))
    config = json.loads((source / "config.json").read_text())
    config[key] = value
    (source / "config.json").write_text(json.dumps(config))
    code, output = invoke_quickly(runner, ["build", str(source), "-o", str(tmp_path / "out"), "-q"])
    assert code == 2 and phrase in output and "Traceback" not in output


# --- scratch space of a killed build; the log of a failed one --------------------------------------------


def test_scratch_space_of_a_dead_build_is_swept_by_the_next(tmp_path: Path) -> None:
    from edgekit.package.staging import scratch_folder

    out = tmp_path / "pkg"
    dead = tmp_path / ".pkg.partial-999999999-work-abc"  # no process has this id
    dead.mkdir()
    (dead / "weights.bin").write_bytes(b"x" * 1024)
    with scratch_folder(out) as work:
        assert work.parent == tmp_path and str(os.getpid()) in work.name
        assert not dead.exists()
    assert not work.exists()


@pytest.mark.slow
def test_a_build_keeps_no_scratch_in_tmpdir(tmp_path: Path, tiny_checkpoints, monkeypatch) -> None:
    from edgekit.pipeline import build

    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    build(tiny_checkpoints("llama"), tmp_path / "out", progress=False, evaluation=None)
    assert not [p for p in tmpdir.iterdir() if p.name.startswith("edgekit")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tmp"]


def test_a_failed_build_keeps_its_log_beside_out(tmp_path: Path, tiny_checkpoints, monkeypatch) -> None:
    import edgekit.build_steps as steps
    from edgekit import pipeline
    from edgekit.errors import ExportError

    def failing_export(hf_folder, out_dir, *, log_path, **kwargs):
        log_path.write_text("the builder's traceback\n")
        raise ExportError("the builder failed", path=log_path, fix="see the log")

    monkeypatch.setattr(steps, "run_builder", failing_export)
    out = tmp_path / "pkg"
    with pytest.raises(ExportError) as info:
        pipeline.build(tiny_checkpoints("llama"), out, progress=False, evaluation=None)
    kept = tmp_path / "pkg.failed-build.log"
    assert kept.read_text().endswith("the builder's traceback\n")
    assert str(kept) in str(info.value) and ".partial-" not in str(info.value)
    assert sorted(snapshot(tmp_path)) == ["pkg.failed-build.log"]


# --- `check` verifies what it passes ------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["flipped-byte", "missing-file", "listed-dotdot"])
def test_check_fails_a_tampered_package(runner, tmp_path: Path, tiny_llama_package: Path, damage: str) -> None:
    from edgekit.package.manifest import read_manifest, write_manifest

    package = Path(shutil.copytree(tiny_llama_package, tmp_path / "pkg"))
    assert runner.invoke(main, ["check", str(package), "-t", "laptop-cpu-rtn"]).exit_code == 0
    data = package / "int4-rtn" / "model.onnx.data"
    if damage == "flipped-byte":
        blob = bytearray(data.read_bytes())
        blob[len(blob) // 2] ^= 1
        data.write_bytes(bytes(blob))
    elif damage == "missing-file":
        (package / "int4-rtn" / "tokenizer.json").unlink()
    else:
        manifest = read_manifest(package)
        write_manifest(package, manifest)
        raw = json.loads((package / "manifest.json").read_text())
        raw["files"].append({"path": "../secret", "size": 1, "sha256": "0" * 64})
        (package / "manifest.json").write_text(json.dumps(raw))
    result = runner.invoke(main, ["check", str(package), "-t", "laptop-cpu-rtn"])
    assert result.exit_code == 2 and "PASS" not in result.output


# --- legacy pickles ------------------------------------------------------------------------------------


def test_a_legacy_torch_save_file_loads_with_allow_pickle(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from edgekit.sources.checkpoint import _convert_pickles

    legacy = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.arange(6.0).reshape(2, 3)}, legacy, _use_new_zipfile_serialization=False)
    _convert_pickles([legacy], tmp_path / "model.safetensors")
    assert load_file(str(tmp_path / "model.safetensors"))["w"].tolist() == [[0, 1, 2], [3, 4, 5]]


def test_a_fifo_pickle_is_refused(tmp_path: Path) -> None:
    from edgekit.sources.checkpoint import _convert_pickles

    with pytest.raises(SourceError, match="is a FIFO"):
        _convert_pickles([fifo(tmp_path / "pytorch_model.bin")], tmp_path / "model.safetensors")


def test_a_reference_cache_is_read_only_when_its_header_fits(tmp_path: Path) -> None:
    """A package's eval/reference-*.npz declaring a 4 GiB array took 5 GB, then a traceback (a red-team pass)."""
    import zipfile

    import numpy as np

    from edgekit.accuracy.protocol import read_cached_hidden, write_cached_hidden

    path = tmp_path / "eval" / "reference-0.npz"
    good = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    write_cached_hidden(path, good)
    assert np.array_equal(read_cached_hidden(path, 2, 3), good)
    assert read_cached_hidden(path, 2, 4) is None  # another protocol's windows
    for bad in (np.zeros((2, 3, 1 << 17), np.float32), np.zeros((2, 3, 4), np.float64), np.array([{}], object)):
        np.savez(path, hidden=bad)
        assert read_cached_hidden(path, 2, 3) is None
    with zipfile.ZipFile(path, "w") as archive:  # a header of the right shape over too few bytes
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (2, 3, 4)})
        archive.writestr("hidden.npy", header.getvalue())
    assert read_cached_hidden(path, 2, 3) is None
    path.write_bytes(b"not a zip")
    assert read_cached_hidden(path, 2, 3) is None
    for offset, value in ((8, 98), (6, 1)):  # a compression method zipfile lacks; the encrypted flag
        write_cached_hidden(path, good)
        data = bytearray(path.read_bytes())
        central = data.rfind(b"PK\x01\x02")
        for header, shift in ((0, offset), (central, offset + 2)):  # the local and the central header
            data[header + shift : header + shift + 2] = value.to_bytes(2, "little")
        path.write_bytes(bytes(data))
        assert read_cached_hidden(path, 2, 3) is None


def test_a_long_text_is_tokenized_in_paragraphs_to_the_same_ids(tiny_llama_package: Path, monkeypatch) -> None:
    """The whole text in one call held hundreds of bytes per character (3.8 GB for 17 MB of text)."""
    from tokenizers import Tokenizer

    import edgekit.accuracy.texts as texts

    tokenizer = Tokenizer.from_file(str(tiny_llama_package / "fp32" / "tokenizer.json"))
    text = "\n\n".join(f"Paragraph {i} says something about rivers, hills and {i * 7} towns." for i in range(400))
    whole = texts.token_ids(tokenizer, text)
    calls: list[int] = []
    encode = tokenizer.encode
    monkeypatch.setattr(texts, "WHOLE_TEXT_CHARS", 2000)
    spy = type("Spy", (), {"encode": lambda self, piece, **kw: calls.append(len(piece)) or encode(piece, **kw)})()
    pieced = texts.token_ids(spy, text)
    assert len(calls) > 10 and max(calls) <= 2 * 500 + 100  # bounded pieces, cut at paragraph breaks
    assert pieced.dtype == np.int64 and np.array_equal(pieced, whole)


def test_a_tokenizer_pattern_that_panics_the_library_is_one_line(tiny_llama_package: Path, tmp_path: Path) -> None:
    """tokenizers raises a Rust panic as a BaseException, which no `except Exception` caught (a red-team pass)."""
    from edgekit.errors import PackageError
    from edgekit.runtimes.tokens import TextTokenizer

    variant = tiny_llama_package / "int4-rtn"
    tokenizer = json.loads((variant / "tokenizer.json").read_text(encoding="utf-8"))
    split = {"type": "Split", "pattern": {"Regex": "(a|aa)+c"}, "behavior": "Isolated", "invert": False}
    tokenizer["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [split, tokenizer["pre_tokenizer"]]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer), encoding="utf-8")
    text = TextTokenizer(tmp_path, add_bos=False, bos_token_id=None)
    with pytest.raises(PackageError, match="the package's tokenizer failed on this text"):
        text.encode("a" * 3000 + "hi")  # no "c": the regex backtracks past its limit
