"""Every bad input to `edgekit build`: the exit code, a one-line message naming the file and the fix, and
nothing written (no OUT, no hidden partial folder). Also Ctrl-C and kill -9 in the middle of a build."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import snapshot

from edgekit.cli import main
from edgekit.package.manifest import read_manifest
from edgekit.package.verify import verify_files

SUPPORTED = ("gemma3_text", "llama", "mistral", "phi3", "qwen2", "qwen3", "qwen3_5")


# --- helpers -----------------------------------------------------------------------------------------


def partials(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.partial-*"))


def build(runner, source, out: Path, *extra: str):
    return runner.invoke(main, ["build", str(source), "-o", str(out), "-q", *extra], env={"COLUMNS": "1000"})


def error_line(result, exit_code: int) -> str:
    """The one stderr line of a failed command, after checking the exit code."""
    assert result.exit_code == exit_code, (result.exit_code, result.output, result.exception)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), (
        "a traceback instead of a message"
    )
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {result.stderr!r}"
    assert lines[0].startswith("edgekit: error: ")
    assert result.stdout == ""
    return lines[0]


def assert_nothing_written(parent: Path, before: set[str], out: Path) -> None:
    assert not out.exists()
    assert partials(out) == []
    assert snapshot(parent) == before


def copy_checkpoint(tiny_checkpoints, tmp_path: Path, name: str = "src") -> Path:
    folder = tmp_path / name
    shutil.copytree(tiny_checkpoints("llama"), folder)
    return folder


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def check_failure(runner, tmp_path: Path, source, exit_code: int, *extra: str) -> str:
    """Run a build that must fail; returns its message after checking nothing was written."""
    out = tmp_path / "out"
    before = snapshot(tmp_path)
    message = error_line(build(runner, source, out, *extra), exit_code)
    assert_nothing_written(tmp_path, before, out)
    return message


# --- the source ------------------------------------------------------------------------------------


def test_a_source_path_that_does_not_exist(runner, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    message = check_failure(runner, tmp_path, missing, 2)
    assert f"{missing}: does not exist" in message
    assert "Hugging Face model folder" in message and ".gguf" in message


def test_a_folder_without_config_json(runner, tmp_path: Path, tiny_checkpoints) -> None:
    folder = copy_checkpoint(tiny_checkpoints, tmp_path)
    (folder / "config.json").unlink()
    message = check_failure(runner, tmp_path, folder, 2)
    assert str(folder) in message
    assert "no config.json" in message
    assert "Hugging Face model folder" in message


def test_a_config_json_that_is_not_json(runner, tmp_path: Path, tiny_checkpoints) -> None:
    folder = copy_checkpoint(tiny_checkpoints, tmp_path)
    (folder / "config.json").write_text('{"model_type": "llama",')
    message = check_failure(runner, tmp_path, folder, 2)
    assert str(folder / "config.json") in message
    assert "not valid JSON" in message
    assert "restore config.json" in message


def test_a_config_json_that_is_a_list(runner, tmp_path: Path, tiny_checkpoints) -> None:
    folder = copy_checkpoint(tiny_checkpoints, tmp_path)
    (folder / "config.json").write_text('[{"model_type": "llama"}]')
    message = check_failure(runner, tmp_path, folder, 2)
    assert str(folder / "config.json") in message
    assert "JSON object" in message
    assert "restore config.json" in message


def test_a_folder_without_weight_files(runner, tmp_path: Path, tiny_checkpoints) -> None:
    folder = copy_checkpoint(tiny_checkpoints, tmp_path)
    (folder / "model.safetensors").unlink()
    message = check_failure(runner, tmp_path, folder, 2)
    assert str(folder) in message
    assert "no weight files" in message and "safetensors" in message


def test_a_folder_without_a_tokenizer(runner, tmp_path: Path, tiny_checkpoints) -> None:
    folder = copy_checkpoint(tiny_checkpoints, tmp_path)
    (folder / "tokenizer.json").unlink()
    message = check_failure(runner, tmp_path, folder, 2)
    assert str(folder) in message
    assert "no tokenizer" in message
    assert "copy the model's tokenizer files" in message


def test_a_truncated_safetensors_file(runner, tmp_path: Path, tiny_checkpoints) -> None:
    folder = copy_checkpoint(tiny_checkpoints, tmp_path)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    message = check_failure(runner, tmp_path, folder, 2)
    assert str(weights) in message
    assert "truncated" in message
    assert "download or copy the file again" in message


# --- pickles -----------------------------------------------------------------------------------------


def pickle_checkpoint(tiny_checkpoints, tmp_path: Path) -> Path:
    """The tiny llama with its weights as pytorch_model.bin (torch.save of the state dict) only."""
    import torch
    from tiny_models import load_tiny_model

    source = tiny_checkpoints("llama")
    folder = tmp_path / "pickled"
    folder.mkdir()
    for item in source.iterdir():
        if item.suffix != ".safetensors":
            shutil.copy(item, folder / item.name)
    torch.save(load_tiny_model(source).state_dict(), folder / "pytorch_model.bin")
    return folder


def test_pickle_weights_are_refused_without_allow_pickle(runner, tmp_path: Path, tiny_checkpoints) -> None:
    folder = pickle_checkpoint(tiny_checkpoints, tmp_path)
    message = check_failure(runner, tmp_path, folder, 2)
    assert str(folder / "pytorch_model.bin") in message
    assert "pickle" in message
    assert "--allow-pickle" in message
    assert "safetensors" in message


def test_pickle_weights_build_with_allow_pickle(runner, tmp_path: Path, tiny_checkpoints) -> None:
    folder = pickle_checkpoint(tiny_checkpoints, tmp_path)
    before = snapshot(folder)
    out = tmp_path / "out"
    result = build(runner, folder, out, "--allow-pickle")
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    verify_files(out, manifest)
    assert [w["name"] for w in manifest["source"]["weights"]] == ["pytorch_model.bin"]
    assert manifest["parameter_count"] == 139_584  # counted from the converted safetensors
    assert manifest["validation"]["max_abs_diff"] <= manifest["validation"]["tolerance"]
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pkl")]
    assert snapshot(folder) == before  # the user's folder is not modified
    assert partials(out) == []


class _Payload:
    """Unpickling this object opens (creates) ``marker`` for writing."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def malicious_checkpoint(tiny_checkpoints, tmp_path: Path, marker: Path) -> Path:
    import torch

    folder = tmp_path / "evil"
    folder.mkdir()
    source = tiny_checkpoints("llama")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, folder / name)
    torch.save({"model.embed_tokens.weight": _Payload(marker)}, folder / "pytorch_model.bin")
    return folder


