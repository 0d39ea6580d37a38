"""Paths a package names (issue #5, requirements 5 and 11): ONNX external data and the strings configs use
as file names must be relative, free of '..', inside the package and listed in the manifest; links are
refused. All of it before onnxruntime sees the model."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx import TensorProto, helper
from package_fixtures import genai_config

from edgekit.errors import PackageError
from edgekit.package.manifest import read_manifest, write_manifest
from edgekit.package.verify import verify_files
from edgekit.runtimes.model import load


def onnx_with_external(location: str, *, offset: int = 0, length: int = 16, in_subgraph: bool = False) -> bytes:
    """A model whose one initializer (4 floats) lives in external data at ``location``."""
    tensor = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4])
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    if in_subgraph:
        branch = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "then", [], [out], [tensor])
        other = helper.make_graph(
            [helper.make_node("Constant", [], ["y"], value=helper.make_tensor("c", TensorProto.FLOAT, [4], [0] * 4))],
            "else",
            [],
            [out],
        )
        cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
        node = helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=other)
        graph = helper.make_graph([node], "g", [cond], [out])
    else:
        graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [], [out], [tensor])
    return helper.make_model(graph).SerializeToString()


def make_package(root: Path, *, genai: dict[str, Any] | None = None, onnx_bytes: bytes | None = None) -> Path:
    variant = root / "v"
    variant.mkdir(parents=True)
    (variant / "genai_config.json").write_text(json.dumps(genai or genai_config()))
    (variant / "model.onnx").write_bytes(onnx_bytes or onnx_with_external("weights.onnx.data"))
    (variant / "weights.onnx.data").write_bytes(bytes(16))
    (variant / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "X", "tokenizer_file": None}))
    write_manifest(root, {"variants": {"v": {"path": "v"}}, "default_variant": "v"})
    return root


def refused(root: Path) -> str:
    with pytest.raises(PackageError) as info:
        verify_files(root, read_manifest(root))
    with pytest.raises(PackageError):
        verify_files(root, read_manifest(root), "v", hashes=False)
    return str(info.value)


def test_a_clean_package_passes(tmp_path: Path) -> None:
    root = make_package(tmp_path / "pkg")
    verify_files(root, read_manifest(root))


@pytest.mark.parametrize(
    ("location", "phrase"),
    [
        ("../outside.bin", "climbs out of its folder"),
        ("../v/weights.onnx.data", "climbs out of its folder"),
        ("/etc/passwd", "absolute"),
        ("C:\\secret.bin", "absolute or non-portable"),
        ("sub\\weights.onnx.data", "non-portable"),
        ("", "not a file name"),
        ("missing.bin", "does not list"),
        ("genai_config.json", None),  # listed and inside: allowed (onnxruntime would fail on the bytes)
    ],
)
def test_onnx_external_data_locations(tmp_path: Path, location: str, phrase: str | None) -> None:
    (tmp_path / "outside.bin").write_bytes(bytes(16))
    root = make_package(tmp_path / "pkg", onnx_bytes=onnx_with_external(location))
    if phrase is None:
        verify_files(root, read_manifest(root))
        return
    message = refused(root)
    assert str(root / "v" / "model.onnx") in message
    assert phrase in message


def test_an_external_location_in_a_subgraph_is_checked(tmp_path: Path) -> None:
    root = make_package(tmp_path / "pkg", onnx_bytes=onnx_with_external("../../x", in_subgraph=True))
    assert "climbs out" in refused(root)


def test_an_external_data_range_past_the_end_of_its_file(tmp_path: Path) -> None:
    root = make_package(tmp_path / "pkg", onnx_bytes=onnx_with_external("weights.onnx.data", offset=8, length=16))
    assert "reads bytes 8..24 of the 16-byte v/weights.onnx.data" in refused(root)


def test_an_unreadable_onnx_file_is_refused(tmp_path: Path) -> None:
    root = make_package(tmp_path / "pkg", onnx_bytes=b"\xff" * 64)
    assert "is not a readable ONNX model" in refused(root)


@pytest.mark.parametrize(
    ("config", "phrase"),
    [
        # the decoder's file is a bare .onnx name (the allow-list's pattern); other *filename keys are paths
        (genai_config("../../etc/passwd"), "model.decoder.filename': String should match pattern"),
        (genai_config("/etc/passwd"), "model.decoder.filename': String should match pattern"),
        (genai_config("other.onnx"), "does not list"),
        (genai_config(7), "model.decoder.filename': Input should be a valid string"),  # type: ignore[arg-type]
        (genai_config(pipeline=[{"stage": {"filename": "../x.onnx"}}]), "key 'model.decoder.pipeline' is not allowed"),
        ({**genai_config(), "vision": {"config_filename": "/tmp/p.json"}}, "key 'vision' is not allowed"),
        ({"model": {"decoder": {"filename": "model.onnx"}}}, "'model.decoder.head_size': Field required"),
    ],
)
def test_genai_config_file_names(tmp_path: Path, config: dict[str, Any], phrase: str) -> None:
    root = make_package(tmp_path / "pkg", genai=config)
    message = refused(root)
    assert str(root / "v" / "genai_config.json") in message
    assert phrase in message


def test_a_tokenizer_config_naming_a_file_outside(tmp_path: Path) -> None:
    root = make_package(tmp_path / "pkg")
    (root / "v" / "tokenizer_config.json").write_text(json.dumps({"tokenizer_file": "/etc/passwd"}))
    write_manifest(root, read_manifest(root))
    message = refused(root)
    assert str(root / "v" / "tokenizer_config.json") in message and "absolute" in message


def test_the_variant_folder_the_manifest_names_must_be_inside(tmp_path: Path) -> None:
    from edgekit.package.verify import variant_dir

    root = make_package(tmp_path / "pkg")
    for folder in ("../elsewhere", "/etc", "v/../..", "."):
        manifest = read_manifest(root)
        manifest["variants"]["v"]["path"] = folder
        with pytest.raises(PackageError, match="not a folder of the package"):
            variant_dir(root, manifest, "v")


def test_a_variant_folder_that_is_a_symlink(tmp_path: Path) -> None:
    root = make_package(tmp_path / "pkg")
    shutil.move(root / "v", tmp_path / "real-v")
    (root / "v").symlink_to(tmp_path / "real-v")
    with pytest.raises(PackageError, match="symbolic link"):
        verify_files(root, read_manifest(root), "v")


# --- the loader, on a real package ---------------------------------------------------------------------


@pytest.fixture
def package_copy(tiny_llama_package: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "pkg"
    shutil.copytree(tiny_llama_package, copy)
    return copy


@pytest.fixture
def no_onnxruntime(monkeypatch) -> None:
    """onnxruntime-genai must not be asked to open anything."""
    import onnxruntime_genai as og

    def refuse(*args, **kwargs):
        raise AssertionError("onnxruntime-genai saw the model")

    monkeypatch.setattr(og, "Model", refuse)
    monkeypatch.setattr(og, "Config", refuse)


def test_onnxruntime_itself_follows_a_hard_link_out_of_the_model_folder(package_copy: Path, tmp_path: Path) -> None:
    import onnxruntime

    data = package_copy / "fp32" / "model.onnx.data"
    outside = tmp_path / "outside.data"
    shutil.move(data, outside)
    os.link(outside, data)
    # Same bytes, so the manifest's hash matches: only the link count gives it away.
    onnxruntime.InferenceSession(str(package_copy / "fp32" / "model.onnx"), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("verify", [True, False])
def test_load_refuses_a_hard_linked_weight_file_before_onnxruntime(
    package_copy: Path, tmp_path: Path, no_onnxruntime, verify: bool, monkeypatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = package_copy / "int4-rtn" / "model.onnx.data"
    outside = tmp_path / "outside.data"
    shutil.move(data, outside)
    os.link(outside, data)
    with pytest.raises(PackageError) as info:
        load(package_copy, verify=verify)
    assert "hard link" in str(info.value) and str(data) in str(info.value)


def test_a_cached_verdict_does_not_hide_a_new_hard_link(package_copy: Path, tmp_path: Path, monkeypatch) -> None:
    from edgekit.package.verify_cache import verify_variant

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    manifest = read_manifest(package_copy)
    assert verify_variant(package_copy, manifest, "int4-rtn") is False
    assert verify_variant(package_copy, manifest, "int4-rtn") is True
    os.link(package_copy / "int4-rtn" / "model.onnx.data", tmp_path / "elsewhere")
    with pytest.raises(PackageError, match="hard link"):
        verify_variant(package_copy, manifest, "int4-rtn")


@pytest.mark.parametrize("verify", [True, False])
def test_load_refuses_an_external_data_path_out_of_the_package(
    package_copy: Path, tmp_path: Path, no_onnxruntime, verify: bool, monkeypatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = package_copy / "int4-rtn" / "model.onnx"
    model = onnx.load_model(str(path), load_external_data=False)
    shutil.copy(package_copy / "int4-rtn" / "model.onnx.data", tmp_path / "stolen.data")
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../../stolen.data"
    path.write_bytes(model.SerializeToString())
    write_manifest(package_copy, read_manifest(package_copy))  # a consistent manifest: only the path is wrong
    with pytest.raises(PackageError) as info:
        load(package_copy, verify=verify)
    assert str(path) in str(info.value) and "climbs out of its folder" in str(info.value)


def test_load_refuses_a_genai_config_naming_a_model_outside(
    package_copy: Path, tmp_path: Path, no_onnxruntime, monkeypatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = package_copy / "int4-rtn" / "genai_config.json"
    config = json.loads(path.read_text())
    config["model"]["decoder"]["filename"] = str(package_copy / "fp32" / "model.onnx")
    path.write_text(json.dumps(config))
    write_manifest(package_copy, read_manifest(package_copy))
    with pytest.raises(PackageError) as info:
        load(package_copy)
    assert str(path) in str(info.value) and "model.decoder.filename" in str(info.value)


def test_an_external_data_length_that_is_not_the_tensors_size(tmp_path: Path) -> None:
    """onnxruntime fails on it with its own error; edgekit names the tensor first."""
    root = make_package(tmp_path / "pkg", onnx_bytes=onnx_with_external("weights.onnx.data", length=12))
    assert "tensor 'w' of shape [4] needs 16 bytes, its external data says 12" in refused(root)


@pytest.mark.parametrize("offset", ["+8", " 8", "1_0", "-0", "0x10"])
def test_an_external_data_offset_that_is_not_a_plain_number(tmp_path: Path, offset: str) -> None:
    root = make_package(tmp_path / "pkg", onnx_bytes=onnx_with_external("weights.onnx.data"))
    model = onnx.load_model(str(root / "v" / "model.onnx"), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "offset":
            entry.value = offset
    (root / "v" / "model.onnx").write_bytes(model.SerializeToString())
    write_manifest(root, read_manifest(root))
    assert "malformed external data range" in refused(root)
