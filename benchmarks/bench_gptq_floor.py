"""The arithmetic floor of GPTQ on this machine: the least time any exact calibration pass could take.

    python benchmarks/bench_gptq_floor.py [HF_FOLDER] [--samples 128] [--seq-len 512]

GPTQ needs every decoder layer's inputs over every calibration token, so whatever the implementation it
runs the model forward once over the calibration set (the reference algorithm runs each layer twice: once
to collect the Hessians, once more quantized to feed the next layer) and accumulates the Hessians
``X^T X`` (symmetric: half of them need computing). This script counts those FLOPs from the model's
config and measures the fastest matrix products this machine offers for them, on the shapes GPTQ uses:

- torch float32, bfloat16 and int8 (``torch._int_mm``) products;
- onnxruntime float32 ``MatMul`` and int8 ``DynamicQuantizeMatMul`` (MLAS, the fastest int8 kernels here);
- onnxruntime ``MatMulNBits`` on int4 weights (block 32), with float32 and with int8 compute: the kernel
  that could run a quantized layer's forward with the runtime's own numerics.

It prints each throughput and the resulting floor: one forward pass plus half the Hessians at the best
float32 and the best int8 rate, with no solve, no attention overhead, no Python. A GPTQ time target below
that floor cannot be met by an exact GPTQ on this machine, only by calibrating on fewer tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe_machine

# SmolLM2-135M, the demo model, when no folder is given.
SMOLLM2 = {
    "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
    "num_key_value_heads": 3, "head_dim": 64,
}  # fmt: skip


def rate(run: Callable[[], object], operations: float, repeats: int = 5) -> float:
    """Operations per second of ``run``: the best of ``repeats`` timed calls after one warm-up."""
    run()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return operations / best


def torch_rates(rows: int, inner: int, outer: int) -> dict[str, float]:
    """torch's float32, bfloat16 and int8 matrix products of [rows, inner] x [inner, outer], in op/s."""
    import torch

    ops = 2.0 * rows * inner * outer
    a, b = torch.randn(rows, inner), torch.randn(inner, outer)
    a16, b16 = a.bfloat16(), b.bfloat16()
    rates = {"torch fp32": rate(lambda: a @ b, ops), "torch bf16": rate(lambda: a16 @ b16, ops)}
    a8 = torch.randint(-127, 127, (rows, inner), dtype=torch.int8)
    b8 = torch.randint(-8, 8, (inner, outer), dtype=torch.int8)
    with contextlib.suppress(RuntimeError):  # not every build has a CPU int8 kernel
        rates["torch int8"] = rate(lambda: torch._int_mm(a8, b8), ops)
    return rates


