"""Build sources: a local Hugging Face folder, a GGUF file, or a hub id, checked and staged for export.

Everything here runs before a single weight is read: config.json is parsed, the architecture looked up,
remote code and pickle weights refused, weight-file headers checked. Staging then makes a private
folder for the builder (adapted config.json, links to the user's files) so the user's checkpoint is never
modified.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekit.errors import SourceError, first_line
from edgekit.safe_io import file_kind, open_regular, read_regular_file, require_regular
from edgekit.sources.prequantized import quantization_method
from edgekit.sources.registry import Architecture, lookup_architecture, supported_architectures
from edgekit.sources.weight_files import element_count, embedding_shapes, layer_indices, tensor_infos

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a model folder may hand the builder; code (*.py) and pickles are never staged.
_STAGED_SUFFIXES = (".json", ".safetensors", ".jinja", ".model", ".txt", ".tiktoken")
_WEIGHT_SUFFIXES = (".safetensors",)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
MAX_CONFIG_BYTES = 16 << 20  # a real config.json is a few KB
# Shape values of config.json and their upper bounds: far above any real model, low enough to refuse before
# a library allocates by them.
_SHAPE_LIMITS = {
    "num_hidden_layers": 1 << 10,
    "num_attention_heads": 1 << 10,
    "num_key_value_heads": 1 << 10,
    "head_dim": 1 << 12,
    "hidden_size": 1 << 17,
    "intermediate_size": 1 << 20,
    "vocab_size": 1 << 22,
    "max_position_embeddings": 1 << 24,
}
_FOLDER_FIX = "point at a Hugging Face model folder (config.json, *.safetensors, tokenizer files) or a .gguf file"


@dataclass
class SourceSpec:
    """Where a build's checkpoint comes from, as the user named it."""

    kind: str  # "folder", "gguf" or "hub"
    origin: str
    path: Path | None = None


@dataclass(frozen=True)
class CheckedFolder:
    """A Hugging Face folder that passed every pre-load check (what the checks found; never changed after)."""

    folder: Path
    config: dict[str, Any]
    architecture: Architecture
    weight_files: list[Path]
    pickle_weights: bool = False
    parameter_count: int = 0
    warnings: list[str] = field(default_factory=list)
    quantization: str | None = None
    """``gptq`` or ``awq`` for a pre-quantized checkpoint."""


def classify_source(source: str | os.PathLike[str]) -> SourceSpec:
    """Decide whether ``source`` is a folder, a GGUF file or a hub id; errors when it is none of them."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    try:
        mode = path.stat().st_mode
    except OSError:  # nothing local by that name (or a dangling link): a hub id, or a typo
        if _HUB_ID.match(text) and not text.startswith((".", "/")) and not path.is_symlink():
            return SourceSpec("hub", text)
        raise SourceError("does not exist", path=path, fix=_FOLDER_FIX) from None
    if stat.S_ISDIR(mode):
        return SourceSpec("folder", text, path.resolve())
    if not stat.S_ISREG(mode):
        raise SourceError(f"is {file_kind(mode)}, not a checkpoint folder or a GGUF file", path=path, fix=_FOLDER_FIX)
    if path.suffix.lower() == ".gguf" or _starts_with(path, b"GGUF"):
        return SourceSpec("gguf", text, path.resolve())
    raise SourceError("is a file but not a GGUF file", path=path, fix=_FOLDER_FIX)


def read_config(folder: Path) -> dict[str, Any]:
    """Parse a folder's config.json, with an error naming the file when it is missing or invalid."""
    path = folder / "config.json"
    if not path.exists():
        raise SourceError("no config.json in this folder", path=folder, fix=_FOLDER_FIX)
    config = _read_json_object(path, MAX_CONFIG_BYTES, "restore config.json from the model's source")
    if not isinstance(config, dict):
        raise SourceError("must hold a JSON object", path=path, fix="restore config.json from the model's source")
    return config


