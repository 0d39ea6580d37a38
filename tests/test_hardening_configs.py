"""A checkpoint's config.json and weight index as a stranger writes them (a red-team pass on the checks that run
before any weight is read): each bad file is a one-line typed error naming it, never a traceback, a hang or a
read of a file outside the checkpoint."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from edgekit.cli import main
from edgekit.errors import CorruptFileError, SourceError, UnsupportedArchitectureError
from edgekit.exporters.memory_estimate import check_build_resources
from edgekit.sources.checkpoint import check_folder, stage_folder
from edgekit.sources.weight_files import read_safetensors_header
from edgekit.targets import get_target


def copy_of(tiny_checkpoints, tmp_path: Path, model_type: str = "llama") -> Path:
    return Path(shutil.copytree(tiny_checkpoints(model_type), tmp_path / "src"))


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def write_safetensors(path: Path, header: dict) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    return path


def index_of(folder: Path) -> tuple[Path, dict]:
    """The folder's weights as one shard of a sharded checkpoint, with its index written the Hugging Face way."""
    weights = (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    data = {"metadata": {}, "weight_map": {info.name: weights.name for info in read_safetensors_header(weights)}}
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps(data))
    check_folder(folder)  # the index as written is fine
    return index, data


# --- the weight index ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["absolute", "parent", "missing", "not a string"])
def test_an_index_naming_a_file_that_is_not_a_weight_file_of_the_folder_is_refused(
    tmp_path: Path, tiny_checkpoints, where: str
) -> None:
    source = copy_of(tiny_checkpoints, tmp_path)
    index, data = index_of(source)
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(next(source.glob("*.safetensors")), outside)  # a real weight file, just not one of the folder's
    name = next(iter(data["weight_map"]))
    data["weight_map"][name] = {
        "absolute": str(outside),
        "parent": "../elsewhere.safetensors",
        "missing": "model-00002-of-00002.safetensors",
        "not a string": ["model-00001-of-00001.safetensors"],
    }[where]
    index.write_text(json.dumps(data))
    with pytest.raises(SourceError, match="which is not a weight file of this folder") as info:
        check_folder(source)
    assert info.value.path == str(index)


def test_an_index_without_a_weight_map_is_refused(tmp_path: Path, tiny_checkpoints) -> None:
    source = copy_of(tiny_checkpoints, tmp_path)
    index, _ = index_of(source)
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(SourceError, match="has no 'weight_map' object"):
        check_folder(source)


def test_a_pickle_index_is_never_staged(tmp_path: Path, tiny_checkpoints) -> None:
    source = copy_of(tiny_checkpoints, tmp_path)
    index, _ = index_of(source)
    (source / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"x": "/dev/zero"}}))
    staged = stage_folder(check_folder(source), tmp_path / "staged")
    assert not (staged / "pytorch_model.bin.index.json").exists()
    assert (staged / index.name).exists()  # the checked safetensors index is


def test_an_index_beside_a_single_weight_file_is_neither_read_nor_handed_on(tmp_path: Path, tiny_checkpoints) -> None:
    """transformers loads model.safetensors where it exists; a stale index beside it is no reason to refuse."""
    source = copy_of(tiny_checkpoints, tmp_path)
    (source / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "/dev/zero"}}))
    staged = stage_folder(check_folder(source), tmp_path / "staged")
    assert not (staged / "model.safetensors.index.json").exists()


# --- config.json ----------------------------------------------------------------------------------------------


def test_an_integer_json_cannot_parse_is_a_source_error(tmp_path: Path, tiny_checkpoints) -> None:
    source = copy_of(tiny_checkpoints, tmp_path)
    text = (source / "config.json").read_text().rstrip()
    (source / "config.json").write_text(text[:-1] + ', "junk": 1' + "0" * 5000 + "}")
    with pytest.raises(SourceError, match=r"is not valid JSON \(Exceeds the limit"):
        check_folder(source)


@pytest.mark.parametrize("depth", [40, 700, 5000])
def test_a_config_nested_past_any_real_one_is_refused(tmp_path: Path, tiny_checkpoints, depth: int) -> None:
    source = copy_of(tiny_checkpoints, tmp_path)
    text = (source / "config.json").read_text().rstrip()
    (source / "config.json").write_text(text[:-1] + ', "junk": ' + "[" * depth + "]" * depth + "}")
    with pytest.raises(SourceError, match="nests lists or objects more than 32 levels deep"):
        check_folder(source)


@pytest.mark.parametrize("value", [None, "x", [1], 5])
def test_a_text_config_that_is_not_an_object_is_ignored_where_transformers_ignores_it(
    tmp_path: Path, tiny_checkpoints, value
) -> None:
    source = copy_of(tiny_checkpoints, tmp_path)
    edit_config(source, text_config=value)
    checked = check_folder(source)
    plan = check_build_resources(source, checked, get_target("laptop-cpu-rtn"), tmp_path / "out", streaming=False)
    assert plan.whole.parameters > 0