@pytest.mark.parametrize("allow_pickle", [False, True], ids=["refused", "allow-pickle"])
def test_a_malicious_pickle_never_runs(runner, tmp_path: Path, tiny_checkpoints, allow_pickle: bool) -> None:
    import torch

    marker = tmp_path.parent / f"{tmp_path.name}-PWNED"
    folder = malicious_checkpoint(tiny_checkpoints, tmp_path, marker)
    weights = folder / "pytorch_model.bin"
    extra = ("--allow-pickle",) if allow_pickle else ()
    message = check_failure(runner, tmp_path, folder, 2, *extra)
    assert not marker.exists(), "edgekit ran the pickle's payload"
    assert str(weights) in message
    if allow_pickle:
        assert "cannot be loaded safely" in message
    else:
        assert "--allow-pickle" in message

    # The payload is live: an unsafe load does create the marker.
    torch.load(weights, weights_only=False)
    assert marker.exists()
    marker.unlink()


# --- architectures and custom code ----------------------------------------------------------------------


def test_auto_map_with_an_unknown_model_type_is_refused(runner, tmp_path: Path, tiny_checkpoints) -> None:
    folder = copy_checkpoint(tiny_checkpoints, tmp_path)
    edit_config(
        folder,
        model_type="evilnet",
        auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"},
    )
    message = check_failure(runner, tmp_path, folder, 2)
    assert str(folder / "config.json") in message
    assert "auto_map" in message
    assert "custom model code" in message
    assert "'evilnet'" in message
    assert "llama" in message and "qwen3" in message


