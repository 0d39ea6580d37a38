"""Build the demo model (SmolLM2-135M-Instruct GGUF) and print seconds and peak RSS per step.

Run: python benchmarks/bench_build.py [--out DIR] [--target laptop-cpu]

Peak RSS is sampled every 50 ms during each step; all steps run in one process, so a step's peak
includes what earlier steps left loaded (torch, transformers).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from machine import describe_machine

from edgekit.demo import demo_gguf_path
from edgekit.pipeline import build


def main() -> None:
    """Run the benchmark and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, help="package folder (default: a temporary one)")
    parser.add_argument("--target", default="laptop-cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "pkg"
        start = time.perf_counter()
        result = build(demo_gguf_path(), out, args.target, force=True, progress=False)
        total = time.perf_counter() - start
    print(f"machine: {describe_machine()}")
    print(f"target: {args.target}; total {total:.1f} s\n")
    print("| step | seconds | peak RSS (MiB) |")
    print("|---|---:|---:|")
    for record in result.steps:
        print(f"| {record.name} | {record.seconds:.1f} | {record.peak_rss_mb:,.0f} |")
    print("\n| variant | bytes |")
    print("|---|---:|")
    for name, entry in result.manifest["variants"].items():
        print(f"| {name} | {entry['bytes']:,} |")


if __name__ == "__main__":
    main()