def test_a_text_config_hides_nothing_from_the_checks_of_a_flat_config(tmp_path: Path, tiny_checkpoints) -> None:
    source = copy_of(tiny_checkpoints, tmp_path)
    edit_config(source, text_config={}, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})
    with pytest.raises(UnsupportedArchitectureError, match="rope_type 'yarn'"):
        check_folder(source)
    edit_config(source, rope_parameters={"rope_type": "default", "rope_theta": 1e4}, num_hidden_layers=3)
    with pytest.raises(SourceError, match="declares 3 layers"):
        check_folder(source)
    # ... and a text_config transformers ignores is no reason to refuse a right config
    edit_config(source, text_config={"num_hidden_layers": 5}, num_hidden_layers=2)
    check_folder(source)


def test_a_composite_config_without_its_text_config_is_refused(tmp_path: Path, tiny_checkpoints) -> None:
    source = copy_of(tiny_checkpoints, tmp_path, "qwen3_5")
    check_folder(source)
    edit_config(source, text_config=None)
    with pytest.raises(UnsupportedArchitectureError, match="has no 'text_config' object"):
        check_folder(source)


@pytest.mark.parametrize(
    "rope",
    [5, {"full_attention": 5}, {"full_attention": {"rope_type": "default"}, "sliding_attention": "rope_theta"}],
)
def test_rope_settings_that_are_not_objects_are_refused(tmp_path: Path, tiny_checkpoints, rope) -> None:
    source = copy_of(tiny_checkpoints, tmp_path, "gemma3_text")
    edit_config(source, rope_parameters=rope)
    with pytest.raises(UnsupportedArchitectureError, match="is not an object"):
        check_folder(source)


@pytest.mark.parametrize("key", ["vocab_size", "hidden_size"])
def test_a_config_whose_sizes_are_not_the_embeddings_is_refused(tmp_path: Path, tiny_checkpoints, key: str) -> None:
    source = copy_of(tiny_checkpoints, tmp_path)
    config = json.loads((source / "config.json").read_text())
    edit_config(source, **{key: config[key] * 2})
    with pytest.raises(SourceError, match=r"but the weights' 'model.embed_tokens.weight' is \["):
        check_folder(source)


# --- weight-file headers ----------------------------------------------------------------------------------------


def test_a_layer_index_of_thousands_of_digits_is_no_traceback(tmp_path: Path, tiny_checkpoints) -> None:
    source = copy_of(tiny_checkpoints, tmp_path)
    name = "model.layers." + "1" * 5000 + ".x"
    write_safetensors(source / "extra.safetensors", {name: {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}})
    check_folder(source)  # not a decoder layer edgekit counts: transformers ignores an unknown tensor too


def test_a_dimension_the_safetensors_library_cannot_hold_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {"w": {"dtype": "F32", "shape": [0, 1 << 64], "data_offsets": [0, 0]}})
    with pytest.raises(CorruptFileError, match="malformed shape"):
        read_safetensors_header(path)
    write_safetensors(path, {"w": {"dtype": "F32", "shape": [0, (1 << 63) - 1], "data_offsets": [0, 0]}})
    assert read_safetensors_header(path)[0].shape == (0, (1 << 63) - 1)


# --- what the user sees -------------------------------------------------------------------------------------


def test_terminal_escapes_and_huge_values_from_a_config_are_not_printed_raw(
    runner, tmp_path: Path, tiny_checkpoints
) -> None:
    source = copy_of(tiny_checkpoints, tmp_path)
    edit_config(source, model_type="\x1b]0;PWNED\x07\x1b[31mred" + "x" * 100_000)
    result = runner.invoke(main, ["build", str(source), "-o", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 2
    assert "\x1b" not in result.output and "\x07" not in result.output
    assert "\\x1b]0;PWNED\\x07\\x1b[31mred" in result.output
    assert len(result.output) < 4000 and result.output.count("\n") == 1


def test_a_config_json_linking_outside_the_checkpoint_is_refused(tmp_path: Path, tiny_checkpoints) -> None:
    source = copy_of(tiny_checkpoints, tmp_path)
    outside = tmp_path / "someone-elses.json"
    (source / "config.json").rename(outside)
    (source / "config.json").symlink_to(outside)
    with pytest.raises(SourceError, match="is a link to a file outside the checkpoint"):
        check_folder(source)


def test_an_error_about_a_staged_file_names_the_checkpoints_own(runner, tmp_path: Path, tiny_checkpoints) -> None:
    """The build checks the tokenizer files through its scratch copy (links to them); the user fixes theirs."""
    source = copy_of(tiny_checkpoints, tmp_path)
    (source / "chat_template.jinja").write_text("{% for %}")
    result = runner.invoke(main, ["build", str(source), "-o", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 2, result.output
    assert f"error: {source}: the chat template" in result.output and "partial" not in result.output