def test_auto_map_with_a_supported_model_type_builds_without_running_the_code(
    runner, tmp_path: Path, tiny_checkpoints
) -> None:
    folder = copy_checkpoint(tiny_checkpoints, tmp_path)
    marker = tmp_path / "IMPORTED"
    code = (
        f"open({str(marker)!r}, 'w').write('modeling_evil was imported')\n"
        "from transformers import LlamaForCausalLM as EvilForCausalLM, LlamaConfig as EvilConfig\n"
    )
    (folder / "modeling_evil.py").write_text(code)
    (folder / "configuration_evil.py").write_text(code)
    edit_config(
        folder,
        auto_map={
            "AutoConfig": "configuration_evil.EvilConfig",
            "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
        },
    )
    out = tmp_path / "out"
    result = build(runner, folder, out)
    assert result.exit_code == 0, result.output
    assert not marker.exists(), "the checkpoint's code was imported"
    assert "ignoring auto_map" in result.stdout
    manifest = read_manifest(out)
    verify_files(out, manifest)
    assert manifest["architecture"] == "llama"
    assert not list(out.rglob("*.py"))
    for config in out.rglob("config.json"):
        assert "auto_map" not in config.read_text()


def test_an_unsupported_architecture_fails_before_weights_are_read(runner, tmp_path: Path, tiny_checkpoints) -> None:
    folder = copy_checkpoint(tiny_checkpoints, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(b"\xff" * 64)  # garbage: reading it would fail with a different message

    # With a supported architecture the garbage file is what fails...
    control = check_failure(runner, tmp_path, folder, 2)
    assert str(weights) in control

    # ...with gpt2 the architecture fails first, and the weights are never looked at.
    edit_config(folder, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    message = check_failure(runner, tmp_path, folder, 2)
    assert str(folder / "config.json") in message
    assert "architecture 'gpt2' is not supported" in message
    for name in SUPPORTED:
        assert name in message
    assert "safetensors" not in message


def test_a_config_without_model_type(runner, tmp_path: Path, tiny_checkpoints) -> None:
    folder = copy_checkpoint(tiny_checkpoints, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    del config["model_type"]
    (folder / "config.json").write_text(json.dumps(config))
    message = check_failure(runner, tmp_path, folder, 2)
    assert str(folder / "config.json") in message
    assert "not supported" in message and "llama" in message


# --- OUT -------------------------------------------------------------------------------------------


def test_an_existing_out_without_force(runner, tmp_path: Path, tiny_checkpoints) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("do not delete")
    before = snapshot(tmp_path)
    message = error_line(build(runner, tiny_checkpoints("llama"), out), 2)
    assert str(out) in message
    assert "already exists" in message
    assert "--force" in message
    assert snapshot(tmp_path) == before
    assert (out / "precious.txt").read_text() == "do not delete"
    assert partials(out) == []


def test_force_replaces_an_existing_out_with_a_complete_package(runner, tmp_path: Path, tiny_checkpoints) -> None:
    out = tmp_path / "out"
    (out / "old-variant").mkdir(parents=True)
    (out / "old.txt").write_text("old")
    (out / "old-variant" / "model.onnx").write_bytes(b"old")
    result = build(runner, tiny_checkpoints("llama"), out, "--force")
    assert result.exit_code == 0, result.output
    assert not (out / "old.txt").exists()
    assert not (out / "old-variant").exists()
    manifest = read_manifest(out)
    verify_files(out, manifest)
    assert set(manifest["variants"]) == {"fp32", "int4-rtn", "int4-recipe"}  # the default target deploys a recipe
    assert partials(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("where", ["out-is-the-source", "out-holds-the-source"])
def test_force_never_replaces_the_source_checkpoint(runner, tmp_path: Path, tiny_checkpoints, where) -> None:
    models = tmp_path / "models"
    models.mkdir()
    folder = copy_checkpoint(tiny_checkpoints, models)
    out = folder if where == "out-is-the-source" else models
    before = snapshot(tmp_path)
    message = error_line(build(runner, folder, out, "--force"), 2)
    assert str(out) in message
    assert snapshot(tmp_path) == before
    assert (folder / "model.safetensors").is_file()


def test_a_missing_relative_folder_that_looks_like_a_hub_id(runner, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = snapshot(tmp_path)
    message = error_line(build(runner, "models/tiny", tmp_path / "out"), 2)
    assert "models/tiny" in message
    assert "no network access to the Hugging Face hub" in message
    assert "pass its folder" in message
    assert "Error:" not in message and "Errno" not in message  # no raw exception chain
    assert snapshot(tmp_path) == before


# --- GGUF sources ------------------------------------------------------------------------------------


def test_a_truncated_gguf_file(runner, tmp_path: Path) -> None:
    from edgekit.demo import demo_gguf_path

    source = tmp_path / "x.gguf"
    with demo_gguf_path().open("rb") as handle:
        source.write_bytes(handle.read(1 << 20))
    message = check_failure(runner, tmp_path, source, 2)
    assert str(source) in message
    assert "truncated" in message
    assert "download or copy the GGUF file again" in message


def test_a_gguf_file_with_bad_magic(runner, tmp_path: Path) -> None:
    source = tmp_path / "model.gguf"
    source.write_bytes(b"not a gguf file at all" * 100)
    message = check_failure(runner, tmp_path, source, 2)
    assert str(source) in message
    assert "magic" in message


def test_a_file_that_is_not_gguf(runner, tmp_path: Path) -> None:
    source = tmp_path / "notes.txt"
    source.write_text("hello\n")
    message = check_failure(runner, tmp_path, source, 2)
    assert str(source) in message
    assert "not a GGUF file" in message
    assert "Hugging Face model folder" in message


def test_a_gguf_file_of_an_unsupported_architecture(runner, tmp_path: Path) -> None:
    import numpy as np
    from gguf import GGUFWriter

    source = tmp_path / "gpt2.gguf"
    writer = GGUFWriter(str(source), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    message = check_failure(runner, tmp_path, source, 2)
    assert str(source) in message
    assert "GGUF architecture 'gpt2' is not supported" in message
    assert "llama" in message


# --- targets -----------------------------------------------------------------------------------------


def test_an_unknown_target(runner, tmp_path: Path, tiny_checkpoints) -> None:
    message = check_failure(runner, tmp_path, tiny_checkpoints("llama"), 2, "--target", "toaster")
    assert "unknown target 'toaster'" in message
    for name in ("laptop-cpu", "laptop-dml", "edge-cuda", "edge-arm-cpu"):
        assert name in message
    assert "targets.yaml" in message


def test_a_targets_file_with_an_unknown_key(runner, tmp_path: Path, tiny_checkpoints) -> None:
    path = tmp_path / "targets.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "schema_version": 1,
                "targets": {"laptop-cpu": {"description": "d", "providers": ["cpu"], "blok_size": 32}},
            }
        )
    )
    message = check_failure(runner, tmp_path, tiny_checkpoints("llama"), 2, "--targets-file", str(path))
    assert str(path) in message
    assert "unknown key 'blok_size'" in message
    assert "block_size" in message  # the fix lists the allowed keys


def test_a_missing_targets_file(runner, tmp_path: Path, tiny_checkpoints) -> None:
    path = tmp_path / "absent.yaml"
    message = check_failure(runner, tmp_path, tiny_checkpoints("llama"), 2, "--targets-file", str(path))
    assert str(path) in message


def test_a_missing_out_option_is_a_usage_error(runner, tmp_path: Path, tiny_checkpoints) -> None:
    before = snapshot(tmp_path)
    result = runner.invoke(main, ["build", str(tiny_checkpoints("llama"))])
    assert result.exit_code == 2
    assert "--out" in result.stderr
    assert snapshot(tmp_path) == before


# --- Ctrl-C and kill -9 ------------------------------------------------------------------------------


def start_build(source: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(
        [sys.executable, "-m", "edgekit.cli", "build", str(source), "-o", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=out.parent,
        env=env,
        # A test run started in the background by a shell (`./.ci/run &`) inherits SIGINT ignored, and
        # Python then never turns it into KeyboardInterrupt: give the build the default disposition.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for_partial(process: subprocess.Popen, out: Path, settle: float = 1.5) -> Path:
    """Wait until the build has made its hidden partial folder and worked in it for ``settle`` seconds."""
    deadline = time.monotonic() + 120
    while not partials(out):
        if process.poll() is not None:
            pytest.fail(f"the build ended before making its partial folder: {process.communicate()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("no partial folder appeared within 120 s")
        time.sleep(0.01)
    time.sleep(settle)
    if process.poll() is not None:
        pytest.fail("the build finished before it could be interrupted; the test needs a slower build")
    # The staging folder that becomes OUT; its scratch space sits beside it (".out.partial-PID-work-...").
    (partial,) = [p for p in partials(out) if "-work-" not in p.name]
    return partial


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_during_a_build_leaves_nothing_behind(tmp_path: Path, tiny_checkpoints, signum: int) -> None:
    """SIGTERM (what `timeout` and a CI's cancel send) left the hidden partial folders behind."""
    out = tmp_path / "out"
    process = start_build(tiny_checkpoints("llama"), out)
    try:
        partial = wait_for_partial(process, out)
        assert partial.name.startswith(f".out.partial-{process.pid}-")
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signum, stderr
    assert "interrupted" in stderr
    assert "Traceback" not in stderr
    assert not out.exists()
    assert partials(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# A library that catches the KeyboardInterrupt of a Ctrl-C: swallowed outright (a bare ``except:``), or
# turned into another error as pydantic-core does when it lands while a model class is being built.
SWALLOWING_STEP = {
    "swallowed": "try:\n        os.kill(os.getpid(), signal.SIGINT)\n    except BaseException:\n        pass",
    "rewrapped": "try:\n        os.kill(os.getpid(), signal.SIGINT)\n    except BaseException as exc:\n"
    "        raise RuntimeError('schema error') from exc",
}


@pytest.mark.parametrize("library", sorted(SWALLOWING_STEP))
def test_a_ctrl_c_a_library_catches_still_stops_the_build(tmp_path: Path, tiny_checkpoints, library: str) -> None:
    out = tmp_path / "out"
    script = f"""
import os, signal, sys
import edgekit.pipeline as pipeline

def step(context):
    {SWALLOWING_STEP[library]}

pipeline.BUILD_STEPS = (pipeline.BUILD_STEPS[0], step) + pipeline.BUILD_STEPS[1:]
from edgekit.cli import main
sys.argv = ["edgekit", "build", {str(tiny_checkpoints("llama"))!r}, "-o", {str(out)!r}, "-q", "--no-eval"]
main()
"""
    process = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        timeout=300,
    )
    assert process.returncode == 130, process.stderr
    assert process.stderr.strip().splitlines()[-1] == "edgekit: interrupted; no partial output was left behind."
    assert "Traceback" not in process.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_kill_9_during_a_build_then_the_next_build_succeeds(runner, tmp_path: Path, tiny_checkpoints) -> None:
    out = tmp_path / "out"
    process = start_build(tiny_checkpoints("llama"), out)
    try:
        partial = wait_for_partial(process, out)
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    assert partial.is_dir(), "kill -9 gives no chance to clean up; the partial folder stays"
    assert not out.exists()

    result = build(runner, tiny_checkpoints("llama"), out)
    assert result.exit_code == 0, result.output
    verify_files(out, read_manifest(out))
    assert not partial.exists(), "the stale partial folder of the killed build was not removed"
    assert partials(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize(
    ("file", "change", "phrase"),
    [
        ("config.json", {"num_attention_heads": 3}, "cannot load its config or tokenizer"),
        ("config.json", {"rms_norm_eps": "x"}, "cannot load its config or tokenizer"),
        ("config.json", {"quantization_config": 5}, "quantization_config that is not an object"),
        ("tokenizer_config.json", [1], "cannot load its config or tokenizer"),
        ("special_tokens_map.json", {"bos_token": 5}, "cannot load its config or tokenizer"),
    ],
    ids=["heads-not-dividing", "eps-a-string", "quantization-config-a-number", "tokenizer-config-a-list",
         "special-token-a-number"],
)  # fmt: skip
def test_a_config_or_tokenizer_file_transformers_cannot_take_is_one_line(
    runner, tmp_path: Path, tiny_checkpoints, file: str, change: object, phrase: str
) -> None:
    """Each gave a transformers traceback and exit 1 (a red-team pass)."""
    source = copy_checkpoint(tiny_checkpoints, tmp_path)
    path = source / file
    if isinstance(change, dict) and path.exists():
        change = {**json.loads(path.read_text()), **change}
    path.write_text(json.dumps(change))
    message = check_failure(runner, tmp_path, source, 2, "-t", "laptop-cpu-rtn", "--no-eval")
    assert phrase in message


def test_a_link_to_a_file_outside_the_checkpoint_is_refused(runner, tmp_path: Path, tiny_checkpoints) -> None:
    """A chat template linking to a file of this machine was copied into the package (a red-team pass)."""
    source = copy_checkpoint(tiny_checkpoints, tmp_path)
    secret = tmp_path / "credentials.txt"
    secret.write_text("token=hunter2")
    (source / "chat_template.jinja").unlink(missing_ok=True)
    (source / "chat_template.jinja").symlink_to(secret)
    message = check_failure(runner, tmp_path, source, 2, "-t", "laptop-cpu-rtn", "--no-eval")
    assert "chat_template.jinja: is a link to a file outside the checkpoint" in message


@pytest.mark.parametrize(
    ("change", "phrase"),
    [
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope_type 'yarn'"),
        ({"rope_scaling": {"type": "linear", "factor": 4.0}}, "rope_type 'linear'"),
        ({"head_dim": 24}, "head size of 24"),
    ],
    ids=["yarn", "linear-on-llama", "head-dim-24"],
)
def test_a_config_the_builder_would_export_wrong_is_refused_before_weights(
    runner, tmp_path: Path, tiny_checkpoints, change: dict, phrase: str
) -> None:
    """YaRN exported other frequencies (or divided by zero), the builder's Llama dropped linear scaling, a
    head size GQA does not take failed after the export with "report it" (a build of odd tiny configs)."""
    source = copy_checkpoint(tiny_checkpoints, tmp_path)
    edit_config(source, **change)
    message = check_failure(runner, tmp_path, source, 2, "-t", "laptop-cpu-rtn", "--no-eval")
    assert phrase in message and "config.json" in message


def test_nan_weights_are_named_as_the_checkpoints_fault(runner, tmp_path: Path, tiny_checkpoints) -> None:
    """NaN weights ended in "the export is wrong; report it" (exit 1), blaming edgekit for the file."""
    from safetensors.torch import load_file, save_file

    source = copy_checkpoint(tiny_checkpoints, tmp_path)
    (weights,) = sorted(source.glob("*.safetensors"))
    tensors = load_file(str(weights))
    name = next(key for key in tensors if key.endswith("mlp.down_proj.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(weights), metadata={"format": "pt"})
    message = check_failure(runner, tmp_path, source, 2, "-t", "laptop-cpu-rtn", "--no-eval")
    assert "src: gives logits that are not finite numbers in PyTorch itself" in message


@pytest.mark.parametrize("layout", ["weights-in-a-shared-store", "tokenizer-in-a-hub-cache"])
def test_links_a_real_layout_uses_still_build(runner, tmp_path: Path, tiny_checkpoints, layout: str) -> None:
    """Weights are read, never copied: they may link anywhere. A copied file may link into a Hugging Face
    cache's models--*/blobs (older `--local-dir` downloads did so for every file over 5 MB)."""
    source = copy_checkpoint(tiny_checkpoints, tmp_path)
    name = "model.safetensors" if layout.startswith("weights") else "tokenizer.json"
    store = tmp_path / ("store" if layout.startswith("weights") else "hub/models--org--tiny/blobs")
    store.mkdir(parents=True)
    shutil.move(source / name, store / "0123abcd")
    (source / name).symlink_to(store / "0123abcd")
    result = build(runner, source, tmp_path / "out", "-t", "laptop-cpu-rtn", "--no-eval")
    assert result.exit_code == 0, result.output
    assert not any(path.is_symlink() for path in (tmp_path / "out").rglob("*"))
