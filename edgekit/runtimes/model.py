"""Load a package and generate text from it with onnxruntime-genai.

``load`` picks the variant, walks the provider chain (falling back with a warning, or raising with
``strict=True``), and returns a ``Model`` whose ``generate``, ``stream`` and ``chat`` share one code path.
Calls on one ``Model`` are serialized by a lock, so threads may share it safely.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekit.errors import PackageError, ProviderUnavailableError
from edgekit.package import read_manifest, variant_dir, verify_files
from edgekit.runtimes.cpu_threads import physical_cores
from edgekit.runtimes.providers import PROVIDERS, available_providers
from edgekit.runtimes.verify_cache import verify_variant


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling settings for one generation; the defaults decode greedily."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class ModelInfo:
    """What actually runs: the package, the variant, the provider that started, and the threads."""

    package: str
    variant: str
    provider: str
    threads: int
    manifest_sha256: str
    tried: list[str] = field(default_factory=list)


class Model:
    """A loaded package variant, ready to generate."""

    def __init__(self, genai_model: Any, info: ModelInfo) -> None:
        import onnxruntime_genai as og

        self._og = og
        self._model = genai_model
        self._tokenizer = og.Tokenizer(genai_model)
        self._lock = threading.Lock()
        self.info = info

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Free the model's sessions and memory."""
        self._model = None
        self._tokenizer = None

    def generate(self, prompt: str, **options: Any) -> str:
        """Complete ``prompt`` (raw text, no chat template) and return the new text."""
        return "".join(self.stream(prompt, **options))

    def chat(self, messages: Sequence[dict[str, str]], *, stream: bool = False, **options: Any) -> Any:
        """Answer a conversation with the model's chat template: a string, or pieces if ``stream``."""
        pieces = self.stream(self.apply_chat_template(messages), **options)
        return pieces if stream else "".join(pieces)

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> str:
        """The prompt text for ``messages`` under the model's chat template."""
        self._require_open()
        return str(self._tokenizer.apply_chat_template(json.dumps(list(messages)), add_generation_prompt=True))

    def stream(self, prompt: str, **options: Any) -> Iterator[str]:
        """Yield the completion of ``prompt`` piece by piece, as whole UTF-8 characters."""
        config = _generation_config(options)
        return self._stream(prompt, config)

    def generate_tokens(self, input_ids: Sequence[int], **options: Any) -> list[int]:
        """Token ids generated after ``input_ids`` (no text decoding; stop strings do not apply)."""
        config = _generation_config(options)
        with self._lock:
            return list(self._token_stream(list(input_ids), config))

    def _token_stream(self, tokens: Sequence[int], config: GenerationConfig) -> Iterator[int]:
        """Generate token ids one at a time; the caller holds the lock."""
        self._require_open()
        og = self._og
        params = og.GeneratorParams(self._model)
        search: dict[str, Any] = {"max_length": len(tokens) + config.max_new_tokens}
        if config.temperature > 0:
            search.update(do_sample=True, temperature=config.temperature, top_p=config.top_p)
            if config.top_k:
                search["top_k"] = config.top_k
        else:
            search["do_sample"] = False
        if config.seed is not None:
            search["random_seed"] = config.seed
        params.set_search_options(**search)
        generator = og.Generator(self._model, params)
        generator.append_tokens(list(tokens))
        while not generator.is_done():
            generator.generate_next_token()
            yield int(generator.get_next_tokens()[0])

    def _stream(self, prompt: str, config: GenerationConfig) -> Iterator[str]:
        with self._lock:
            self._require_open()
            decoder = self._tokenizer.create_stream()
            held = ""  # text that might be the start of a stop string
            longest_stop = max((len(s) for s in config.stop), default=0)
            for token in self._token_stream(self._tokenizer.encode(prompt), config):
                held += decoder.decode(token)
                if not config.stop:
                    if held:
                        yield held
                        held = ""
                    continue
                cut = min((i for i in (held.find(s) for s in config.stop) if i >= 0), default=-1)
                if cut >= 0:
                    if held[:cut]:
                        yield held[:cut]
                    return
                safe = len(held) - (longest_stop - 1)
                if safe > 0:
                    yield held[:safe]
                    held = held[safe:]
            if held:
                yield held

    def _require_open(self) -> None:
        if self._model is None:
            raise PackageError("the model was closed", path=self.info.package, fix="load it again")


