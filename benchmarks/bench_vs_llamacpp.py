"""edgekit against llama.cpp on the same CPU, side by side: decode at depth and prefill, interleaved rounds.

Run: python benchmarks/bench_vs_llamacpp.py PACKAGE MODEL.gguf --llamacpp BIN_DIR [--rounds 5] [--threads 2]
     [--variant NAME] [--depths 0,512,2048] [--prompts 128,512,2048] [--gen 128] [--prefill-chunk N]
     [--profile]

``BIN_DIR`` holds ``llama-bench`` (``../shared/tools/build-llamacpp.sh`` builds it from the llama-cpp-python
sdist with the instruction sets this CPU reports). Every round runs each measurement once for edgekit (the
package loaded once, in this process) and once for llama.cpp (``llama-bench -r 1``, a child process), in
alternating order, so both see the same machine state; the table gives each side's median and the ratio.

- decode at depth D: edgekit appends D prompt tokens, generates ``--gen`` tokens, and counts the tokens
  after the first over their time (llama-bench's ``tg`` at ``-d D``);
- prefill of P tokens: P over the time to the first token (llama-bench's ``pp``); edgekit takes the prompt
  as its runtime does, in pieces of at most ``--prefill-chunk`` tokens (default: the runtime's default; 0:
  one pass).

``--profile`` adds onnxruntime's per-operator profile of one decode step at depth 0 and 512 and of one
512-token prefill in the same pieces (the package's decoder run alone, as ``onnxruntime.InferenceSession``),
by op type.
The machine's CPU model and the flags that matter are printed first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from edgekit.runtimes.cpu_threads import usable_cpus
from edgekit.runtimes.tuning import DEFAULT_PREFILL_CHUNK

FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8")


def machine() -> str:
    """The CPU model, core count and the instruction-set flags that matter for both runtimes."""
    info = Path("/proc/cpuinfo").read_text(encoding="utf-8") if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    present = [flag for flag in FLAGS if flag in flags]
    return f"{model}, {os.cpu_count()} logical CPUs, flags: {' '.join(present) or 'none of ' + ' '.join(FLAGS)}"


class Edgekit:
    """One edgekit package, loaded once; each call times one measurement."""

    def __init__(self, package: Path, variant: str | None, threads: int, chunk: int | None) -> None:
        import numpy as np

        from edgekit import load
        from edgekit.runtimes.tuning import RuntimeSettings

        self.model = load(package, variant=variant, settings=RuntimeSettings(threads=threads, prefill_chunk=chunk))
        self.rng = np.random.default_rng(0)
        self.vocab = min(30000, self.model.vocab_size)

    def _prompt(self, tokens: int) -> list[int]:
        return [int(t) for t in self.rng.integers(100, self.vocab, size=max(1, tokens))]

    def decode(self, depth: int, gen: int) -> float:
        """Tokens per second of ``gen`` generated tokens after ``depth`` of context (the first excluded)."""
        from edgekit.runtimes.generation import GenerationConfig

        stream = self.model.token_stream(self._prompt(depth), GenerationConfig(max_new_tokens=gen))
        next(stream)
        started = time.perf_counter()
        produced = sum(1 for _ in stream)
        return produced / (time.perf_counter() - started)

    def prefill(self, tokens: int) -> float:
        """Prompt tokens per second: ``tokens`` over the time to the first generated token."""
        from edgekit.runtimes.generation import GenerationConfig

        prompt = self._prompt(tokens)
        started = time.perf_counter()
        stream = self.model.token_stream(prompt, GenerationConfig(max_new_tokens=1))
        next(stream)
        return tokens / (time.perf_counter() - started)


class LlamaCpp:
    """llama-bench on one GGUF file; each call is one ``-r 1`` run in a child process."""

    def __init__(self, binaries: Path, gguf: Path, threads: int) -> None:
        self.binary, self.gguf, self.threads = binaries / "llama-bench", gguf, threads
        self.env = {**os.environ, "LD_LIBRARY_PATH": str(binaries)}

    def _run(self, *args: str) -> float:
        command = [str(self.binary), "-m", str(self.gguf), "-t", str(self.threads), "-r", "1", "-o", "json", *args]
        done = subprocess.run(command, capture_output=True, text=True, env=self.env, check=True)
        return float(json.loads(done.stdout)[0]["avg_ts"])

    def decode(self, depth: int, gen: int) -> float:
        """llama-bench's ``tg`` tokens/s at depth ``depth``."""
        return self._run("-p", "0", "-n", str(gen), "-d", str(depth))

    def prefill(self, tokens: int) -> float:
        """llama-bench's ``pp`` tokens/s."""
        return self._run("-p", str(tokens), "-n", "0")


