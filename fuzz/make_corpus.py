"""Write the seed corpora of the fuzz harnesses: small valid inputs for each front door.

python fuzz/make_corpus.py [FOLDER]    (default: fuzz/corpus; one subfolder per harness)
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np


def write_package_files(root: Path) -> dict:
    """A small package: a variant with genai_config.json, an ONNX model with external data, a tokenizer
    config; returns its manifest (also written)."""
    from onnx import TensorProto, helper

    from edgekit.package import read_manifest, write_manifest

    variant = root / "fp32"
    variant.mkdir(parents=True, exist_ok=True)
    (root / "build.log").write_text("log\n")
    (variant / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"filename": "model.onnx"}}}))
    (variant / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "X", "tokenizer_file": None}))
    tensor = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "weights.bin"), ("offset", "0"), ("length", "16")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [], [output], [tensor])
    (variant / "model.onnx").write_bytes(helper.make_model(graph).SerializeToString())
    (variant / "weights.bin").write_bytes(bytes(16))
    write_manifest(root, {"variants": {"fp32": {"path": "fp32"}}, "default_variant": "fp32"})
    return read_manifest(root)


def _safetensors(folder: Path) -> None:
    from safetensors.numpy import save_file

    save_file(
        {"a": np.zeros((3, 5), np.float32), "b": np.ones(7, np.float16), "c": np.arange(4, dtype=np.int64)},
        str(folder / "three-tensors"),
        metadata={"format": "pt"},
    )
    save_file({"x": np.zeros((), np.float32)}, str(folder / "scalar"))


def _gguf(folder: Path) -> None:
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    writer = GGUFWriter(str(folder / "llama"), "llama")
    writer.add_uint32("llama.block_count", 1)
    writer.add_token_list(["<s>", "</s>", "a", "b"])
    writer.add_token_scores([0.0, 0.0, -1.0, -2.0])
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    weights = np.ones((2, 64), np.float32)
    writer.add_tensor(
        "blk.0.attn_q.weight",
        quantize(weights, GGMLQuantizationType.Q4_0),
        raw_dtype=GGMLQuantizationType.Q4_0,
    )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _archive(folder: Path) -> None:
    from edgekit.archive import pack_package

    with tempfile.TemporaryDirectory() as work:
        write_package_files(Path(work) / "pkg")
        pack_package(Path(work) / "pkg", folder / "package.tar")
        pack_package(Path(work) / "pkg", folder / "package.tar.gz")


def _manifest(folder: Path) -> None:
    with tempfile.TemporaryDirectory() as work:
        write_package_files(Path(work) / "pkg")
        shutil.copy(Path(work) / "pkg" / "manifest.json", folder / "manifest.json")


def make(root: Path) -> None:
    """Write every harness's seeds under ``root/<harness>/``."""
    writers = {"safetensors": _safetensors, "gguf": _gguf, "manifest": _manifest, "archive": _archive}
    for name, writer in writers.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        writer(folder)


if __name__ == "__main__":
    make(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "corpus")
