"""Time and peak memory of a streamed build's evaluation reference: the checkpoint run layer by layer.

Run: python benchmarks/bench_streamed_eval.py CHECKPOINT [--windows 2] [--ctx 512] [--batch-windows 4]

CHECKPOINT is a Hugging Face folder (``bench_scale.py --keep`` makes random-weight ones of published
shapes). The built-in evaluation text is tokenized with the folder's tokenizer and cut into windows as
``edgekit eval`` does; then the two phases of the streamed reference are timed, each with the process's
peak RSS (VmHWM) after it: every decoder layer over every window (``final_hidden_states``), and for each
window the LM-head logits from the head's row blocks and their log-softmax over the whole vocabulary
(what the scoring loop computes per window).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from machine import describe_machine
from tokenizers import Tokenizer

from edgekit.accuracy.metrics import log_softmax
from edgekit.accuracy.streamed_reference import StreamedModel
from edgekit.accuracy.texts import builtin_corpus, token_windows


def peak_rss_gib() -> float:
    """This process's peak RSS so far (VmHWM), in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024**2
    return float("nan")


def main() -> None:
    """Run the benchmark from the command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--batch-windows", type=int, default=4)
    args = parser.parse_args()
    print(describe_machine())
    tokenizer = Tokenizer.from_file(str(args.checkpoint / "tokenizer.json"))
    text = builtin_corpus("evaluation").text
    ids = np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)
    windows = token_windows(ids, args.ctx, args.windows)
    started = time.perf_counter()
    model = StreamedModel(args.checkpoint)
    hidden = model.final_hidden_states(windows, args.ctx // 2, args.ctx - 1, batch_windows=args.batch_windows)
    layers_s = time.perf_counter() - started
    print(f"{len(model.layers)} layers over {len(windows)} x {args.ctx} tokens: {layers_s:.1f} s, "
          f"peak RSS {peak_rss_gib():.2f} GiB")  # fmt: skip
    started = time.perf_counter()
    for index in range(len(windows)):
        log_softmax(model.head_logits(hidden[index]))
    head_s = time.perf_counter() - started
    print(f"LM head + log-softmax, {len(windows)} windows: {head_s:.1f} s, peak RSS {peak_rss_gib():.2f} GiB")


if __name__ == "__main__":
    main()
