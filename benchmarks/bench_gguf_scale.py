"""Build random-weight GGUF files of real model shapes and print what a build of each costs: time, peak RSS, disk.

Run: python benchmarks/bench_gguf_scale.py [--sizes qwen3-1.7b,qwen3.5-9b] [--root DIR] [--keep]

- ``qwen3-1.7b``: a Qwen3-1.7B-shaped file (the published config's shapes, 151,936-token vocabulary) with
  Q8_0 tensors of random values, written with the ``gguf`` package, the tokenizer metadata of the demo
  model's GGUF (padded with control tokens to the vocabulary's size). ``edgekit build FILE --streaming
  --no-eval`` runs in a child process; the table gets its wall time, its peak RSS (GNU time's ``%M``) and the
  package's bytes. The peak is what a GGUF build costs, since the file is converted one tensor at a time.
- ``qwen3.5-9b``: a Qwen3.5-9B-shaped file (transformers' ``Qwen3_5TextConfig`` defaults) whose tensor data
  is a sparse hole: only its header is real. The build prints its estimate from the header, then stops:
  transformers, whose GGUF reader edgekit uses, cannot read ``qwen35`` files yet. The table gets the
  estimate and the refusal.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

QWEN3_1_7B = {"hidden": 2048, "ffn": 6144, "layers": 28, "heads": 16, "kv_heads": 8, "head_dim": 128,
              "vocab": 151936, "context": 40960}  # fmt: skip
QWEN3_5_9B = {"hidden": 4096, "ffn": 12288, "layers": 32, "heads": 16, "kv_heads": 4, "head_dim": 256,
              "vocab": 248320, "context": 262144, "linear_every": 4}  # fmt: skip


def _copy_tokenizer(writer: Any, vocab: int) -> None:
    """The demo model's tokenizer metadata, its token list padded with control tokens to ``vocab`` entries."""
    from gguf import GGUFReader, GGUFValueType

    from edgekit.demo import demo_gguf_path

    source = GGUFReader(str(demo_gguf_path()))
    tokens = [str(t) for t in source.fields["tokenizer.ggml.tokens"].contents()]
    types = list(source.fields["tokenizer.ggml.token_type"].contents())
    extra = vocab - len(tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens + [f"<|extra_{i}|>" for i in range(extra)])
    writer.add_token_types(types + [3] * extra)
    writer.add_token_merges([str(m) for m in source.fields["tokenizer.ggml.merges"].contents()])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_key_value("tokenizer.chat_template", source.fields["tokenizer.chat_template"].contents(),
                         GGUFValueType.STRING)  # fmt: skip


