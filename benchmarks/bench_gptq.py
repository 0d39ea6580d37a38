"""GPTQ against RTN on the demo model: build time, peak memory, accuracy and decode speed.

Run: python benchmarks/bench_gptq.py [--samples 128] [--seq-len 512] [--calibration FILE] [--text FILE]

Builds SmolLM2-135M-Instruct for a laptop-cpu profile that makes both INT4 variants (block 32, int4 LM
head, int8 compute), calibrating GPTQ on WikiText-2 validation (128 samples of 512 tokens by default),
then scores every variant on WikiText-2 test with `edgekit eval`'s protocol (20 windows of 512) and
times decoding with `edgekit bench` (512-token prompt, 128 generated, 3 runs).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from machine import describe_machine

from edgekit.demo import demo_gguf_path
from edgekit.pipeline import CalibrationSettings, build
from edgekit.quant.corpus import load_text
from edgekit.quant.evaluate import evaluate_package
from edgekit.runtimes.bench import BenchSettings, bench_package

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TARGETS = """
schema_version: 1
targets:
  laptop-cpu-gptq:
    description: laptop-cpu with GPTQ beside RTN
    providers: [cpu]
    precision: int4
    block_size: 32
    accuracy_level: 4
    int4_methods: [rtn, gptq]
"""


def main() -> None:
    """Run the benchmark and print markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--calibration", type=Path, default=DATA / "wikitext2-valid.txt")
    parser.add_argument("--text", type=Path, default=DATA / "wikitext2-test.txt")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        targets = Path(tmp) / "targets.yaml"
        targets.write_text(TARGETS)
        package = Path(tmp) / "pkg"
        calibration = CalibrationSettings(load_text(args.calibration), args.samples, args.seq_len, 0)
        result = build(
            demo_gguf_path(),
            package,
            "laptop-cpu-gptq",
            targets_file=targets,
            progress=False,
            evaluation=None,
            calibration=calibration,
        )
        report = evaluate_package(package, corpus=load_text(args.text))
        speed = {
            row["variant"]: row
            for row in bench_package(package, variants=["int4-rtn", "int4-gptq"], settings=BenchSettings(runs=3))
        }
    print(f"machine: {describe_machine()}")
    print(f"calibration: {args.calibration.name}, {args.samples} x {args.seq_len} tokens\n")
    print("| step | seconds | peak RSS (MiB) |\n|---|---:|---:|")
    for record in result.steps:
        print(f"| {record.name} | {record.seconds:.1f} | {record.peak_rss_mb:,.0f} |")
    print("\n| variant | size | mean KL | top-1 agreement | PPL ratio | decode tok/s (median) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, row in report["variants"].items():
        decode = speed.get(name, {}).get("decode_tps")
        decode_text = f"{decode['median']:.1f}" if decode else "-"
        print(
            f"| {name} | {row['bytes'] / 1e6:.1f} MB | {row['kl_mean']:.3f} | {row['top1_agreement']:.1%} | "
            f"{row['ppl_ratio']:.2f} | {decode_text} |"
        )


if __name__ == "__main__":
    main()
