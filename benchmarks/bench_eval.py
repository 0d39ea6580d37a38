"""Accuracy of every variant of the demo model, beside llama.cpp's and onnxruntime-genai's figures.

Run: python benchmarks/bench_eval.py [--package DIR] [--text ../shared/data/wikitext2-test.txt]

Builds the demo model (SmolLM2-135M-Instruct) unless --package names a built one, then scores every
variant with `edgekit eval`'s protocol (20 windows of 512 tokens, second half scored) and prints the
table plus each variant's evaluation speed. The reference rows for llama.cpp and onnxruntime-genai's
default int4 package were measured on this machine with this exact protocol and text (see the issue
that introduced the accuracy gate); they are quoted, not rerun.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from machine import describe_machine

from edgekit.accuracy.evaluate import evaluate_package
from edgekit.accuracy.report import format_metric
from edgekit.accuracy.texts import load_text
from edgekit.demo import demo_gguf_path

QUOTED = [
    ("llama.cpp Q4_0 (quoted)", 91.7e6, 0.264, 0.717, 1.18),
    ("llama.cpp Q4_K_M (quoted)", 105.5e6, 0.051, 0.862, 1.04),
    ("onnxruntime-genai default int4 (quoted)", 86.3e6, 0.369, 0.642, None),
]
DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2-test.txt"


def main() -> None:
    """Run the benchmark and print markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--package", type=Path, help="a package built from the demo model")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--ctx", type=int, default=512)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        package = args.package
        if package is None:
            from edgekit.pipeline import build

            package = Path(tmp) / "pkg"
            build(demo_gguf_path(), package, "laptop-cpu-rtn", progress=False, evaluation=None)
        start = time.perf_counter()
        report = evaluate_package(package, corpus=load_text(args.text), windows=args.windows, ctx=args.ctx)
        total = time.perf_counter() - start
    protocol = report["protocol"]
    print(f"machine: {describe_machine()}")
    print(
        f"text: {args.text.name}, {protocol['windows']} windows x {protocol['ctx']}, {protocol['tokens_scored']} scored"
    )
    print(f"evaluation wall time {total:.1f} s (reference cache: {report['reference_cache']})\n")
    print("| variant | size | mean KL | top-1 agreement | PPL ratio | PPL | eval tokens/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, row in report["variants"].items():
        print(
            f"| edgekit {name} | {format_metric('bytes', row['bytes'])} | {row['kl_mean']:.3f} | "
            f"{row['top1_agreement']:.1%} | {row['ppl_ratio']:.2f} | {row['perplexity']:.2f} | "
            f"{row['eval_tokens_per_second'] or '-'} |"
        )
    for name, size, kl, top1, ratio in QUOTED:
        ratio_text = "-" if ratio is None else f"{ratio:.2f}"
        print(f"| {name} | {size / 1e6:.1f} MB | {kl:.3f} | {top1:.1%} | {ratio_text} | - | - |")


if __name__ == "__main__":
    main()
