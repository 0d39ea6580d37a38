"""Paths that a package's own files name must stay inside the package.

onnxruntime-genai opens the files ``genai_config.json`` names (``model.decoder.filename`` and every other
``*filename`` key), and onnxruntime opens the external-data ``location`` of every tensor in a ``.onnx``
file, each relative to the variant folder. A crafted package could point them at ``../../secret`` or
``/etc/passwd``. Every such string must be relative, free of ``..``, resolve inside the package, and name a
file the manifest lists; tensor data ranges must lie inside that file. Checked before onnxruntime sees
the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from edgekit.errors import PackageError
from edgekit.package.genai_config import GENAI_CONFIG, MAX_GENAI_CONFIG_BYTES, parse_genai_config
from edgekit.safe_io import DuplicateKeyError, read_regular_file, strict_json_loads

# The JSON files of a model folder (one with a genai_config.json) have their path-like strings checked;
# tokenizer.json (megabytes of vocabulary, no paths) is not read.
_SKIPPED_JSON = frozenset({"tokenizer.json", "vocab.json"})
_MAX_JSON_BYTES = 16 << 20
_FOUR_BIT_TYPES = frozenset({21, 22, 23})  # UINT4, INT4, FLOAT4E2M1
_EXTERNAL_KEYS = frozenset({"location", "offset", "length", "checksum"})
_FIX = "rebuild the package with `edgekit build`; edgekit never follows paths out of a package"


def check_references(root: Path, sizes: dict[str, int], subfolder: str | None = None) -> None:
    """Check every path a package's configs and ONNX files name; ``sizes`` maps listed files to byte sizes.

    Only the files under ``subfolder`` are read when it is given. Raises ``PackageError`` naming the file
    that holds the bad reference.
    """
    model_folders = {str(PurePosixPath(r).parent) for r in sizes if PurePosixPath(r).name == "genai_config.json"}
    for relative in sorted(sizes):
        if subfolder is not None and not relative.startswith(f"{subfolder}/"):
            continue
        name = PurePosixPath(relative).name
        if name.endswith(".onnx"):
            _check_onnx(root, relative, sizes)
        elif name == GENAI_CONFIG:
            _check_genai_config(root, relative, sizes)
        elif (
            name.endswith(".json")
            and name not in _SKIPPED_JSON
            and str(PurePosixPath(relative).parent) in model_folders
        ):
            _check_json(root, relative, sizes)


def check_named_path(root: Path, holder: str, value: object, sizes: dict[str, int]) -> str:
    """Check one path string that the file ``holder`` names; returns the package-relative path it means."""
    path = root / holder
    if not isinstance(value, str) or not value:
        raise PackageError(f"names a file with {value!r}, which is not a file name", path=path, fix=_FIX)
    windows = PureWindowsPath(value)
    if value.startswith("/") or windows.is_absolute() or windows.drive or "\\" in value or "\0" in value:
        raise PackageError(f"names '{value}', an absolute or non-portable path", path=path, fix=_FIX)
    if ".." in PurePosixPath(value).parts:
        raise PackageError(f"names '{value}', which climbs out of its folder with '..'", path=path, fix=_FIX)
    folder = PurePosixPath(holder).parent
    target = (folder / value).as_posix()
    target = "/".join(part for part in target.split("/") if part not in ("", "."))
    resolved = (root / target).resolve()
    if resolved != root.resolve() and root.resolve() not in resolved.parents:
        raise PackageError(f"names '{value}', which resolves outside the package", path=path, fix=_FIX)
    if target not in sizes:
        raise PackageError(f"names '{value}', which the manifest does not list", path=path, fix=_FIX)
    return target


def _check_genai_config(root: Path, relative: str, sizes: dict[str, int]) -> None:
    """The config onnxruntime-genai acts on: only the keys edgekit writes (``genai_config.py``), its file inside."""
    path = root / relative
    config = parse_genai_config(read_regular_file(path, MAX_GENAI_CONFIG_BYTES, PackageError), path)
    check_named_path(root, relative, config.model.decoder.filename, sizes)


def _check_json(root: Path, relative: str, sizes: dict[str, int]) -> None:
    path = root / relative
    if sizes[relative] > _MAX_JSON_BYTES:
        return  # not a config; nothing onnxruntime-genai reads paths from is this large
    try:
        document = strict_json_loads(path.read_bytes())
    except DuplicateKeyError as exc:
        raise PackageError(f"is ambiguous: {exc}", path=path, fix="rebuild the package with edgekit") from None
    except (ValueError, RecursionError):
        return  # a file onnxruntime-genai cannot parse either names nothing
    for value in _path_values(document):
        for item in value if isinstance(value, list) else [value]:
            if item is not None:
                check_named_path(root, relative, item, sizes)


def _path_values(node: Any) -> Iterator[Any]:
    """The value of every key that names a file: ``filename``, ``*_filename``, ``*_file``."""
    stack = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, dict):
            for key, value in current.items():
                if isinstance(key, str) and (key == "filename" or key.endswith(("_filename", "_file"))):
                    yield value
                else:
                    stack.append(value)
        elif isinstance(current, list):
            stack.extend(current)


def _check_onnx(root: Path, relative: str, sizes: dict[str, int]) -> None:
    import onnx

    path = root / relative
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError and friends: the protobuf is malformed
        raise PackageError(f"is not a readable ONNX model ({type(exc).__name__})", path=path, fix=_FIX) from None
    for tensor in _external_tensors(model):
        entries = _external_entries(tensor, path)
        target = check_named_path(root, relative, entries.get("location"), sizes)
        offset_text, length_text = entries.get("offset", "0"), entries.get("length", str(sizes[target]))
        if not (offset_text.isascii() and offset_text.isdigit() and length_text.isascii() and length_text.isdigit()):
            raise PackageError(f"tensor '{tensor.name}' has a malformed external data range", path=path, fix=_FIX)
        offset, length = int(offset_text), int(length_text)
        expected = _tensor_bytes(tensor)
        if expected is not None and length != expected:
            raise PackageError(
                f"tensor '{tensor.name}' of shape {list(tensor.dims)} needs {expected} bytes, its external data "
                f"says {length}",
                path=path,
                fix=_FIX,
            )
        if offset + length > sizes[target]:
            raise PackageError(
                f"tensor '{tensor.name}' reads bytes {offset}..{offset + length} of the {sizes[target]}-byte {target}",
                path=path,
                fix=_FIX,
            )


def _tensor_bytes(tensor: Any) -> int | None:
    """Bytes a tensor's data takes (packed 4-bit types rounded up), or None for types of no fixed size."""
    import math

    from onnx import helper

    try:
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    except (KeyError, TypeError, ValueError):
        return None
    count = math.prod(tensor.dims)
    if tensor.data_type in _FOUR_BIT_TYPES:
        return (count + 1) // 2
    return None if dtype.kind in "OUS" else count * dtype.itemsize


