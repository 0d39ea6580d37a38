"""Build random-weight checkpoints of real model shapes to INT4, streamed, and print time, memory and disk.

Run: python benchmarks/bench_scale.py [--sizes qwen3-1.7b,qwen3-4b,qwen3.5-9b] [--root /work/scale-ckpts]
     [--compare-whole] [--generate] [--keep] [--gptq SAMPLESxLEN | --recipe | --streamed-recipe]

For each size: a checkpoint is made from the published config values with transformers on the meta device
and random bf16 tensors written shard by shard (no download, bounded memory), then ``edgekit build
--streaming --no-eval`` runs in a child process for the ``laptop-cpu-rtn`` target (INT4, block 32, int8
compute) and the table gets its wall time, peak RSS (the child's VmHWM), the disk it used and the
package's bytes. ``--compare-whole`` also runs onnxruntime-genai's own whole-model builder on the same
checkpoint, with its peak RSS, and compares the two INT4 models' logits; ``--generate`` loads each package
with onnxruntime-genai and generates tokens. ``--gptq 16x256`` builds the ``laptop-cpu-gptq`` target
instead (GPTQ from disk one layer at a time on that many calibration tokens of the built-in corpus, then
both INT4 variants streamed); the peak RSS is then GPTQ's or the export's, whichever is higher.
``--recipe`` builds the default ``laptop-cpu`` whole (unless the memory check switches it to streaming),
as ``edgekit build CKPT -o OUT --no-eval`` does: the fp32 export, the RTN variant and the per-tensor recipe
searched on the built-in corpus; ``--streamed-recipe`` builds it streamed (the recipe searched on an fp32
export streamed to scratch space), and adds the peak of anonymous memory to the notes. Without either, the
streamed build is ``laptop-cpu-rtn``.

Where the configs come from: Qwen3-0.6B, Qwen3-1.7B and Qwen3-4B are the values of the published
config.json files of Qwen/Qwen3-0.6B, Qwen/Qwen3-1.7B and Qwen/Qwen3-4B; the 9B is transformers'
``Qwen3_5TextConfig`` defaults, which its docstring calls "the Qwen3.5-9B style configuration"
(``transformers/models/qwen3_5/configuration_qwen3_5.py``).
The 9B's vision tower is cut to one small block: the text export never reads it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARD_BYTES = 2 * 1024**3

_QWEN3_COMMON = dict(
    vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6, head_dim=128,
    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=3, hidden_act="silu",
)  # fmt: skip
SIZES: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": dict(_QWEN3_COMMON, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8),
    "qwen3-1.7b": dict(_QWEN3_COMMON, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8),
    "qwen3-4b": dict(_QWEN3_COMMON, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8),
    "qwen3.5-9b": {},  # Qwen3_5TextConfig's defaults
}  # fmt: skip


def make_config(size: str) -> Any:
    """The transformers config of ``size``."""
    import transformers

    if size.startswith("qwen3.5"):
        text = transformers.Qwen3_5TextConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3).to_dict()
        text["rope_parameters"] = {
            "rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
            "mrope_section": [11, 11, 10], "mrope_interleaved": True,
        }  # fmt: skip
        vision = dict(
            depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=text["hidden_size"],
            num_position_embeddings=64, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
        )  # fmt: skip
        config = transformers.Qwen3_5Config(
            text_config=text, vision_config=vision, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2
        )
        config.architectures = ["Qwen3_5ForConditionalGeneration"]
        return config
    config = transformers.Qwen3Config(**SIZES[size])
    config.architectures = ["Qwen3ForCausalLM"]
    return config


def write_checkpoint(size: str, folder: Path, seed: int = 0) -> int:
    """Write a random bf16 checkpoint of ``size`` shard by shard; return its parameter count."""
    import torch
    import transformers
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import tiny_tokenizer

    config = make_config(size)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = getattr(transformers, config.architectures[0])._from_config(config, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(seed)
    shard: dict[str, Any] = {}
    shard_bytes, weight_map, count, index = 0, {}, 0, 0
    names = [(n, p.shape) for n, p in model.named_parameters()]  # tied parameters appear once

    def flush() -> None:
        nonlocal shard, shard_bytes, index
        index += 1
        name = f"model-{index:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard, shard_bytes = {}, 0

    for name, shape in names:
        if len(shape) >= 2:  # filled in blocks of rows, so no fp32 copy of a whole embedding table exists
            tensor = torch.empty(shape, dtype=torch.bfloat16)
            step = max(1, 2**24 // max(1, math.prod(shape[1:])))
            for start in range(0, shape[0], step):
                block = tensor[start : start + step]
                block.copy_(torch.randn(block.shape, generator=generator) * 0.02)
        else:  # norms, biases, gates: near their usual initial values
            tensor = (1.0 + 0.02 * torch.randn(shape, generator=generator)).to(torch.bfloat16)
        nbytes = tensor.numel() * 2
        if shard and shard_bytes + nbytes > SHARD_BYTES:
            flush()
        shard[name] = tensor
        shard_bytes += nbytes
        count += tensor.numel()
    flush()
    total = {"metadata": {"total_size": count * 2}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(total, indent=2))
    config.save_pretrained(str(folder))
    tiny_tokenizer().save_pretrained(str(folder))
    return count


def run_child(code: str, *args: str) -> tuple[float, int, str]:
    """Run ``code`` in a fresh Python; return wall seconds, the child's peak RSS in bytes, and its output."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return wall, int(proc.stdout.strip().splitlines()[-1]), proc.stdout


# VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's RSS at the fork (Linux keeps it across exec).
_RSS = "print(int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) * 1024)"
_CHECKPOINT = (
    "import sys; from pathlib import Path; sys.path.insert(0, 'benchmarks'); from bench_scale import write_checkpoint; "
    "write_checkpoint(sys.argv[1], Path(sys.argv[2])); " + _RSS
)
_STREAMED = (
    "import sys; from edgekit.pipeline import build; "
    "build(sys.argv[1], sys.argv[2], 'laptop-cpu-rtn', force=True, progress=False, evaluation=None, streaming=True); "
    + _RSS
)
# The anonymous memory's peak, sampled: VmHWM also counts the file pages of the fp32 export's weights that
# the recipe search's onnxruntime session maps, which the kernel can drop and reread.
_ANON_SAMPLER = (
    "import threading, time; peak = [0]\n"
    "def sample():\n"
    "    while True:\n"
    "        line = next(l for l in open('/proc/self/status') if l.startswith('RssAnon:'))\n"
    "        peak[0] = max(peak[0], int(line.split()[1]) * 1024); time.sleep(0.2)\n"
    "threading.Thread(target=sample, daemon=True).start()\n"
)
_STREAMED_RECIPE = (
    _ANON_SAMPLER + "import sys; from edgekit.pipeline import build; "
    "build(sys.argv[1], sys.argv[2], 'laptop-cpu', force=True, progress=False, evaluation=None, streaming=True); "
    "print('anon', peak[0]); " + _RSS
)
_STREAMED_GPTQ = (
    "import sys; from edgekit.pipeline import CalibrationSettings, build; "
    "samples, length = (int(n) for n in sys.argv[3].split('x')); "
    "build(sys.argv[1], sys.argv[2], sys.argv[4], force=True, progress=False, evaluation=None, streaming=True, "
    "calibration=CalibrationSettings(samples=samples, seq_len=length), targets_file=sys.argv[5] or None); " + _RSS
)
_WHOLE_RECIPE = (
    "import sys; from edgekit.pipeline import build; "
    "build(sys.argv[1], sys.argv[2], 'laptop-cpu', force=True, progress=False, evaluation=None); " + _RSS
)
# laptop-cpu-gptq without the RTN variant beside it: half the export time and disk on a 9B model.
_GPTQ_ONLY = """schema_version: 1
targets:
  gptq-only:
    description: laptop-cpu-gptq's GPTQ variant alone
    providers: [cpu]
    precision: int4
    block_size: 32
    accuracy_level: 4
    lm_head: int8
    int4_methods: [gptq]
"""
_WHOLE = (
    "import sys; from pathlib import Path; from edgekit.sources.checkpoint import check_folder, stage_folder; "
    "from edgekit.exporters.onnx_builder import run_builder; out = Path(sys.argv[2]); out.mkdir(parents=True); "
    "staged = stage_folder(check_folder(Path(sys.argv[1])), out / 'staged'); log = out / 'build.log'; log.touch(); "
    "run_builder(staged, out / 'int4-rtn', precision='int4', provider='cpu', "
    "options={'block_size': '32', 'accuracy_level': '4'}, cache_dir=out / 'cache', log_path=log); " + _RSS
)
_GENERATE = (
    "import sys, time, onnxruntime_genai as og; model = og.Model(og.Config(sys.argv[1])); "
    "params = og.GeneratorParams(model); params.set_search_options(max_length=24, do_sample=False); "
    "gen = og.Generator(model, params); gen.append_tokens([[5, 17, 33, 100, 7, 9, 11, 12]]); "
    "t = time.perf_counter(); n = 0\n"
    "while not gen.is_done(): gen.generate_next_token(); n += 1\n"
    "rate = n / (time.perf_counter() - t); "
    "print('generated', n, 'tokens', [int(t) for t in gen.get_sequence(0)][8:], f'{rate:.2f} tok/s'); " + _RSS
)
_LOGITS = (
    "import sys, numpy as np; from pathlib import Path; from edgekit.exporters.validate import onnx_logits; "
    "ids = np.arange(5, 69, dtype=np.int64)[None]; a = onnx_logits(Path(sys.argv[1]), ids); "
    "b = onnx_logits(Path(sys.argv[2]), ids); "
    "top1 = float((a.argmax(-1) == b.argmax(-1)).mean()); "
    "print(f'max |diff| {float(np.abs(a - b).max()):.3g}, top-1 agreement {top1:.1%}, "
    "logits max |value| {float(np.abs(a).max()):.3g}'); " + _RSS
)


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder`` (links not followed)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def disk_free(path: Path) -> int:
    """Free bytes on the filesystem of ``path``."""
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def gib(n: float) -> str:
    """Bytes as GiB with two decimals."""
    return f"{n / 2**30:.2f}"


