"""A package's configs are a stranger's: genai_config.json holds only the keys edgekit writes, a package holds only
the files edgekit writes, and custom operators come only from the caller (issue "No code from a stranger's file",
defects 1, 3 and 9)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from package_fixtures import genai_config

from edgekit.errors import PackageError
from edgekit.package.contents import is_allowed
from edgekit.package.genai_config import parse_genai_config
from edgekit.package.manifest import read_manifest, write_manifest
from edgekit.package.verify import verify_files


def with_session(**options: Any) -> dict[str, Any]:
    config = genai_config()
    config["model"]["decoder"]["session_options"].update(options)
    return config


@pytest.mark.parametrize(
    ("config", "key"),
    [
        (with_session(custom_ops_library="libevil.so"), "model.decoder.session_options.custom_ops_library"),
        (with_session(enable_profiling="/tmp/profile"), "model.decoder.session_options.enable_profiling"),
        (with_session(ep_context_file_path="/tmp/ctx.onnx"), "model.decoder.session_options.ep_context_file_path"),
        (with_session(config_entries={"session.x": "1"}), "model.decoder.session_options.config_entries"),
        (with_session(provider_options=[{"qnn": {"backend_path": "libQnnHtp.so"}}]), "provider_options.0.qnn"),
        (with_session(provider_options=[{"cuda": {"gpu_external_alloc": "1"}}]), "provider_options.0.cuda.gpu_"),
        (with_session(log_severity_level=0), "session_options.log_severity_level"),
        ({**genai_config(), "engine": {}}, "key 'engine' is not allowed"),
        (genai_config(adapter_file="x"), "key 'model.decoder.adapter_file' is not allowed"),
    ],
)
def test_keys_edgekit_does_not_write_are_refused_by_path(config: dict[str, Any], key: str) -> None:
    with pytest.raises(PackageError) as info:
        parse_genai_config(json.dumps(config).encode(), "v/genai_config.json")
    assert key in str(info.value) and "v/genai_config.json" in str(info.value)


def test_every_refused_key_is_named_at_once() -> None:
    config = with_session(custom_ops_library="a.so", enable_profiling="p")
    with pytest.raises(PackageError) as info:
        parse_genai_config(json.dumps(config).encode(), "g.json")
    assert "custom_ops_library" in str(info.value) and "enable_profiling" in str(info.value)


def test_a_key_given_twice_is_refused_as_ambiguous() -> None:
    """Python keeps a repeated key's last value, onnxruntime-genai's parser applied every copy: a first
    ``session_options`` naming a library passed the allow-list and the runtime loaded it."""
    clean = json.dumps(genai_config())
    decoder = '"decoder": {'
    assert decoder in clean
    evil = '"session_options": {"custom_ops_library": "evil.onnx.data"}, '
    with pytest.raises(PackageError) as info:
        parse_genai_config(clean.replace(decoder, decoder + evil, 1).encode(), "v/genai_config.json")
    assert "'session_options' appears twice" in str(info.value) and "v/genai_config.json" in str(info.value)
    parse_genai_config(clean.encode(), "v/genai_config.json")  # the same file without the copy is fine


def test_a_manifest_key_given_twice_is_refused(tmp_path: Path) -> None:
    from edgekit.package.manifest import parse_manifest

    with pytest.raises(PackageError, match="appears twice"):
        parse_manifest(b'{"schema_version": 1, "files": {}, "files": {}}', tmp_path / "manifest.json")


@pytest.mark.parametrize(
    ("decoder", "phrase"),
    [
        ({"num_hidden_layers": 10**9}, "num_hidden_layers"),
        ({"num_hidden_layers": True}, "num_hidden_layers"),
        ({"head_size": -1}, "head_size"),
        ({"inputs": {"input_ids": "x" * 300}}, "inputs"),
        ({"session_options": {"log_id": "a" * 500}}, "log_id"),
        # onnxruntime-genai formats these names with snprintf: %s crashed it, %n writes memory
        ({"inputs": {"past_key_names": "past_key_values.%s.key"}}, "inputs"),
        ({"inputs": {"past_key_names": "past_key_values.%d.%n"}}, "inputs"),
        ({"outputs": {"present_value_names": "present.value"}}, "must hold one %d"),
        ({"inputs": {"input_ids": "input_%d_ids"}}, "must not hold one %d"),
        ({"filename": "model.onnx_data"}, "filename"),  # the graph, whose external data edgekit checks
    ],
)
def test_values_are_typed_and_bounded(decoder: dict[str, Any], phrase: str) -> None:
    with pytest.raises(PackageError, match=phrase):
        parse_genai_config(json.dumps(genai_config(**decoder)).encode(), "g.json")


def test_what_the_builder_writes_for_gpu_providers_is_allowed() -> None:
    cuda = with_session(provider_options=[{"cuda": {"enable_cuda_graph": "0"}}])
    cuda["model"]["decoder"]["session_options"]["ep.cuda.fpa_intb_gemm"] = "1"
    dml = with_session(provider_options=[{"dml": {"enable_graph_capture": "1"}}])
    window = genai_config(sliding_window={"window_size": 512, "layers": [0, 2], "cache_slack": 0})
    for config in (cuda, dml, window):
        parse_genai_config(json.dumps(config).encode(), "g.json")


@pytest.mark.parametrize(
    ("relative", "allowed"),
    [
        ("manifest.json", True),
        ("int4-rtn/model.onnx.data", True),
        ("int4-rtn/chat_template.jinja", True),
        ("eval/reference-0123.npz", True),
        ("int4-rtn/libevil.so", False),
        ("int4-rtn/run.py", False),
        ("setup.sh", False),
        ("a/b/model.onnx", False),
        ("eval/x.so", False),
    ],
)
def test_the_file_allow_list(relative: str, allowed: bool) -> None:
    assert is_allowed(relative) is allowed


def make_package(root: Path, config: dict[str, Any], extra: dict[str, bytes] | None = None) -> Path:
    variant = root / "v"
    variant.mkdir(parents=True)
    (variant / "genai_config.json").write_text(json.dumps(config))
    (variant / "model.onnx").write_bytes(b"")
    for name, data in (extra or {}).items():
        (variant / name).write_bytes(data)
    write_manifest(root, {"variants": {"v": {"path": "v"}}, "default_variant": "v"})
    return root


def test_a_listed_native_library_is_refused_even_unreferenced(tmp_path: Path) -> None:
    root = make_package(tmp_path / "pkg", genai_config(), {"libevil.so": b"\x7fELF"})
    with pytest.raises(PackageError) as info:
        verify_files(root, read_manifest(root), "v", hashes=False)
    assert "v/libevil.so" in str(info.value) and "not a file edgekit puts in a package" in str(info.value)


def native_library(folder: Path, marker: Path) -> Path:
    """A shared library whose constructor writes ``marker``: proof that it was loaded."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the test library")
    source = folder / "evil.c"
    source.write_text(
        "#include <stdio.h>\n__attribute__((constructor)) static void run(void) {\n"
        f'  FILE *f = fopen("{marker}", "w"); if (f) {{ fputs("ran", f); fclose(f); }}\n}}\n'
    )
    library = folder / "libevil.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    return library