def measure(edgekit: Edgekit, llamacpp: LlamaCpp, args: argparse.Namespace) -> list[tuple[str, float, float]]:
    """Median tokens/s of each measurement for both sides, over ``args.rounds`` alternating rounds."""
    cases = [(f"decode at depth {d}", "decode", (d, args.gen)) for d in args.depths]
    cases += [(f"prefill {p}", "prefill", (p,)) for p in args.prompts]
    samples: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name, _, _ in cases}
    for round_index in range(args.rounds):
        for name, kind, values in cases:
            sides = [(0, edgekit), (1, llamacpp)]
            for side, runner in sides if round_index % 2 == 0 else reversed(sides):
                samples[name][side].append(getattr(runner, kind)(*values))
        print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr)
    return [(name, statistics.median(ours), statistics.median(theirs)) for name, (ours, theirs) in samples.items()]


def profile(package: Path, variant: str | None, threads: int, chunk: int | None) -> list[str]:
    """Per-op-type milliseconds of one decode step at depth 0 and 512, and of a 512-token prefill in the
    runtime's pieces of at most ``chunk`` tokens (one pass where None)."""
    import numpy as np
    import onnxruntime as ort

    from edgekit.package.manifest import read_manifest
    from edgekit.package.verify import variant_dir

    _, folder = variant_dir(package, read_manifest(package), variant)
    config = json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))["model"]["decoder"]
    lines = []
    from edgekit.runtimes.model import prompt_pieces

    sizes = [len(piece) for piece in prompt_pieces(range(512), chunk)]
    prefill = [(sum(sizes[:i]), size) for i, size in enumerate(sizes)]
    for label, passes in (("decode, depth 0", [(0, 1)]), ("decode, depth 512", [(512, 1)]), ("prefill 512", prefill)):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.enable_profiling = True
        options.profile_file_prefix = f"/tmp/edgekit-profile-{label.replace(' ', '-').replace(',', '')}"
        session = ort.InferenceSession(str(folder / config["filename"]), options, providers=["CPUExecutionProvider"])
        feeds = [_feed(session, config, past, new, np) for past, new in passes]
        for _ in range(3):
            for feed in feeds:
                session.run(None, feed)
        path = session.end_profiling()
        totals: dict[str, float] = {}
        for event in json.loads(Path(path).read_text(encoding="utf-8")):
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                op = event.get("args", {}).get("op_name", "?")
                totals[op] = totals.get(op, 0.0) + event["dur"] / 1000 / 3
        Path(path).unlink(missing_ok=True)
        top = sorted(totals.items(), key=lambda item: -item[1])[:8]
        lines.append(f"{label}: " + ", ".join(f"{op} {ms:.2f} ms" for op, ms in top))
    return lines


def _feed(session: Any, config: dict[str, Any], past: int, new: int, np: Any) -> dict[str, Any]:
    feed: dict[str, Any] = {}
    for spec in session.get_inputs():
        if spec.name == "input_ids":
            feed[spec.name] = np.full((1, new), 200, dtype=np.int64)
        elif spec.name == "attention_mask":
            feed[spec.name] = np.ones((1, past + new), dtype=np.int64)
        elif spec.name == "position_ids":
            feed[spec.name] = np.arange(past, past + new, dtype=np.int64)[None, :]
        else:
            heads, size = int(config["num_key_value_heads"]), int(config["head_size"])
            feed[spec.name] = np.zeros((1, heads, past, size), dtype=np.float32)
    return feed


def main() -> None:
    """Measure and print the table (and the profile)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", type=Path)
    parser.add_argument("gguf", type=Path, help="the model as a GGUF file, for llama.cpp")
    parser.add_argument("--llamacpp", type=Path, required=True, help="folder with llama-bench")
    parser.add_argument("--variant", help="package variant (default: the deployed one)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=min(2, len(usable_cpus())), help="default: 2, or 1 on one CPU")
    parser.add_argument("--gen", type=int, default=128)
    parser.add_argument("--depths", type=lambda s: [int(x) for x in s.split(",")], default=[0, 512, 2048])
    parser.add_argument("--prompts", type=lambda s: [int(x) for x in s.split(",")], default=[128, 512, 2048])
    parser.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK, help="0: one pass")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    edgekit = Edgekit(args.package, args.variant, args.threads, args.prefill_chunk or None)
    llamacpp = LlamaCpp(args.llamacpp, args.gguf, args.threads)
    from edgekit.package.manifest import read_manifest

    variant = edgekit.model.info.variant
    package_bytes = read_manifest(args.package)["variants"][variant]["bytes"]
    rows = measure(edgekit, llamacpp, args)
    theirs = f"{args.gguf.name} ({args.gguf.stat().st_size / 1e6:.1f} MB)"
    chunk = edgekit.model.info.prefill_chunk
    pieces = f"prompt by {chunk}" if chunk else "prompt in one pass"
    print(f"edgekit {variant} ({package_bytes / 1e6:.1f} MB, {pieces}) vs llama.cpp {theirs}, {args.threads} threads, "
          f"medians of {args.rounds} rounds")  # fmt: skip
    print("| measurement | edgekit tok/s | llama.cpp tok/s | ratio |")
    print("|---|---:|---:|---:|")
    for name, ours, theirs in rows:
        print(f"| {name} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f}x |")
    if args.profile:
        for line in profile(args.package, args.variant, args.threads, chunk):
            print(line)


if __name__ == "__main__":
    main()