_MAX_JSON_DEPTH = 32
"""Nesting a checkpoint's JSON file may have: real ones nest a few levels; libraries that copy a config
(``copy.deepcopy``, transformers) recurse once per level and fail far below json's own limit."""


def _read_json_object(path: Path, limit: int, fix: str) -> Any:
    """Parse a checkpoint's JSON file of at most ``limit`` bytes, nested at most ``_MAX_JSON_DEPTH`` levels."""
    data = read_regular_file(path, limit, SourceError, fix)
    too_deep = SourceError(f"nests lists or objects more than {_MAX_JSON_DEPTH} levels deep", path=path, fix=fix)
    try:
        value = json.loads(data)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4,300 digits
        raise SourceError(f"is not valid JSON ({first_line(exc, 200)})", path=path, fix=fix) from None
    except RecursionError:
        raise too_deep from None
    if _nesting(value) > _MAX_JSON_DEPTH:
        raise too_deep
    return value


def _nesting(value: Any) -> int:
    """How many levels of lists and objects ``value`` nests (without recursion: it may be deep)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if depth <= _MAX_JSON_DEPTH:
                stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def check_folder(folder: Path, *, allow_pickle: bool = False) -> CheckedFolder:
    """Run every check that needs no weights: config, architecture, remote code, weights, tokenizer."""
    config = read_config(folder)
    config_path = folder / "config.json"
    _inside(config_path, folder)  # its values go into the package like the files staging links
    if "auto_map" in config and config.get("model_type") not in supported_architectures():
        raise SourceError(
            f"declares custom model code (auto_map) for architecture '{config.get('model_type')}'; "
            "edgekit never runs code shipped with a checkpoint",
            path=config_path,
            fix="use a checkpoint of an architecture transformers implements: " + ", ".join(supported_architectures()),
        )
    architecture = lookup_architecture(config, config_path)
    check_config_values(config, config_path)
    architecture.check_config(config, config_path)
    quantization = quantization_method(config, config_path)
    warnings = []
    if "auto_map" in config:
        warnings.append(f"{config_path}: ignoring auto_map; the built-in {architecture.model_type} code is used")
    safetensors = sorted(folder.glob("*.safetensors"))
    pickles = sorted(p for p in folder.glob("*.bin") if p.name.startswith("pytorch_model"))
    if safetensors:
        infos = tensor_infos(safetensors)  # every header read once, for the count and the checks below
        parameter_count = element_count(infos)
        weights, is_pickle = safetensors, False
        _check_weight_indexes(folder, safetensors)
        text = architecture.text_section(config)
        _check_layer_count(text, config_path, layer_indices(infos))
        _check_embedding_shape(text, config_path, embedding_shapes(infos))
    elif pickles:
        if not allow_pickle:
            raise SourceError(
                "holds only pickle weights, which can run code when loaded",
                path=pickles[0],
                fix="convert them to safetensors, or pass --allow-pickle to load them with "
                "torch.load(weights_only=True)",
            )
        for pickle in pickles:
            require_regular(pickle, SourceError)
        weights, is_pickle, parameter_count = pickles, True, 0
    else:
        raise SourceError("no weight files (*.safetensors) in this folder", path=folder, fix=_FOLDER_FIX)
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise SourceError(
            "no tokenizer (tokenizer.json or tokenizer.model) in this folder",
            path=folder,
            fix="copy the model's tokenizer files next to its weights",
        )
    return CheckedFolder(folder, config, architecture, weights, is_pickle, parameter_count, warnings, quantization)


def check_config_values(config: dict[str, Any], path: Path) -> None:
    """Refuse shape values that are not positive integers in range, before any library sizes memory by them.

    A crafted ``num_hidden_layers: 1000000000`` would otherwise make the builder allocate until it fails.
    """
    sections = [config, *(config[k] for k in ("text_config",) if isinstance(config.get(k), dict))]
    for section in sections:
        for key, limit in _SHAPE_LIMITS.items():
            value = section.get(key)
            if value is None:
                continue
            if type(value) is not int or not 1 <= value <= limit:
                raise SourceError(
                    f"'{key}' is {str(value)[:40]}; it must be an integer from 1 to {limit}",
                    path=path,
                    fix="restore config.json from the model's source",
                )


def _check_weight_indexes(folder: Path, weight_files: list[Path]) -> None:
    """Each ``*.safetensors.index.json`` must map tensor names to weight files of this folder, by bare name.

    transformers opens whatever file an index names: an absolute path or ``..`` would make the build read a
    file, a device or a pipe that the header checks never saw.
    """
    names = {path.name for path in weight_files}
    fix = "restore the index from the model's source (or delete it if one weight file holds every tensor)"
    for index in sorted(folder.glob("*.safetensors.index.json")):
        if _index_unused(index):
            continue
        data = _read_json_object(index, MAX_CONFIG_BYTES, fix)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise SourceError("has no 'weight_map' object", path=index, fix=fix)
        for tensor, file_name in weight_map.items():
            if not isinstance(file_name, str) or file_name not in names:
                raise SourceError(
                    f"puts tensor '{tensor[:100]}' in {str(file_name)[:200]!r}, which is not a weight file of "
                    "this folder",
                    path=index,
                    fix=fix,
                )


def _index_unused(index: Path) -> bool:
    """transformers opens ``model.safetensors`` where it exists and never reads the index beside it."""
    return index.name == "model.safetensors.index.json" and (index.parent / "model.safetensors").is_file()


def _check_layer_count(text: Mapping[str, Any], path: Path, indices: set[int]) -> None:
    """The layer count of the config's text section must be the number of layers the weight files hold."""
    declared = text.get("num_hidden_layers")
    if not isinstance(declared, int) or not indices:
        return
    if indices != set(range(declared)):
        raise SourceError(
            f"declares {declared} layers but the weight files hold layers {min(indices)}..{max(indices)} "
            f"({len(indices)} of them)",
            path=path,
            fix="use the config.json that came with these weights",
        )