def write_qwen3(path: Path, shape: dict[str, int], seed: int = 0) -> None:
    """A Qwen3-shaped GGUF file with random Q8_0 tensors, written one tensor at a time."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    rng = np.random.default_rng(seed)
    writer = GGUFWriter(str(path), "qwen3")
    writer.add_name("random-qwen3-1.7b")
    writer.add_block_count(shape["layers"])
    writer.add_context_length(shape["context"])
    writer.add_embedding_length(shape["hidden"])
    writer.add_feed_forward_length(shape["ffn"])
    writer.add_head_count(shape["heads"])
    writer.add_head_count_kv(shape["kv_heads"])
    writer.add_key_length(shape["head_dim"])
    writer.add_value_length(shape["head_dim"])
    writer.add_rope_freq_base(1000000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    _copy_tokenizer(writer, shape["vocab"])
    tensors = _qwen3_tensors(shape)
    for name, dims in tensors.items():
        if len(dims) == 1:
            writer.add_tensor(name, np.ones(dims, dtype=np.float32))
            continue
        values = (rng.standard_normal(dims, dtype=np.float32) * 0.02).astype(np.float32)
        writer.add_tensor(name, quantize(values, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()


def _qwen3_tensors(shape: dict[str, int]) -> dict[str, tuple[int, ...]]:
    h, f, d = shape["hidden"], shape["ffn"], shape["head_dim"]
    q, kv = shape["heads"] * d, shape["kv_heads"] * d
    tensors: dict[str, tuple[int, ...]] = {"token_embd.weight": (shape["vocab"], h), "output_norm.weight": (h,)}
    for i in range(shape["layers"]):
        block = f"blk.{i}."
        parts = {"attn_norm": (h,), "ffn_norm": (h,), "attn_q": (q, h), "attn_k": (kv, h), "attn_v": (kv, h),
                 "attn_output": (h, q), "attn_q_norm": (d,), "attn_k_norm": (d,), "ffn_gate": (f, h),
                 "ffn_up": (f, h), "ffn_down": (h, f)}  # fmt: skip
        tensors.update({f"{block}{part}.weight": dims for part, dims in parts.items()})
    return tensors


def write_qwen3_5_header(path: Path, shape: dict[str, int]) -> None:
    """A Qwen3.5-9B-shaped GGUF file whose tensors are a sparse hole of the right size (Q4_0): a real header."""
    from gguf import GGMLQuantizationType, GGUFWriter

    writer = GGUFWriter(str(path), "qwen35")
    writer.add_name("random-qwen3.5-9b")
    writer.add_block_count(shape["layers"])
    writer.add_context_length(shape["context"])
    writer.add_embedding_length(shape["hidden"])
    _copy_tokenizer(writer, shape["vocab"])
    h, f = shape["hidden"], shape["ffn"]
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (shape["vocab"], h),
        "output.weight": (shape["vocab"], h),
    }
    for i in range(shape["layers"]):
        block = f"blk.{i}."
        if (i + 1) % shape["linear_every"]:  # linear attention layers (llama.cpp's ssm_* tensors)
            shapes.update({block + "attn_qkv.weight": (8192, h), block + "attn_gate.weight": (4096, h),
                           block + "ssm_out.weight": (h, 4096)})  # fmt: skip
        else:
            q = shape["heads"] * shape["head_dim"]
            shapes.update({block + "attn_q.weight": (2 * q, h), block + "attn_k.weight": (1024, h),
                           block + "attn_v.weight": (1024, h), block + "attn_output.weight": (h, q)})  # fmt: skip
        shapes.update(
            {block + "ffn_gate.weight": (f, h), block + "ffn_up.weight": (f, h), block + "ffn_down.weight": (h, f)}
        )
    q4 = GGMLQuantizationType.Q4_0
    for name, dims in shapes.items():
        nbytes = int(np.prod(dims)) // 32 * 18
        writer.add_tensor_info(name, dims, np.dtype(np.float32), nbytes, q4)  # logical shape, Q4_0 bytes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    end = os.path.getsize(path) + sum(int(np.prod(d)) // 32 * 18 + 32 for d in shapes.values())
    os.truncate(path, end)  # a hole: no disk, no time, and the header's ranges lie inside the file


def build_child(gguf: Path, out: Path) -> tuple[float, float, int, str]:
    """``edgekit build --streaming --no-eval`` in a child: seconds, peak RSS in GiB, exit code, last lines."""
    started = time.perf_counter()
    # Linux carries the peak RSS of this (large) process over fork and exec into a direct child's ru_maxrss;
    # GNU time's child is forked from a small process, so its peak is the build's own.
    peak_file = out.with_name(f"{out.name}.peak-kib")
    done = subprocess.run(
        ["/usr/bin/time", "-f", "%M", "-o", str(peak_file), sys.executable, "-m", "edgekit.cli", "build", str(gguf),
         "-o", str(out), "--streaming", "--no-eval", "-q", "--force"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    peak = int(peak_file.read_text().split()[-1]) / 2**20
    peak_file.unlink()
    return seconds, peak, done.returncode, (done.stdout + done.stderr).strip().splitlines()[-3:].__str__()


def main() -> None:
    """Write the files, build them, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="qwen3-1.7b,qwen3.5-9b")
    parser.add_argument("--root", type=Path, default=Path("gguf-scale"))
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes.split(","):
        path = args.root / f"{size}.gguf"
        started = time.perf_counter()
        if size == "qwen3-1.7b":
            write_qwen3(path, QWEN3_1_7B)
        else:
            write_qwen3_5_header(path, QWEN3_5_9B)
        written = time.perf_counter() - started
        out = args.root / f"{size}-pkg"
        seconds, peak, code, tail = build_child(path, out)
        size_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if out.exists() else 0
        rows.append((size, f"{os.path.getsize(path) / 1e9:.2f} GB", f"{written:.0f}", f"{seconds:.0f}",
                     f"{peak:.2f}", code, f"{size_bytes / 1e9:.2f} GB", tail))  # fmt: skip
        if not args.keep:
            path.unlink(missing_ok=True)
    print("| model | GGUF file | written s | build s | peak RSS GiB | exit | package | last lines |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")


if __name__ == "__main__":
    main()
