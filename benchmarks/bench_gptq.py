"""GPTQ against RTN on the demo model: build time, peak memory, accuracy and decode speed.

Run: python benchmarks/bench_gptq.py [--samples 128] [--seq-len 512] [--calibration FILE|builtin]
          [--lm-head int4|int8|float] [--one-pass] [--text FILE] [--runs 3]

Builds SmolLM2-135M-Instruct for a laptop-cpu profile that makes both INT4 variants (block 32, int8
compute, `--lm-head` head), calibrating GPTQ on WikiText-2 validation (128 samples of 512 tokens by default),
then scores every variant on WikiText-2 test with `edgekit eval`'s protocol (20 windows of 512) and
times decoding with `edgekit bench` (512-token prompt, 128 generated, 3 runs). `--one-pass` gives the
target `gptq: {one_pass: true}` (GPTQ's one-pass schedule).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from machine import describe_machine

from edgekit.accuracy.evaluate import evaluate_package
from edgekit.accuracy.texts import builtin_corpus, load_text
from edgekit.demo import demo_gguf_path
from edgekit.pipeline import CalibrationSettings, build
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
    lm_head: {head}
    gptq: {{one_pass: {one_pass}}}
"""


def main() -> None:
    """Run the benchmark and print markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument(
        "--calibration", default=str(DATA / "wikitext2-valid.txt"), help="text file, or 'builtin' (the built-in corpus)"
    )
    parser.add_argument("--lm-head", default="int4", choices=["int4", "int8", "float"], help="LM head precision")
    parser.add_argument("--runs", type=int, default=3, help="edgekit bench runs per variant (0: no speed bench)")
    parser.add_argument("--one-pass", action="store_true", help="GPTQ's one-pass schedule")
    parser.add_argument("--text", type=Path, default=DATA / "wikitext2-test.txt")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        targets = Path(tmp) / "targets.yaml"
        targets.write_text(TARGETS.format(head=args.lm_head, one_pass=str(args.one_pass).lower()))
        package = Path(tmp) / "pkg"
        corpus = builtin_corpus("calibration") if args.calibration == "builtin" else load_text(args.calibration)
        calibration = CalibrationSettings(corpus, args.samples, args.seq_len, 0)
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
        speed = (
            {
                row["variant"]: row
                for row in bench_package(
                    package, variants=["int4-rtn", "int4-gptq"], settings=BenchSettings(runs=args.runs)
                )
            }
            if args.runs
            else {}
        )
    print(f"machine: {describe_machine()}")
    print(
        f"calibration: {Path(args.calibration).name}, {args.samples} x {args.seq_len} tokens; LM head {args.lm_head}; "
        f"{'one pass' if args.one_pass else 'two passes'} per layer\n"
    )
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