def _check_embedding_shape(text: Mapping[str, Any], path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """The token embedding must be [vocab_size, hidden_size] as the config's text section says: transformers
    refuses a mismatch too, but only once it has read the weights, in a message of many lines."""
    declared = (text.get("vocab_size"), text.get("hidden_size"))
    if not all(isinstance(value, int) for value in declared):
        return
    for name, shape in shapes.items():
        if shape != declared:
            raise SourceError(
                f"declares vocab_size {declared[0]} and hidden_size {declared[1]} but the weights' '{name}' "
                f"is {list(shape)}",
                path=path,
                fix="use the config.json that came with these weights",
            )


def stage_folder(checked: CheckedFolder, stage: Path, *, packaged: bool = True) -> Path:
    """Make the builder's private copy of a checked folder: adapted config.json, links to the rest.

    ``packaged``: the copy's files go into a package, so a link that leads out of the checkpoint is refused
    (False for a reference that only reads them: the streamed evaluation, which may stage a staged folder).
    Pickle weights are loaded with ``torch.load(weights_only=True)`` and rewritten as safetensors here,
    so no later library ever unpickles them.
    """
    stage.mkdir(parents=True, exist_ok=True)
    config = checked.architecture.builder_config(checked.config)
    (stage / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    for item in sorted(checked.folder.iterdir()):
        if item.name == "config.json" or not item.is_file() or not item.name.endswith(_STAGED_SUFFIXES):
            continue
        # Pickles become one model.safetensors below (or are not used): no index of theirs applies.
        if item.name.endswith(".bin.index.json") or (checked.pickle_weights and item.name.endswith(".index.json")):
            continue
        if _index_unused(item):  # left unchecked, so not handed on either
            continue
        (stage / item.name).symlink_to(_inside(item, checked.folder) if packaged else item.resolve())
    if checked.pickle_weights:
        _convert_pickles(checked.weight_files, stage / "model.safetensors")
    return stage


def _inside(item: Path, folder: Path) -> Path:
    """``item`` resolved; a file the package copies (a tokenizer, template or config) must be one of the
    checkpoint's: in its folder or a Hugging Face cache's ``models--*/blobs`` (where snapshots and older
    ``--local-dir`` downloads link). A link elsewhere would copy a file of this machine into the package.
    Weights are read, never copied, so they may live anywhere (a shared store, git-annex)."""
    target = item.resolve()
    if item.name.endswith(_WEIGHT_SUFFIXES):
        return target
    in_hub_cache = target.parent.name == "blobs" and target.parent.parent.name.startswith("models--")
    if not (target.is_relative_to(folder.resolve()) or in_hub_cache):
        raise SourceError(
            f"is a link to a file outside the checkpoint ({target})",
            path=item,
            fix="copy the file into the checkpoint folder, or remove the link",
        )
    return target


def download_hub_snapshot(repo_id: str, cache_dir: Path | None = None) -> Path:
    """Download a hub repository's config, safetensors and tokenizer files (never code or pickles)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise SourceError(
            "hub ids need huggingface_hub", path=repo_id, fix='pip install ".[export]" in a clone of edgekit'
        ) from exc
    try:
        folder = snapshot_download(
            repo_id,
            cache_dir=None if cache_dir is None else str(cache_dir),
            allow_patterns=[f"*{suffix}" for suffix in _STAGED_SUFFIXES],
        )
    except Exception as exc:  # network, auth and missing-repo errors, each said in one line
        raise _hub_error(repo_id, exc) from None
    return Path(folder)


_OFFLINE = {"LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectError", "ConnectionError", "ConnectTimeout"}
_NOT_FOUND = {"RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError", "EntryNotFoundError"}


def _hub_error(repo_id: str, exc: BaseException) -> SourceError:
    """One line for a failed hub download: offline, not found (or gated), or the first line of what failed."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < 16:
        chain.append(current)
        current = current.__cause__ or current.__context__
    names = {type(error).__name__ for error in chain}
    fix_offline = "download the model where there is network and pass its folder (or its .gguf file)"
    if names & _NOT_FOUND:
        return SourceError(
            "is not a model on the Hugging Face hub, or needs a login to download",
            path=repo_id,
            fix="check the id; for a gated model, run `hf auth login` first",
        )
    if names & _OFFLINE or any(isinstance(e, OSError) and e.errno in (-2, -3, 101, 111) for e in chain):
        return SourceError("cannot be downloaded: there is no network access to the Hugging Face hub",
                           path=repo_id, fix=fix_offline)  # fmt: skip
    detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return SourceError(f"cannot be downloaded ({type(exc).__name__}: {detail})", path=repo_id, fix=fix_offline)


def _convert_pickles(pickles: list[Path], target: Path) -> None:
    import torch
    from safetensors.torch import save_file

    tensors: dict[str, Any] = {}
    for path in pickles:
        require_regular(path, SourceError)
        try:
            # mmap needs the zip format of torch.save; legacy (pre-1.6) files are read without it.
            zipped = zipfile.is_zipfile(path)
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
        except Exception as exc:
            raise SourceError(
                f"cannot be loaded safely ({type(exc).__name__}: {exc})",
                path=path,
                fix="convert the checkpoint to safetensors with the tool that made it",
            ) from None
        tensors.update({name: value.contiguous() for name, value in state.items()})
    save_file(tensors, str(target), metadata={"format": "pt"})


def _starts_with(path: Path, magic: bytes) -> bool:
    with open_regular(path, SourceError, _FOLDER_FIX) as handle:
        return handle.read(len(magic)) == magic
