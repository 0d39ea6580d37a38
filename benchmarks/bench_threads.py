"""Decode speed under onnxruntime thread settings, compared in one process so the machine's drift hits all alike.

Run: python benchmarks/bench_threads.py PACKAGE [--variant int4-rtn] [--rounds 5] [--prompt-tokens 512]

Loads the variant once per configuration (onnxruntime's defaults; ``intra_op_num_threads`` set to the
physical core count; that plus ``inter_op_num_threads=1``, which is what ``edgekit.load`` uses), then for
each round runs every configuration in a shuffled order: a random prompt, then 64 greedy tokens, timed
after the first. Prints the median and every round's decode tokens/s.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import numpy as np
from machine import describe_machine

from edgekit.package.manifest import read_manifest
from edgekit.package.verify import variant_dir
from edgekit.runtimes.cpu_threads import physical_cores


def main() -> None:
    """Run the benchmark from the command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", type=Path)
    parser.add_argument("--variant", default=None, help="variant folder (default: the package's default)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--gen-tokens", type=int, default=64)
    args = parser.parse_args()

    import onnxruntime_genai as og

    name, folder = variant_dir(args.package, read_manifest(args.package), args.variant)
    cores = physical_cores()
    configs = {
        "onnxruntime defaults": {},
        f"intra_op_num_threads={cores}": {"intra_op_num_threads": cores},
        f"intra_op_num_threads={cores}, inter_op_num_threads=1 (edgekit)": {
            "intra_op_num_threads": cores,
            "inter_op_num_threads": 1,
        },
    }
    models = {}
    for label, session in configs.items():
        config = og.Config(str(folder))
        config.clear_providers()
        if session:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
        models[label] = og.Model(config)
    prompt = np.random.default_rng(0).integers(100, 30000, size=args.prompt_tokens).tolist()

    def decode_speed(model: og.Model, tokens: int) -> float:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=args.prompt_tokens + tokens, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(prompt)
        generator.generate_next_token()
        started = time.perf_counter()
        for _ in range(tokens - 1):
            generator.generate_next_token()
        return (tokens - 1) / (time.perf_counter() - started)

    for model in models.values():
        decode_speed(model, 8)  # warm-up: allocations, prepacking
    speeds: dict[str, list[float]] = {label: [] for label in models}
    for round_index in range(args.rounds):
        order = list(models.items())
        random.Random(round_index).shuffle(order)
        for label, model in order:
            speeds[label].append(decode_speed(model, args.gen_tokens))
    print(f"machine: {describe_machine()}; {args.package} {name}, decode after {args.prompt_tokens} tokens\n")
    print("| threads | decode tok/s (median) | every round |\n|---|---:|---|")
    for label, values in speeds.items():
        rounds = " ".join(f"{v:.0f}" for v in values)
        print(f"| {label} | {statistics.median(values):.1f} | {rounds} |")


if __name__ == "__main__":
    main()
