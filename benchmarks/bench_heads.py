"""LM head precision on the demo model: package size and accuracy with an int4, int8 or float head.

Run: python benchmarks/bench_heads.py [--methods rtn] [--text FILE] [--calibration FILE]

Builds SmolLM2-135M-Instruct three times (int4 body, block 32, int8 compute), once per `lm_head` value,
making the INT4 variants of `--methods` (rtn, gptq or both; GPTQ calibrates on `--calibration`, by
default the built-in corpus, 128 x 512), and scores each on `--text` (default WikiText-2 test) with
`edgekit eval`'s protocol (20 windows of 512 tokens).
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

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HEADS = ("int4", "int8", "float")


def _targets(methods: str) -> str:
    text = "schema_version: 1\ntargets:\n"
    for head in HEADS:
        text += (
            f"  head-{head}:\n    description: {head} LM head\n    providers: [cpu]\n    precision: int4\n"
            f"    block_size: 32\n    accuracy_level: 4\n    int4_methods: [{methods}]\n    lm_head: {head}\n"
        )
    return text


def main() -> None:
    """Run the benchmark and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="rtn", help="comma-separated INT4 methods: rtn, gptq")
    parser.add_argument("--text", type=Path, default=DATA / "wikitext2-test.txt")
    parser.add_argument("--calibration", type=Path, help="GPTQ calibration text (default: built-in corpus)")
    args = parser.parse_args()
    corpus = load_text(args.calibration) if args.calibration else builtin_corpus("calibration")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        targets = Path(tmp) / "targets.yaml"
        targets.write_text(_targets(", ".join(args.methods.split(","))))
        for head in HEADS:
            package = Path(tmp) / head
            build(
                demo_gguf_path(),
                package,
                f"head-{head}",
                targets_file=targets,
                progress=False,
                evaluation=None,
                calibration=CalibrationSettings(corpus),
            )
            report = evaluate_package(package, corpus=load_text(args.text))
            for name, row in report["variants"].items():
                if name != "fp32":
                    rows.append((head, name, row))
    print(f"machine: {describe_machine()}; text: {args.text.name}, 20 x 512\n")
    print("| LM head | variant | size | mean KL | top-1 agreement | PPL ratio |\n|---|---|---:|---:|---:|---:|")
    for head, name, row in rows:
        print(
            f"| {head} | {name} | {row['bytes'] / 1e6:.1f} MB | {row['kl_mean']:.3f} | "
            f"{row['top1_agreement']:.1%} | {row['ppl_ratio']:.2f} |"
        )


if __name__ == "__main__":
    main()
