"""How long GPTQ takes on a real checkpoint, and how much memory it peaks at.

    python benchmarks/bench_gptq_speed.py HF_FOLDER TEXT.txt [--samples 128] [--seq-len 512] [--one-pass]

Loads the checkpoint in float32 (sdpa attention), tokenizes the text, draws ``--samples`` random windows
of ``--seq-len`` tokens with a seeded numpy Generator, runs GPTQ as ``edgekit build`` does
(``write_gptq_checkpoint``: load in float32, quantize layer by layer, pack, write the GPTQ checkpoint) and
prints the wall time, the time per phase and the peak resident memory beside the float32 weights' size
and edgekit's estimate of GPTQ's peak. ``--one-pass`` runs GPTQ's one-pass schedule (``gptq: {one_pass:
true}`` in a target) instead of the default two passes per layer.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe_machine


def main() -> None:
    """Run the benchmark from the command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("text", type=Path)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--one-pass", action="store_true", help="GPTQ's one-pass schedule")
    args = parser.parse_args()

    import torch
    import transformers

    from edgekit.exporters.memory_estimate import estimate_build
    from edgekit.progress import current_rss_mb
    from edgekit.quant.gptq import GPTQConfig
    from edgekit.quant.gptq_checkpoint import write_gptq_checkpoint
    from edgekit.sources.weight_files import parameter_count

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(args.checkpoint))
    ids = np.asarray(tokenizer(args.text.read_text(encoding="utf-8"))["input_ids"], dtype=np.int64)
    starts = np.random.default_rng(args.seed).integers(0, len(ids) - args.seq_len, size=args.samples)
    calibration = torch.from_numpy(np.stack([ids[s : s + args.seq_len] for s in starts]))
    timings: dict[str, float] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        write_gptq_checkpoint(
            args.checkpoint,
            Path(scratch) / "gptq",
            GPTQConfig(bits=args.bits, group_size=args.group_size, one_pass=args.one_pass),
            calibration,
            progress=lambda line: print(
                f"  {time.perf_counter() - started:7.1f}s {current_rss_mb():7.0f} MiB {line}", flush=True
            ),
            timings=timings,
        )
    wall = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(describe_machine())
    files = sorted(args.checkpoint.glob("*.safetensors"))
    fp32_mib = 4 * parameter_count(files) / 2**20
    tokens = args.samples * args.seq_len
    estimate = estimate_build(
        files, [], streaming=True, tied=True, calibration_tokens=tokens, gptq_one_pass=args.one_pass
    ).peak_memory
    schedule = "one pass" if args.one_pass else "two passes"
    print(f"{args.samples} x {args.seq_len} calibration tokens, group size {args.group_size}, {schedule} per layer")
    print(f"GPTQ wall time {wall:.1f} s (load, quantize, pack, write)")
    print(f"peak RSS {peak_mib:,.0f} MiB = {peak_mib / fp32_mib:.2f}x the float32 weights ({fp32_mib:,.0f} MiB)")
    print(f"edgekit's estimate of GPTQ's peak {estimate / 2**20:,.0f} MiB")
    for phase, seconds in timings.items():
        print(f"  {phase:16s} {seconds:7.1f} s")


if __name__ == "__main__":
    main()