def _generation_config(options: dict[str, Any]) -> GenerationConfig:
    stop = options.get("stop") or ()
    return GenerationConfig(**{**options, "stop": (stop,) if isinstance(stop, str) else tuple(stop)})


def load(
    package: str | os.PathLike[str],
    target: str | None = None,
    *,
    variant: str | None = None,
    providers: Sequence[str] | None = None,
    strict: bool = False,
    verify: bool = True,
    threads: int | None = None,
) -> Model:
    """Load a package's variant on the first execution provider that starts.

    The variant's files are checked against the manifest before onnxruntime sees them (``verify=False``
    skips the hashing only). The provider chain comes from ``providers``, else the target's entry in the
    manifest, else the variant's own provider followed by the CPU. A provider that is missing or fails to
    start is skipped with a warning; with ``strict=True`` it raises ``ProviderUnavailableError`` instead.
    ``threads`` is onnxruntime's intra-op thread count, one per physical core by default.
    """
    import onnxruntime_genai as og

    root = Path(package)
    manifest = read_manifest(root)
    if variant is None and target is not None:
        entry = manifest.get("targets", {}).get(target)
        variant = entry["variant"] if entry else None
    name, folder = variant_dir(root, manifest, variant)
    if verify:
        verify_variant(root, manifest, manifest["variants"][name]["path"])
    else:  # no hashing, but links, unlisted files and paths out of the package are still refused
        verify_files(root, manifest, manifest["variants"][name]["path"], hashes=False)
    threads = threads or physical_cores()
    chain = list(providers or _default_chain(manifest, name, target))
    unknown = [p for p in chain if p not in PROVIDERS]
    if unknown:
        raise PackageError(f"unknown provider '{unknown[0]}'", path=root, fix=f"use one of: {', '.join(PROVIDERS)}")
    present = set(available_providers())
    tried: list[str] = []
    for provider in chain:
        tried.append(provider)
        reason = None if provider in present else "not available in the installed onnxruntime-genai"
        genai_model = None
        if reason is None:
            try:
                genai_model = og.Model(_genai_config(og, folder, provider, strict, threads))
            except Exception as exc:  # a provider that fails at session start
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if genai_model is not None:
            manifest_hash = _sha256_text((root / "manifest.json").read_text(encoding="utf-8"))
            return Model(genai_model, ModelInfo(str(root), name, provider, threads, manifest_hash, tried))
        if strict:
            raise ProviderUnavailableError(f"provider '{provider}' cannot start: {reason}", path=folder)
        warnings.warn(f"edgekit: provider '{provider}' skipped ({reason}); trying the next one", stacklevel=2)
    raise ProviderUnavailableError(
        f"no provider in {chain} could start",
        path=folder,
        fix="install an onnxruntime-genai build for one of them",
    )


def _default_chain(manifest: dict[str, Any], variant: str, target: str | None) -> list[str]:
    targets = manifest.get("targets", {})
    if target in targets:
        return list(targets[target]["providers"])
    own = manifest["variants"][variant].get("provider", "cpu")
    return [own] if own == "cpu" else [own, "cpu"]


def _genai_config(og: Any, folder: Path, provider: str, strict: bool, threads: int) -> Any:
    config = og.Config(str(folder))
    config.clear_providers()
    spec = PROVIDERS[provider]
    if spec.genai_name is not None:
        config.append_provider(spec.genai_name)
    # Explicit thread counts: left to onnxruntime's defaults, decoding was 35-65% slower (cpu_threads.py).
    session: dict[str, Any] = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    if strict:
        session.update(dict(spec.session_entries))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
    return config


def _sha256_text(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()
