"""Decode speed of two variants of one package, measured in alternation so machine noise hits both alike.

    python benchmarks/bench_decode_parity.py PACKAGE [--variants int4-rtn int4-gptq] [--rounds 10]

A shared machine drifts by 15-25% between invocations, more than the difference worth finding between
two variants. So each round times every variant once (`edgekit bench` protocol: one warm-up, then one
run of a 512-token prompt and 128 generated tokens), the rounds alternate the order, and the table gives
each variant's median decode tokens/s over the rounds and its ratio to the first variant's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe_machine

from edgekit.runtimes.bench import BenchSettings, bench_variant


def main() -> None:
    """Run the benchmark from the command line and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", type=Path)
    parser.add_argument("--variants", nargs="+", default=["int4-rtn", "int4-gptq"])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    settings = BenchSettings(runs=1)
    decode: dict[str, list[float]] = {name: [] for name in args.variants}
    for round_index in range(args.rounds):
        order = args.variants if round_index % 2 == 0 else list(reversed(args.variants))
        for name in order:
            decode[name].append(bench_variant(args.package, name, settings)["decode_tps"]["median"])
    print(f"machine: {describe_machine()}")
    print(f"{args.rounds} alternating rounds, 512-token prompt, 128 generated\n")
    print("| variant | decode tok/s (median) | min - max | ratio to the first |")
    print("|---|---:|---:|---:|")
    first = statistics.median(decode[args.variants[0]])
    for name, values in decode.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.1f} | {min(values):.1f} - {max(values):.1f} | {median / first:.3f} |")


if __name__ == "__main__":
    main()
