"""A reproducer small enough to report upstream: onnxruntime's MatMulNBits per shape, compute type and phase.

Run: python benchmarks/repro_matmulnbits.py [--threads 2] [--repeats 200]

Needs only numpy, onnx and onnxruntime. One MatMulNBits node per shape of SmolLM2-135M's linears (the demo
model; K x N = 576 x 576, 576 x 192, 576 x 1536, 1536 x 576, and the 576 x 49152 head), 4-bit, one row of
activations (a decode step) and 512 rows (a prefill), block 32 and 128, accuracy level 0 (fp32 compute)
and 4 (int8 compute), fp32 scales, no zero points: the graphs edgekit's CPU variants run. For one row the
kernel must stream its packed weights once, so the table gives the bytes it reads per call over the
median time, beside this machine's copy bandwidth (one thread, 256 MB). The small matrices stay in the
caches between calls, so their rows show the kernel's compute more than memory; the head (tens of MB)
streams. For 512 rows it gives GFLOP/s, where int8 compute (level 4) is expected to beat fp32 compute
(level 0).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

SHAPES = {"q/o proj": (576, 576), "k/v proj": (576, 192), "gate/up": (576, 1536), "down": (1536, 576),
          "lm head": (576, 49152)}  # fmt: skip


def session(k: int, n: int, block: int, level: int, threads: int):  # type: ignore[no-untyped-def]
    """An onnxruntime session over one MatMulNBits node [M, k] x [k, n] with random 4-bit weights."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    blocks = (k + block - 1) // block
    packed = rng.integers(0, 256, (n, blocks, block // 2), dtype=np.uint8)
    scales = (rng.random(n * blocks, dtype=np.float32) * 0.02).astype(np.float32)
    node = helper.make_node(
        "MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft",
        K=k, N=n, bits=4, block_size=block, accuracy_level=level,
    )  # fmt: skip
    graph = helper.make_graph(
        [node], "repro",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
        [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "S")],
    )  # fmt: skip
    return cpu_session(graph, threads)


def cpu_session(graph, threads: int):  # type: ignore[no-untyped-def]
    """An onnxruntime CPU session over ``graph`` (opset 17 and com.microsoft), ``threads`` intra-op threads."""
    import onnxruntime as ort
    from onnx import helper

    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def median_seconds(run, repeats: int) -> float:  # type: ignore[no-untyped-def]
    """Median wall time of ``run`` over ``repeats`` calls, after five warm-up calls."""
    for _ in range(5):
        run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def copy_gbps(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """This machine's streaming bandwidth: bytes copied per second by one thread over ``nbytes`` (far beyond
    any cache), best of ``repeats``."""
    source, target = np.ones(nbytes, dtype=np.uint8), np.zeros(nbytes, dtype=np.uint8)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - started)
    return nbytes / best / 1e9


def main() -> None:
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    from pathlib import Path

    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "?")
    print(f"onnxruntime {ort.__version__}, {cpu}, {args.threads} threads\n")
    print(f"copy bandwidth, one thread: {copy_gbps():.1f} GB/s\n")
    columns = ("shape (K x N)", "block", "accuracy level", "weight MB", "1 row: ms", "1 row: GB/s", "512 rows: GFLOP/s")
    print("| " + " | ".join(columns) + " |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(1)
    for name, (k, n) in SHAPES.items():
        for block in (32, 128):
            weight_bytes = n * k // 2 + n * ((k + block - 1) // block) * 4
            for level in (0, 4):
                sess = session(k, n, block, level, args.threads)
                one = {"A": rng.standard_normal((1, k)).astype(np.float32)}
                many = {"A": rng.standard_normal((512, k)).astype(np.float32)}
                t1 = median_seconds(lambda s=sess, f=one: s.run(None, f), args.repeats)
                t512 = median_seconds(lambda s=sess, f=many: s.run(None, f), max(5, args.repeats // 20))
                print(
                    f"| {name} ({k} x {n}) | {block} | {level} | {weight_bytes / 1e6:.2f} | {t1 * 1e3:.3f} | "
                    f"{weight_bytes / t1 / 1e9:.1f} | {2 * 512 * k * n / t512 / 1e9:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
