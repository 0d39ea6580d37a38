"""Write the seed corpora of the fuzz harnesses: small valid inputs for each front door.

python fuzz/make_corpus.py [FOLDER]    (default: fuzz/corpus; one subfolder per harness)
"""

from __future__ import annotations

import copy
import io
import json
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

# A genai_config.json as edgekit's builder writes it (a tiny llama's), so the seed packages pass the checks.
GENAI_CONFIG: dict = {
    "model": {
        "bos_token_id": 1,
        "context_length": 256,
        "decoder": {
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            "filename": "model.onnx",
            "head_size": 16,
            "hidden_size": 64,
            "inputs": {
                "input_ids": "input_ids",
                "attention_mask": "attention_mask",
                "past_key_names": "past_key_values.%d.key",
                "past_value_names": "past_key_values.%d.value",
            },
            "outputs": {
                "logits": "logits",
                "present_key_names": "present.%d.key",
                "present_value_names": "present.%d.value",
            },
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "num_key_value_heads": 2,
        },
        "eos_token_id": 2,
        "pad_token_id": 3,
        "type": "llama",
        "vocab_size": 512,
    },
    "search": {
        "diversity_penalty": 0.0,
        "do_sample": False,
        "early_stopping": True,
        "length_penalty": 1.0,
        "max_length": 256,
        "min_length": 0,
        "no_repeat_ngram_size": 0,
        "num_beams": 1,
        "num_return_sequences": 1,
        "past_present_share_buffer": True,
        "repetition_penalty": 1.0,
        "temperature": 1.0,
        "top_k": 50,
        "top_p": 1.0,
    },
}


def write_package_files(root: Path) -> dict:
    """A small package: a variant with genai_config.json, an ONNX model with external data, a tokenizer
    config; returns its manifest (also written)."""
    from onnx import TensorProto, helper

    from edgekit.package.manifest import read_manifest, write_manifest

    variant = root / "fp32"
    variant.mkdir(parents=True, exist_ok=True)
    (root / "build.log").write_text("log\n")
    (variant / "genai_config.json").write_text(json.dumps(GENAI_CONFIG, indent=4))
    (variant / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "X", "tokenizer_file": None}))
    tensor = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "model.onnx.data"), ("offset", "0"), ("length", "16")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [], [output], [tensor])
    (variant / "model.onnx").write_bytes(helper.make_model(graph).SerializeToString())
    (variant / "model.onnx.data").write_bytes(bytes(16))
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


def _tar(members: list[tuple[str, bytes, int]]) -> bytes:
    """An uncompressed tar of exactly these members (name, data, size its header declares)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, size in members:
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, io.BytesIO(data.ljust(size, b"\0")))
    return raw.getvalue()


def _archive(folder: Path) -> None:
    """Archives `edgekit pack` writes (manifest.json first), and near misses whose headers disagree with
    the manifest: a member of another size, an unlisted member, a listed file absent, the manifest last."""
    from edgekit.package.archive import pack_package

    with tempfile.TemporaryDirectory() as work:
        root = Path(work) / "pkg"
        manifest = write_package_files(root)
        pack_package(root, folder / "package.tar")
        pack_package(root, folder / "package.tar.gz")
        first = [("manifest.json", (root / "manifest.json").read_bytes())]
        files = [(entry["path"], (root / entry["path"]).read_bytes()) for entry in manifest["files"]]
        whole = [(name, data, len(data)) for name, data in first + files]
        resized = [(n, d, s + 512 if n.endswith("model.onnx.data") else s) for n, d, s in whole]
        seeds = {
            "resized-member.tar": _tar(resized),
            "shrunk-member.tar": _tar([(n, d[:1], 1) if n.endswith("model.onnx") else (n, d, s) for n, d, s in whole]),
            "unlisted-member.tar": _tar([*whole, ("fp32/extra.bin", b"x", 4096)]),
            "missing-member.tar": _tar(whole[:-1]),
            "manifest-last.tar": _tar([*whole[1:], whole[0]]),
            "manifest-only.tar": _tar(whole[:1]),
        }
        for name, data in seeds.items():
            (folder / name).write_bytes(data)


def _package(folder: Path) -> None:
    """genai_config.json seeds: the builder's, and ones with the keys onnxruntime-genai acts on dangerously."""
    variants: dict[str, dict] = {"builder.json": GENAI_CONFIG}
    options = GENAI_CONFIG["model"]["decoder"]["session_options"]
    for name, extra in {
        "custom-ops.json": {"custom_ops_library": "libcustom_ops.so"},
        "profiling.json": {"enable_profiling": "/tmp/profile"},
        "cuda.json": {"provider_options": [{"cuda": {"enable_cuda_graph": "0"}}]},
        "config-entries.json": {"config_entries": {"session.load_model_format": "ORT"}},
    }.items():
        config = copy.deepcopy(GENAI_CONFIG)
        config["model"]["decoder"]["session_options"] = {**options, **extra}
        variants[name] = config
    unknown = copy.deepcopy(GENAI_CONFIG)
    unknown["model"]["unknown_key"] = 1
    unknown["engine"] = {"dynamic_batching": {}}
    variants["unknown-keys.json"] = unknown
    outside = copy.deepcopy(GENAI_CONFIG)
    outside["model"]["decoder"]["filename"] = "../build.log"
    variants["model-outside.json"] = outside
    for name, config in variants.items():
        (folder / name).write_text(json.dumps(config, indent=4))


def _manifest(folder: Path) -> None:
    with tempfile.TemporaryDirectory() as work:
        write_package_files(Path(work) / "pkg")
        shutil.copy(Path(work) / "pkg" / "manifest.json", folder / "manifest.json")


def make(root: Path) -> None:
    """Write every harness's seeds under ``root/<harness>/``."""
    writers = {
        "safetensors": _safetensors,
        "gguf": _gguf,
        "manifest": _manifest,
        "archive": _archive,
        "package": _package,
    }
    for name, writer in writers.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        writer(folder)


if __name__ == "__main__":
    make(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "corpus")