def _external_entries(tensor: Any, path: Path) -> dict[str, str]:
    """A tensor's external-data entries; a key given twice or one onnxruntime does not know is refused."""
    entries: dict[str, str] = {}
    for entry in tensor.external_data:
        if entry.key not in _EXTERNAL_KEYS:
            raise PackageError(f"tensor '{tensor.name}' has an unknown external data key '{entry.key}'", path=path)
        if entry.key in entries:
            raise PackageError(f"tensor '{tensor.name}' gives its external data '{entry.key}' twice", path=path)
        entries[entry.key] = entry.value
    return entries


def _external_tensors(model: Any) -> Iterator[Any]:
    """Every tensor of the model stored as external data: initializers, sparse ones, attributes, subgraphs."""
    from onnx import TensorProto

    graphs = [model.graph]
    nodes = [node for function in model.functions for node in function.node]
    tensors: list[Any] = []
    while graphs or nodes:
        if graphs:
            graph = graphs.pop()
            tensors.extend(graph.initializer)
            for sparse in graph.sparse_initializer:
                tensors.extend((sparse.values, sparse.indices))
            nodes.extend(graph.node)
            continue
        for attribute in nodes.pop().attribute:
            if attribute.HasField("t"):
                tensors.append(attribute.t)
            tensors.extend(attribute.tensors)
            if attribute.HasField("sparse_tensor"):
                tensors.extend((attribute.sparse_tensor.values, attribute.sparse_tensor.indices))
            if attribute.HasField("g"):
                graphs.append(attribute.g)
            graphs.extend(attribute.graphs)
    for tensor in tensors:
        if tensor.HasField("data_location") and tensor.data_location == TensorProto.EXTERNAL:
            yield tensor