def plant_library(package: Path, marker: Path, tmp_path: Path, key: str = "custom_ops_library") -> Path:
    """What an attacker does: ship the library in the variant, point the config at it, rewrite the manifest."""
    library = native_library(tmp_path, marker)
    shutil.copy(library, package / "int4-rtn" / "libevil.so.onnx")  # even disguised under an allowed suffix
    path = package / "int4-rtn" / "genai_config.json"
    config = json.loads(path.read_text())
    config["model"]["decoder"]["session_options"][key] = "libevil.so.onnx"
    path.write_text(json.dumps(config))
    write_manifest(package, read_manifest(package))
    return library


@pytest.mark.slow
@pytest.mark.parametrize("verify", [True, False])
def test_load_never_loads_a_library_the_package_names(
    tiny_llama_package: Path, tmp_path: Path, monkeypatch, verify: bool
) -> None:
    from edgekit import load

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    package = Path(shutil.copytree(tiny_llama_package, tmp_path / "pkg"))
    marker = tmp_path / "marker"
    plant_library(package, marker, tmp_path)
    with pytest.raises(PackageError, match="custom_ops_library' is not allowed"):
        load(package, verify=verify)
    assert not marker.exists()


@pytest.mark.slow
def test_run_and_pack_refuse_the_planted_library(tiny_llama_package: Path, tmp_path: Path, runner) -> None:
    from edgekit.cli import main

    package = Path(shutil.copytree(tiny_llama_package, tmp_path / "pkg"))
    marker = tmp_path / "marker"
    plant_library(package, marker, tmp_path, key="enable_profiling")
    result = runner.invoke(main, ["run", str(package), "--raw", "-p", "hi", "--max-new-tokens", "2"])
    assert result.exit_code == 2 and "enable_profiling' is not allowed" in result.output
    result = runner.invoke(main, ["pack", str(package), "-o", str(tmp_path / "p.tar.gz")])
    assert result.exit_code == 2 and not (tmp_path / "p.tar.gz").exists()
    assert not marker.exists()


@pytest.mark.slow
def test_onnxruntime_genai_itself_loads_a_library_the_package_names(tiny_llama_package: Path, tmp_path: Path) -> None:
    """The threat is real: without edgekit's check, onnxruntime-genai runs the package's library."""
    import onnxruntime_genai as og

    package = Path(shutil.copytree(tiny_llama_package, tmp_path / "pkg"))
    marker = tmp_path / "marker"
    plant_library(package, marker, tmp_path)
    config = og.Config(str(package / "int4-rtn"))
    config.clear_providers()
    with pytest.raises(Exception, match="RegisterCustomOps"):  # it loads the library, then finds no custom ops
        og.Model(config)
    assert marker.read_text() == "ran"


def test_duplicate_external_data_keys_are_refused(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    tensor = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4])
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "model.onnx.data"), ("location", "../../etc/passwd"), ("length", "16")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [], [out], [tensor])
    root = make_package(tmp_path / "pkg", genai_config(), {"model.onnx.data": bytes(16)})
    onnx.save_model(helper.make_model(graph), str(root / "v" / "model.onnx"))
    write_manifest(root, read_manifest(root))
    with pytest.raises(PackageError, match="gives its external data 'location' twice"):
        verify_files(root, read_manifest(root), "v", hashes=False)


def test_a_verdict_cached_under_older_rules_is_not_trusted(tmp_path: Path, monkeypatch) -> None:
    from edgekit.package import verify_cache

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = make_package(tmp_path / "pkg", genai_config())
    manifest = read_manifest(root)
    assert verify_cache.verify_variant(root, manifest, "v") is False
    assert verify_cache.verify_variant(root, manifest, "v") is True
    monkeypatch.setattr(verify_cache, "POLICY_VERSION", verify_cache.POLICY_VERSION + 1)
    assert verify_cache.verify_variant(root, manifest, "v") is False
