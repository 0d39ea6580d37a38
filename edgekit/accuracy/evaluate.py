"""``edgekit eval``: how much accuracy each variant lost against the package's fp32 reference.

Protocol (llama.cpp's perplexity tool): the text is tokenized once and cut into non-overlapping windows
of ``ctx`` tokens; each window runs from an empty cache and only its second half is scored (logits at
positions ctx/2 .. ctx-2 predict the next token), so every scored token has at least ctx/2 of context.
Variants run through the same ``model.onnx`` the runtime loads, so MatMulNBits' accuracy level is the
one users get.

The reference is cached in the package. Its full log-probabilities would be hundreds of MB, so the
cache holds what determines them exactly: the final hidden states of the scored positions. The fp32
export's LM head is a plain MatMul, and its weight is read from the export, so the reference logits are
recomputed bit for bit as ``hidden @ W`` in one matrix product per window.

A package without an fp32 variant (a streamed build) is scored against its checkpoint instead, run in
PyTorch one decoder layer at a time (``streamed_reference.py``), with the same windows, cache and metrics.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekit.accuracy.metrics import kl_divergence, log_softmax, percentile, perplexity, token_nll
from edgekit.accuracy.protocol import (
    EVAL_DIR,
    EvalProtocol,
    Progress,
    ReferenceSource,
    read_cached_hidden,
    reference_cache_path,
    write_cached_hidden,
)
from edgekit.accuracy.texts import Corpus, builtin_corpus, token_ids, token_windows
from edgekit.errors import PackageError
from edgekit.exporters.decoder_session import DecoderSession
from edgekit.package.manifest import read_manifest
from edgekit.package.verify import verify_files
from edgekit.tokenizer_record import recorded_rule
from edgekit.variants import REFERENCE_VARIANT

if TYPE_CHECKING:
    from edgekit.accuracy.streamed_reference import StreamedReference

REPORT_SCHEMA_VERSION = 1
DEFAULT_CTX = 512
DEFAULT_WINDOWS = 20


class _Reference:
    """Reference log-probabilities per window from the fp32 ONNX variant, from the cache or computed and cached."""

    def __init__(self, root: Path, windows: np.ndarray, protocol: EvalProtocol, manifest: dict[str, Any]) -> None:
        self.folder = root / manifest["variants"][REFERENCE_VARIANT]["path"]
        self.session = DecoderSession(self.folder)
        self.head = lm_head_weight(self.folder) if "hidden_states" in self.session.output_names else None
        self.windows = windows
        self.start = protocol.ctx // 2
        files = sorted(
            (f["path"], f["sha256"]) for f in manifest.get("files", []) if f["path"].startswith(f"{REFERENCE_VARIANT}/")
        )
        self.cache_path = reference_cache_path(root, {"protocol": protocol.as_dict(), "files": files})
        self.cacheable = self.head is not None
        scored = windows.shape[1] - 1 - self.start
        self.hidden = read_cached_hidden(self.cache_path, len(windows), scored) if self.cacheable else None
        if self.hidden is not None and self.head is not None and self.hidden.shape[2] != self.head.shape[0]:
            self.hidden = None  # a cache of another width than the head's: run the reference again
        self.cache_hit = self.hidden is not None

    def logprobs(self, index: int) -> np.ndarray:
        """Log-probabilities [scored, vocab] of window ``index``."""
        if self.hidden is not None and self.head is not None:
            return log_softmax(self.hidden[index] @ self.head)
        # No plain-MatMul head to rebuild logits from: run the reference window itself.
        end = self.windows.shape[1] - 1
        return log_softmax(self.session.logits(self.windows[index : index + 1])[0, self.start : end])

    def compute(self, progress: Progress) -> None:
        """Run the reference over every window once, keeping the hidden states to cache."""
        if self.cache_hit or self.head is None:
            return
        end = self.windows.shape[1] - 1
        hidden = []
        for index in range(len(self.windows)):
            progress(f"reference window {index + 1}/{len(self.windows)}")
            (states,) = self.session.run(self.windows[index : index + 1], ["hidden_states"])
            hidden.append(states[0, self.start : end])
        self.hidden = np.stack(hidden).astype(np.float32)

    def save(self, eval_dir: Path) -> None:
        """Write the cache file, replacing caches of other texts or protocols."""
        if self.hidden is not None and not self.cache_hit:
            write_cached_hidden(eval_dir / self.cache_path.name, self.hidden)

    def describe(self) -> dict[str, Any]:
        """The fp32 ONNX variant, run as a variant is."""
        return {"kind": "onnx", "variant": REFERENCE_VARIANT, "description": "the package's fp32 ONNX variant"}


def lm_head_weight(model_dir: Path) -> np.ndarray | None:
    """The weight [hidden, vocab] of the MatMul that produces ``logits``, or None if it is not one."""
    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    genai = json.loads((model_dir / "genai_config.json").read_text(encoding="utf-8"))["model"]["decoder"]
    model = onnx.load(str(model_dir / genai["filename"]), load_external_data=False)
    producer = next((node for node in model.graph.node if "logits" in node.output), None)
    if producer is None or producer.op_type != "MatMul" or producer.input[0] != "hidden_states":
        return None
    tensor = next((t for t in model.graph.initializer if t.name == producer.input[1]), None)
    if tensor is None:
        return None
    if uses_external_data(tensor):
        load_external_data_for_tensor(tensor, str(model_dir))
    return np.asarray(numpy_helper.to_array(tensor), dtype=np.float32)


def evaluate_package(
    package: str | Path,
    *,
    corpus: Corpus | None = None,
    windows: int = DEFAULT_WINDOWS,
    ctx: int = DEFAULT_CTX,
    variants: list[str] | None = None,
    progress: Progress | None = None,
    write: bool = True,
    reference_checkpoint: str | Path | None = None,
    verify_checkpoint: bool = True,
) -> dict[str, Any]:
    """Score every variant of ``package`` against its fp32 reference; returns the report.

    With ``write`` the report (JSON, markdown, PNG chart) and the reference cache go to ``OUT/eval/``.
    A package without an fp32 variant (a streamed build) needs ``reference_checkpoint``, the checkpoint
    folder it was built from: the reference is then that checkpoint run in PyTorch one decoder layer at a
    time, in float32. Its weight files are first checked against the manifest's source hashes
    (``verify_checkpoint``; the build, which hands over the folder it just hashed, skips it).
    """
    from tokenizers import Tokenizer

    root = Path(package)
    manifest = read_manifest(root)
    streamed = REFERENCE_VARIANT not in manifest.get("variants", {})
    checkpoint = None if reference_checkpoint is None else Path(reference_checkpoint)
    if streamed and checkpoint is None:
        raise PackageError(
            "has no fp32 reference variant (a streamed build) to measure against",
            path=root,
            fix="pass the checkpoint folder it was built from with --reference-checkpoint DIR "
            "(reference_checkpoint= in Python) to compute the reference from it layer by layer",
        )
    for entry in manifest["variants"].values():  # no links or paths out of the package before onnxruntime runs
        verify_files(root, manifest, entry["path"], hashes=False)
    say = progress or (lambda _message: None)
    corpus = corpus or builtin_corpus("evaluation")
    # Every variant carries the same tokenizer; the context length is the one the variants were exported for.
    first_variant = REFERENCE_VARIANT if not streamed else next(iter(manifest["variants"]))
    reference_dir = root / manifest["variants"][first_variant]["path"]
    tokenizer = Tokenizer.from_file(str(reference_dir / "tokenizer.json"))
    ids = token_ids(tokenizer, corpus.text)
    context_length = int(json.loads((reference_dir / "genai_config.json").read_text())["model"]["context_length"])
    ctx = min(ctx, context_length)
    rule = recorded_rule(manifest)
    bos = rule.bos_token_id if rule.add_bos_token else None
    token_grid = token_windows(ids, ctx, windows, bos, corpus.name)
    protocol = EvalProtocol(corpus.name, corpus.sha256, len(ids), ctx, len(token_grid), bos is not None)
    with contextlib.ExitStack() as stack:
        reference: ReferenceSource
        if checkpoint is not None and streamed:
            reference = stack.enter_context(
                _streamed_reference(root, checkpoint, token_grid, protocol, manifest, verify_checkpoint)
            )
        else:
            reference = _Reference(root, token_grid, protocol, manifest)
        return _score(root, manifest, reference, token_grid, protocol, variants, say, write)


def _streamed_reference(
    root: Path, checkpoint: Path, windows: np.ndarray, protocol: EvalProtocol, manifest: dict[str, Any], verify: bool
) -> contextlib.AbstractContextManager[StreamedReference]:
    from edgekit.accuracy.streamed_reference import open_streamed_reference

    return open_streamed_reference(root, checkpoint, windows, protocol, manifest, verify=verify)


def _score(
    root: Path,
    manifest: dict[str, Any],
    reference: ReferenceSource,
    token_grid: np.ndarray,
    protocol: EvalProtocol,
    variants: list[str] | None,
    say: Progress,
    write: bool,
) -> dict[str, Any]:
    """Run every variant over the windows and compare it with ``reference``: the report."""
    ctx = protocol.ctx
    names = [n for n in (variants or list(manifest["variants"])) if n != REFERENCE_VARIANT]
    for name in names:
        if name not in manifest["variants"]:
            raise PackageError(
                f"has no variant '{name}'", path=root, fix=f"use one of: {', '.join(manifest['variants'])}"
            )
    started = time.perf_counter()
    reference.compute(say)
    seconds = {REFERENCE_VARIANT: time.perf_counter() - started}
    sessions = {name: DecoderSession(root / manifest["variants"][name]["path"]) for name in names}
    reference_nll, per_variant = _measure(sessions, reference, token_grid, ctx, seconds, say)
    ref_ppl = perplexity(np.concatenate(reference_nll))
    parameters = int(manifest.get("parameter_count") or 0)
    if REFERENCE_VARIANT in manifest["variants"]:
        rows = {REFERENCE_VARIANT: _row(manifest, REFERENCE_VARIANT, ref_ppl, ref_ppl, None, None, parameters)}
    else:  # the streamed PyTorch reference: no files of its own in the package
        rows = {REFERENCE_VARIANT: _reference_row(ref_ppl)}
    for name in names:
        data = {key: np.concatenate(values) for key, values in per_variant[name].items()}
        rows[name] = _row(manifest, name, perplexity(data["nll"]), ref_ppl, data["kl"], data["agree"], parameters)
    processed = token_grid.size
    for name, row in rows.items():
        # The speed of the model runs alone (tokens through the network per second), not of the scoring.
        spent = seconds.get(name, 0.0)
        row["eval_seconds"] = round(spent, 2)
        row["eval_tokens_per_second"] = round(processed / spent, 1) if spent > 0 else None
    report = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "protocol": protocol.as_dict(),
        "reference": reference.describe(),
        "reference_cache": _cache_state(reference, write),
        "variants": rows,
    }
    if write:
        reference.save(root / EVAL_DIR)
    return report


def _measure(
    sessions: dict[str, DecoderSession],
    reference: ReferenceSource,
    token_grid: np.ndarray,
    ctx: int,
    seconds: dict[str, float],
    say: Progress,
) -> tuple[list[np.ndarray], dict[str, dict[str, list[np.ndarray]]]]:
    """Each window's reference NLL, and per variant its NLL, KL and top-1 agreement; adds run times to ``seconds``."""
    targets = token_grid[:, ctx // 2 + 1 :]
    reference_nll: list[np.ndarray] = []
    per_variant: dict[str, dict[str, list[np.ndarray]]] = {n: {"nll": [], "kl": [], "agree": []} for n in sessions}
    for index in range(len(token_grid)):
        say(f"window {index + 1}/{len(token_grid)}")
        ref_logprobs = reference.logprobs(index)
        reference_nll.append(token_nll(ref_logprobs, targets[index]))
        ref_top1 = ref_logprobs.argmax(-1)
        for name, session in sessions.items():
            started = time.perf_counter()
            logits = session.logits(token_grid[index : index + 1])[0, ctx // 2 : ctx - 1]
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started
            logprobs = log_softmax(logits)
            per_variant[name]["nll"].append(token_nll(logprobs, targets[index]))
            per_variant[name]["kl"].append(kl_divergence(ref_logprobs, logprobs))
            per_variant[name]["agree"].append(ref_top1 == logprobs.argmax(-1))
    return reference_nll, per_variant


def _cache_state(reference: ReferenceSource, write: bool) -> str:
    if reference.cache_hit:
        return "hit"
    if not reference.cacheable:
        return "off"
    return "stored" if write else "computed"


def _reference_row(ppl: float) -> dict[str, Any]:
    """The report row of a reference that is not a variant of the package (no files, so no sizes)."""
    return {
        "precision": "fp32",
        "method": "pytorch-streamed",
        "perplexity": ppl,
        "ppl_ratio": 1.0,
        "kl_mean": 0.0,
        "kl_p99": 0.0,
        "top1_agreement": 1.0,
        "bytes": None,
        "weight_bytes": None,
        "bits_per_weight": None,
    }


def _row(
    manifest: dict[str, Any],
    name: str,
    ppl: float,
    ref_ppl: float,
    kl: np.ndarray | None,
    agree: np.ndarray | None,
    parameters: int,
) -> dict[str, Any]:
    entry = manifest["variants"][name]
    # Bits per weight count the graph and its weights (embedding and head included), not the tokenizer.
    weight_bytes = sum(
        f["size"]
        for f in manifest.get("files", [])
        if f["path"].startswith(f"{entry['path']}/") and f["path"].endswith((".onnx", ".onnx.data"))
    )
    return {
        "precision": entry["precision"],
        "method": entry["method"],
        "perplexity": ppl,
        "ppl_ratio": ppl / ref_ppl,
        "kl_mean": 0.0 if kl is None else float(kl.mean()),
        "kl_p99": 0.0 if kl is None else percentile(kl, 99),
        "top1_agreement": 1.0 if agree is None else float(agree.mean()),
        "bytes": entry["bytes"],
        "weight_bytes": weight_bytes,
        "bits_per_weight": weight_bytes * 8 / parameters if parameters else None,
    }