def onnxruntime_rates(rows: int, inner: int, outer: int) -> dict[str, float]:
    """onnxruntime's float32 MatMul, int8 DynamicQuantizeMatMul, and the runtime's int4 MatMulNBits (block
    32) with float32 and with int8 compute (accuracy level 4), on the same shapes, in op/s."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.integers(-8, 8, (inner, outer)).astype(np.int8)
    inputs = [helper.make_tensor_value_info("A", TensorProto.FLOAT, [rows, inner])]
    outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [rows, outer])]
    graphs = {
        "onnxruntime fp32": (
            helper.make_node("MatMul", ["A", "B"], ["Y"]),
            [numpy_helper.from_array(weight.astype(np.float32), "B")],
        ),
        "onnxruntime int8": (
            helper.make_node("DynamicQuantizeMatMul", ["A", "B", "S"], ["Y"], domain="com.microsoft"),
            [numpy_helper.from_array(weight, "B"), numpy_helper.from_array(np.array([0.01], np.float32), "S")],
        ),
    }
    block = 32
    packed = rng.integers(0, 256, (outer, inner // block, block // 2)).astype(np.uint8)
    scales = np.full(outer * (inner // block), 0.01, np.float32)
    for level, label in ((0, "fp32 compute"), (4, "int8 compute")):
        graphs[f"onnxruntime int4 MatMulNBits, {label}"] = (
            helper.make_node(
                "MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft",
                K=inner, N=outer, bits=4, block_size=block, accuracy_level=level,
            ),
            [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "S")],
        )  # fmt: skip
    options = ort.SessionOptions()
    options.intra_op_num_threads = len(os.sched_getaffinity(0))
    activations = rng.standard_normal((rows, inner)).astype(np.float32)
    rates = {}
    for name, (node, initializers) in graphs.items():
        graph = helper.make_graph([node], name, inputs, outputs, initializers)
        opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
        model = helper.make_model(graph, opset_imports=opsets)
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        rates[name] = rate(lambda session=session: session.run(None, {"A": activations}), 2.0 * rows * inner * outer)
    return rates


def gptq_flops(config: dict[str, int], tokens: int) -> tuple[float, float, float]:
    """FLOPs of one forward pass's linear layers, its attention (causal half), and half the Hessians."""
    hidden, inner, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q_width, kv_width = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    per_token = hidden * (q_width + 2 * kv_width) + q_width * hidden + 3 * hidden * inner
    linear = 2.0 * per_token * tokens * layers
    # Q K^T and A V over a causal window: on average half the sequence, per query head.
    seq_len = config["_seq_len"]
    attention = 2.0 * 2 * (seq_len / 2) * q_width * tokens * layers
    # H = X^T X for the q/k/v input, the o input, the gate/up input and the down input; half is symmetric.
    hessians = 2.0 * tokens * layers * (2 * hidden * hidden + q_width * q_width + inner * inner) / 2
    return linear, attention, hessians


def main() -> None:
    """Measure, count and print the floor."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, nargs="?", help="a Hugging Face folder (default: SmolLM2-135M)")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    config = dict(SMOLLM2)
    if args.checkpoint is not None:
        loaded = json.loads((args.checkpoint / "config.json").read_text())
        config = loaded.get("text_config", loaded)
    config["_seq_len"] = args.seq_len
    tokens = args.samples * args.seq_len
    rows, hidden, inner = 4 * args.seq_len, config["hidden_size"], config["intermediate_size"]

    rates = {}
    for shape in ((rows, hidden, inner), (rows, inner, hidden)):
        for name, value in {**torch_rates(*shape), **onnxruntime_rates(*shape)}.items():
            rates[name] = max(rates.get(name, 0.0), value)
    linear, attention, hessians = gptq_flops(config, tokens)
    best_float = max(rates["torch fp32"], rates["onnxruntime fp32"])
    best_int8 = max(value for name, value in rates.items() if "int8" in name)

    print(f"machine: {describe_machine()}\n")
    print(f"| matrix product ({rows} rows, {hidden}x{inner} and {inner}x{hidden}) | Gop/s |")
    print("|---|---:|")
    for name, value in rates.items():
        print(f"| {name} | {value / 1e9:.1f} |")
    print(f"\n{args.samples} x {args.seq_len} calibration tokens, {config['num_hidden_layers']} layers:")
    print(f"- one forward pass: linear layers {linear / 1e12:.1f} TFLOP, attention {attention / 1e12:.1f} TFLOP")
    print(f"- Hessians (upper half): {hessians / 1e12:.1f} TFLOP")
    floor_float = (linear + attention + hessians) / best_float
    floor_int8 = (linear + hessians) / best_int8 + attention / best_float
    print(f"- floor, everything at the best float32 rate ({best_float / 1e9:.0f} GFLOP/s): {floor_float:.0f} s")
    print(
        f"- floor, linear layers and Hessians at the best int8 rate ({best_int8 / 1e9:.0f} Gop/s), "
        f"attention in float32: {floor_int8:.0f} s"
    )
    print("  (one forward pass; the reference GPTQ runs each layer twice, and the column solve comes on top)")


if __name__ == "__main__":
    main()
