"""A reproducer small enough to report upstream: onnxruntime's CPU GroupQueryAttention against its arithmetic.

Run: python benchmarks/repro_gqa.py [--threads 2] [--repeats 200]

Needs only numpy, onnx, onnxruntime and torch (for the comparison). One GroupQueryAttention node as
SmolLM2-135M's layers run it (the demo model: 9 query heads, 3 KV heads, head size 64, packed QKV input,
rotary inside the node, the KV cache shared between past and present as onnxruntime-genai binds it), for a
decode step at depths 512 and 2048 and a 512-token prefill. Beside each, the same attention in torch
(``scaled_dot_product_attention`` with ``enable_gqa`` on the cache, rotary not included): another
library's kernel on this machine with the same threads. A decode step of the model runs 30 of these nodes.
The last column runs the same node in float16 (cache, activations and arithmetic): the "fp16 KV cache"
lever, which onnxruntime's CPU kernel would need to be faster than float32 to pay.
"""

from __future__ import annotations

import argparse

import numpy as np
from machine import describe_machine
from repro_matmulnbits import cpu_session, median_seconds

HEADS, KV_HEADS, HEAD_SIZE, MAX_LENGTH = 9, 3, 64, 4096
CASES = {"decode at depth 512": (1, 512), "decode at depth 2048": (1, 2048), "prefill 512": (512, 0)}


def session(threads: int, dtype: type = np.float32):  # type: ignore[no-untyped-def]
    """An onnxruntime session over one GroupQueryAttention node with a packed QKV input and rotary, in
    ``dtype`` (float16: the KV cache, the activations and the node's arithmetic in half precision)."""
    from onnx import TensorProto, helper, numpy_helper

    element = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT

    hidden = (HEADS + 2 * KV_HEADS) * HEAD_SIZE
    inv = 1.0 / (10000 ** (np.arange(0, HEAD_SIZE, 2, dtype=np.float32) / HEAD_SIZE))
    angles = np.outer(np.arange(MAX_LENGTH, dtype=np.float32), inv)
    node = helper.make_node(
        "GroupQueryAttention",
        ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total_sequence_length", "cos_cache", "sin_cache"],
        ["output", "present_key", "present_value"],
        domain="com.microsoft", num_heads=HEADS, kv_num_heads=KV_HEADS, scale=HEAD_SIZE**-0.5,
        do_rotary=1, rotary_interleaved=0,
    )  # fmt: skip
    cache = ["batch", KV_HEADS, "length", HEAD_SIZE]
    graph = helper.make_graph(
        [node], "repro_gqa",
        [helper.make_tensor_value_info("qkv", element, [1, "sequence", hidden]),
         helper.make_tensor_value_info("past_key", element, cache),
         helper.make_tensor_value_info("past_value", element, cache),
         helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
         helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])],
        [helper.make_tensor_value_info("output", element, [1, "sequence", HEADS * HEAD_SIZE]),
         helper.make_tensor_value_info("present_key", element, cache),
         helper.make_tensor_value_info("present_value", element, cache)],
        [numpy_helper.from_array(np.cos(angles).astype(dtype), "cos_cache"),
         numpy_helper.from_array(np.sin(angles).astype(dtype), "sin_cache")],
    )  # fmt: skip
    return cpu_session(graph, threads)


def time_gqa(sess, sequence: int, depth: int, repeats: int, dtype: type = np.float32) -> float:  # type: ignore[no-untyped-def]
    """Median seconds of one node call, the cache bound as the same buffer for past and present."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((1, sequence, (HEADS + 2 * KV_HEADS) * HEAD_SIZE)).astype(dtype)
    cache = (1, KV_HEADS, MAX_LENGTH, HEAD_SIZE)
    key = ort.OrtValue.ortvalue_from_numpy(rng.standard_normal(cache).astype(dtype))
    value = ort.OrtValue.ortvalue_from_numpy(rng.standard_normal(cache).astype(dtype))
    binding = sess.io_binding()
    binding.bind_cpu_input("qkv", qkv)
    binding.bind_ortvalue_input("past_key", key)
    binding.bind_ortvalue_input("past_value", value)
    binding.bind_cpu_input("seqlens_k", np.array([depth + sequence - 1], np.int32))
    binding.bind_cpu_input("total_sequence_length", np.array(depth + sequence, np.int32))
    binding.bind_output("output")
    binding.bind_ortvalue_output("present_key", key)
    binding.bind_ortvalue_output("present_value", value)
    return median_seconds(lambda: sess.run_with_iobinding(binding), repeats)


def time_torch(sequence: int, depth: int, repeats: int) -> float:
    """Median seconds of the same attention in torch (causal; each KV head serves its group of query heads)."""
    import torch

    rng = torch.Generator().manual_seed(0)
    total = depth + sequence
    q = torch.randn(1, HEADS, sequence, HEAD_SIZE, generator=rng)
    k = torch.randn(1, KV_HEADS, total, HEAD_SIZE, generator=rng)
    v = torch.randn(1, KV_HEADS, total, HEAD_SIZE, generator=rng)
    causal = None
    if sequence > 1:  # the prompt's rows see the cache and the rows before them
        causal = torch.ones(sequence, total, dtype=torch.bool).tril(depth)
    with torch.inference_mode():
        return median_seconds(
            lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal, enable_gqa=True),
            repeats,
        )


def main() -> None:
    """Time every case in onnxruntime and torch; print a markdown table."""
    import torch

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sess, half = session(args.threads), session(args.threads, np.float16)
    print(f"machine: {describe_machine()}")
    print(f"GroupQueryAttention, {HEADS} heads / {KV_HEADS} KV heads x {HEAD_SIZE}, {args.threads} threads\n")
    print("| case | onnxruntime GQA (us) | torch SDPA (us) | ratio | x 30 layers, GQA (ms) | GQA in float16 (us) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (sequence, depth) in CASES.items():
        repeats = max(5, args.repeats // (50 if sequence > 1 else 1))
        ours, theirs = time_gqa(sess, sequence, depth, repeats), time_torch(sequence, depth, repeats)
        fp16 = time_gqa(half, sequence, depth, repeats, np.float16)
        print(
            f"| {name} | {ours * 1e6:.0f} | {theirs * 1e6:.0f} | {ours / theirs:.2f}x | {ours * 30e3:.2f} "
            f"| {fp16 * 1e6:.0f} ({fp16 / ours:.2f}x the time) |"
        )


if __name__ == "__main__":
    main()