def main() -> None:
    """Run the benchmark and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(SIZES), help="comma-separated subset of " + ", ".join(SIZES))
    parser.add_argument("--root", type=Path, default=Path("/work/scale-ckpts"), help="where checkpoints go")
    parser.add_argument("--compare-whole", action="store_true", help="also run the whole-model builder, compare")
    parser.add_argument("--generate", action="store_true", help="load each package and generate tokens")
    parser.add_argument("--keep", action="store_true", help="keep checkpoints and packages")
    parser.add_argument("--gptq", metavar="SAMPLESxLEN", help="build laptop-cpu-gptq with this much calibration")
    parser.add_argument("--gptq-only", action="store_true", help="with --gptq: skip the RTN variant beside it")
    parser.add_argument("--recipe", action="store_true", help="build laptop-cpu whole, with its per-tensor recipe")
    parser.add_argument("--streamed-recipe", action="store_true", help="build laptop-cpu streamed, with its recipe")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from machine import describe_machine

    rows, notes, estimates = [], [], {}
    for size in args.sizes.split(","):
        checkpoint, package = args.root / size, args.root / f"{size}-pkg"
        if not (checkpoint / "model.safetensors.index.json").is_file():
            shutil.rmtree(checkpoint, ignore_errors=True)
            wall, rss, _ = run_child(_CHECKPOINT, size, str(checkpoint))
            notes.append(f"{size}: checkpoint written in {wall:.0f} s, peak RSS {gib(rss)} GiB")
        params = sum(math.prod(info.shape) for f in checkpoint.glob("*.safetensors") for info in _headers(f))
        tokens = math.prod(int(n) for n in args.gptq.split("x")) if args.gptq else 0
        estimates[size] = _estimates(checkpoint, tokens)
        free_before = disk_free(args.root)
        if args.gptq:
            targets_file = ""
            if args.gptq_only:
                targets_file = str(args.root / "gptq-only-targets.yaml")
                Path(targets_file).write_text(_GPTQ_ONLY)
            target = "gptq-only" if args.gptq_only else "laptop-cpu-gptq"
            wall, rss, _ = run_child(_STREAMED_GPTQ, str(checkpoint), str(package), args.gptq, target, targets_file)
            kind = f"GPTQ {args.gptq} + streamed" + (" (GPTQ variant only)" if args.gptq_only else "")
        elif args.recipe:
            wall, rss, _ = run_child(_WHOLE_RECIPE, str(checkpoint), str(package))
            kind = "whole + recipe (laptop-cpu)"
        elif args.streamed_recipe:
            wall, rss, text = run_child(_STREAMED_RECIPE, str(checkpoint), str(package))
            kind = "streamed + recipe (laptop-cpu)"
            anon = int(next(line for line in text.splitlines() if line.startswith("anon ")).split()[1])
            notes.append(f"{size} ({kind}): peak anonymous memory {gib(anon)} GiB (sampled every 0.2 s)")
        else:
            wall, rss, _ = run_child(_STREAMED, str(checkpoint), str(package))
            kind = "streamed"
        used = free_before - disk_free(args.root)
        rows.append((size, params, folder_bytes(checkpoint), kind, wall, rss, used, folder_bytes(package)))
        steps = json.loads((package / "manifest.json").read_text())["build_steps"]
        notes.append(
            f"{size} ({kind}) steps: "
            + "; ".join(f"{s['name']} {s['seconds']:.0f} s ({s['peak_rss_mb']:,.0f} MiB)" for s in steps)
        )
        if args.compare_whole:
            whole = args.root / f"{size}-whole"
            shutil.rmtree(whole, ignore_errors=True)
            free_before = disk_free(args.root)
            wall, rss, _ = run_child(_WHOLE, str(checkpoint), str(whole))
            used = free_before - disk_free(args.root)
            out_bytes = folder_bytes(whole / "int4-rtn")
            rows.append((size, params, folder_bytes(checkpoint), "whole-model", wall, rss, used, out_bytes))
            _, _, text = run_child(_LOGITS, str(whole / "int4-rtn"), str(package / "int4-rtn"))
            notes.append(f"{size}: streamed vs whole-model INT4 logits on 64 tokens: {text.splitlines()[-2]}")
            if not args.keep:
                shutil.rmtree(whole, ignore_errors=True)
        if args.generate:
            recipe = args.recipe or args.streamed_recipe
            variant = "int4-gptq" if args.gptq else "int4-recipe" if recipe else "int4-rtn"
            _, rss, text = run_child(_GENERATE, str(package / variant))
            notes.append(f"{size}: {text.splitlines()[-2]} (peak RSS {gib(rss)} GiB)")
        if not args.keep:
            shutil.rmtree(package, ignore_errors=True)
            shutil.rmtree(checkpoint, ignore_errors=True)
    print(f"machine: {describe_machine()}\n")
    print("| model | parameters | checkpoint (bf16) | export | wall s | peak RSS GiB | disk used GB | output bytes |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for size, params, ckpt, kind, wall, rss, used, out in rows:
        print(f"| {size} | {params / 1e9:.2f} B | {ckpt / 1e9:.1f} GB | {kind} | {wall:.0f} | {gib(rss)} "
              f"| {used / 1e9:.1f} | {out:,} |")  # fmt: skip
    for note in notes:
        print(f"- {note}")
    for size, (whole, streamed) in estimates.items():
        print(
            f"- {size}: edgekit's estimate: streamed peak {gib(streamed.peak_memory)} GiB, package "
            f"{streamed.disk / 1e9:.1f} GB; whole-model build (fp32 reference + INT4) {gib(whole.peak_memory)} GiB"
        )


def _estimates(checkpoint: Path, calibration_tokens: int = 0) -> tuple[Any, Any]:
    from edgekit.exporters.memory_estimate import estimate_build
    from edgekit.targets import get_target
    from edgekit.variants import plan_variants, target_variants

    config = json.loads((checkpoint / "config.json").read_text())
    tied = bool(config.get("tie_word_embeddings", False))
    files = sorted(checkpoint.glob("*.safetensors"))
    target = get_target("laptop-cpu-gptq" if calibration_tokens else "laptop-cpu")
    return (
        estimate_build(files, plan_variants(target), streaming=False, tied=tied, calibration_tokens=calibration_tokens),
        estimate_build(
            files, target_variants(target), streaming=True, tied=tied, calibration_tokens=calibration_tokens
        ),
    )


def _headers(path: Path) -> list[Any]:
    from edgekit.sources.weight_files import read_safetensors_header

    return read_safetensors_header(path)


if __name__ == "__main__":
    main()
