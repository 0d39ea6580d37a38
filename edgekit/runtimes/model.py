"""Load a package and generate text from it with onnxruntime-genai.

``load`` verifies the variant, walks the provider chain (falling back with a notice, or raising with
``strict=True``), and returns a ``Model`` whose ``generate``, ``stream`` and ``chat`` share one code path.
Text is encoded and decoded with the package's tokenizer.json (``tokens.py``); chat templates are rendered
in a bounded sandbox (``chat_template.py``); onnxruntime-genai sees token ids only.

Threads may share a ``Model``: each generation step holds the model's lock only while it runs, so an
abandoned ``stream()`` iterator never blocks other callers, and concurrent streams interleave.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Integral
from pathlib import Path
from typing import Any

from edgekit.errors import PackageError, ProviderUnavailableError, UsageError, first_line
from edgekit.package.genai_config import GenaiConfig, read_genai_config
from edgekit.package.manifest import read_manifest, variant_fingerprint
from edgekit.package.verify import variant_dir, verify_files
from edgekit.package.verify_cache import verify_variant
from edgekit.runtimes.chat_template import read_chat_template, render_chat, special_tokens
from edgekit.runtimes.cpu_threads import physical_cores, usable_cpus
from edgekit.runtimes.generation import GenerationConfig, cut_at_stop
from edgekit.runtimes.providers import PROVIDERS, available_providers
from edgekit.runtimes.tokens import TextTokenizer
from edgekit.runtimes.tuning import RuntimeSettings, read_tuning
from edgekit.tokenizer_record import recorded_rule


@dataclass
class ModelInfo:
    """What actually runs: the package, the variant, the provider that started, and the threads."""

    package: str
    variant: str
    provider: str
    threads: int
    manifest_sha256: str
    tried: list[str] = field(default_factory=list)
    """Providers tried, in order; the last one started."""
    skipped: list[str] = field(default_factory=list)
    """Why each provider before it did not start (``"cuda: <reason>"``)."""
    cpu_mem_arena: bool = True
    settings_from: str = "default"
    """Where the threads and arena came from: ``default``, ``given`` (arguments) or ``tuned`` (``edgekit tune``)."""
    variant_sha256: str = ""
    """The variant's fingerprint (``package.manifest.variant_fingerprint``): what ``edgekit tune`` records are for."""
    prefill_chunk: int | None = None
    """Prompt tokens per decoder pass (None: the whole prompt in one); only the CPU provider takes it in pieces."""

    def describe(self) -> str:
        """``int4-rtn on cpu``, with the settings where ``edgekit tune`` chose them."""
        shown = f"{self.variant} on {self.provider}"
        if self.settings_from == "tuned":
            chosen = RuntimeSettings(threads=self.threads, cpu_mem_arena=self.cpu_mem_arena,
                                     prefill_chunk=self.prefill_chunk)  # fmt: skip
            shown += f", tuned: {chosen.label()}"
        return shown


class Model:
    """A loaded package variant, ready to generate."""

    def __init__(
        self,
        genai_model: Any,
        info: ModelInfo,
        config: GenaiConfig,
        tokenizer: TextTokenizer,
        chat_template: str | None,
        template_variables: Mapping[str, str],
    ) -> None:
        import onnxruntime_genai as og

        self._og = og
        self._model = genai_model
        self._config = config
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self._template_variables = dict(template_variables)
        self._lock = threading.Lock()
        self.info = info

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Free the model's sessions and memory."""
        with self._lock:
            self._model = None

    @property
    def vocab_size(self) -> int:
        """Rows of the model's output: every token id it can generate is below this."""
        return self._config.model.vocab_size

    @property
    def context_length(self) -> int:
        """The longest sequence (prompt and generated tokens) the model was exported for."""
        return self._config.model.context_length

    def generate(self, prompt: str, **options: Any) -> str:
        """Complete ``prompt`` (raw text, no chat template) and return the new text."""
        return "".join(self.stream(prompt, **options))

    def chat(self, messages: Sequence[Mapping[str, Any]], *, stream: bool = False, **options: Any) -> Any:
        """Answer a conversation with the model's chat template: a string, or pieces if ``stream``."""
        config = _generation_config(options)
        ids = self.tokenizer.encode(self.apply_chat_template(messages), add_bos=False)
        pieces = self._text_stream(ids, config)
        return pieces if stream else "".join(pieces)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` under the model's chat template (as transformers renders it)."""
        if self.chat_template is None:
            raise UsageError(
                "this package has no chat template (its source had none)",
                path=self.info.package,
                fix="send the prompt as is (`edgekit run --raw`, Model.generate), or pass a template "
                "with --chat-template FILE (chat_template= in edgekit.load)",
            )
        given = type(messages).__name__
        refused = isinstance(messages, str | bytes | Mapping) or not isinstance(messages, Iterable)
        messages = [] if refused else list(messages)  # a generator is read once, here
        odd = next((f"a list holding {type(m).__name__}" for m in messages if not isinstance(m, Mapping)), None)
        if refused or odd:
            raise UsageError(
                f"messages must be a list of {{'role': ..., 'content': ...}} mappings, not {odd or given}",
                fix='pass [{"role": "user", "content": "Hello"}]',
            )
        variables = self._template_variables
        return render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           variables=variables)  # fmt: skip

    def stream(self, prompt: str, **options: Any) -> Iterator[str]:
        """Yield the completion of raw ``prompt`` piece by piece, as whole UTF-8 characters.

        Close the iterator (or exhaust it) when done early; until then its generator's memory stays
        allocated, though other callers are never blocked by it.
        """
        config = _generation_config(options)
        return self._text_stream(self.tokenizer.encode(prompt), config)

    def generate_tokens(self, input_ids: Sequence[int], **options: Any) -> list[int]:
        """Token ids generated after ``input_ids`` (no text decoding; stop strings do not apply)."""
        return list(self.token_stream(list(input_ids), _generation_config(options)))

    def token_stream(self, tokens: Sequence[int], config: GenerationConfig) -> Iterator[int]:
        """Generate ids one at a time; each step holds the model's lock only while it runs."""
        vocab = self.vocab_size
        bad = next((t for t in tokens if not _is_token(t, vocab)), None)
        if bad is not None:
            raise UsageError(f"token id {bad!r} is not in this model's vocabulary (0..{vocab - 1})",
                             fix="pass ids the package's tokenizer made")  # fmt: skip
        tokens = [int(t) for t in tokens]
        length, allowed = generation_length(self._config, len(tokens), config.max_new_tokens)
        with self._lock, self._runtime_errors():
            generator = self._og.Generator(self._require_open(), self._params(length, config))
            for piece in prompt_pieces(tokens, self.info.prefill_chunk):
                generator.append_tokens(piece)
        produced = 0
        while produced < allowed:
            with self._lock, self._runtime_errors():
                self._require_open()
                if generator.is_done():
                    return
                generator.generate_next_token()
                token = int(generator.get_next_tokens()[0])
            produced += 1
            yield token

    @contextlib.contextmanager
    def _runtime_errors(self) -> Iterator[None]:
        """onnxruntime-genai's failures while generating (a graph its config does not match, a kernel that
        refuses its inputs) as one-line ``PackageError``s naming the package."""
        try:
            yield
        except RuntimeError as exc:
            raise PackageError(
                f"onnxruntime-genai failed while generating ({first_line(exc)})",
                path=self.info.package,
                fix="if it ran out of memory, free memory or use a smaller variant; else rebuild the package with "
                "edgekit build, and if edgekit built it unchanged, report this",
            ) from None

    def _params(self, length: int, config: GenerationConfig) -> Any:
        params = self._og.GeneratorParams(self._model)
        search: dict[str, Any] = {"max_length": length, "min_length": 0}
        if config.temperature > 0:
            search.update(do_sample=True, temperature=config.temperature, top_p=config.top_p)
            if config.top_k:  # onnxruntime-genai refuses more than the vocabulary, which means the same
                search["top_k"] = min(config.top_k, self.vocab_size)
        else:
            search["do_sample"] = False
        if config.seed is not None:
            search["random_seed"] = config.seed
        params.set_search_options(**search)
        return params

    def _text_stream(self, ids: list[int], config: GenerationConfig) -> Iterator[str]:
        pieces = self.tokenizer.decode_stream(self.token_stream(ids, config))
        return cut_at_stop(pieces, config.stop) if config.stop else pieces

    def _require_open(self) -> Any:
        if self._model is None:
            raise PackageError("the model was closed", path=self.info.package, fix="load it again")
        return self._model


def prompt_pieces(tokens: Sequence[int], chunk: int | None) -> list[list[int]]:
    """``tokens`` in as few consecutive pieces of at most ``chunk`` as hold them, of near-equal length (one
    piece where ``chunk`` is None): 257 tokens go as 128 and 129, not 256 and a one-token pass."""
    if chunk is not None and chunk < 1:
        raise ValueError(f"a prompt piece holds at least one token, not {chunk}")
    count = -(-len(tokens) // chunk) if chunk else 1
    bounds = [len(tokens) * i // max(1, count) for i in range(count + 1)]
    return [list(tokens[begin:end]) for begin, end in itertools.pairwise(bounds) if end > begin]


def generation_length(config: GenaiConfig, prompt_tokens: int, max_new_tokens: int) -> tuple[int, int]:
    """The ``max_length`` to give onnxruntime-genai, and how many new tokens fit in the context.

    A sliding-window model's cache holds at least its window (onnxruntime-genai refuses a smaller
    capacity), so a short generation still asks for the window; the step count is kept separately.
    """
    context = config.model.context_length
    if prompt_tokens >= context:
        raise UsageError(
            f"the prompt has {prompt_tokens} tokens; the model's context holds {context}",
            fix="shorten the prompt",
        )
    if prompt_tokens == 0:
        raise UsageError("the prompt is empty", fix="give at least one token of prompt")
    allowed = min(max_new_tokens, context - prompt_tokens)
    length = prompt_tokens + allowed
    window = config.model.decoder.sliding_window
    if window is not None:
        length = max(length, min(context, window.window_size + window.cache_slack))
    return length, allowed


def _is_token(value: object, vocab: int) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool) and 0 <= int(value) < vocab


def _check_threads(count: object) -> None:
    """A ``UsageError`` unless ``count`` is a thread count within the CPUs this process may use: more threads
    than CPUs only wait for each other, and each costs a start-up and a stack."""
    cpus = len(usable_cpus())
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= cpus:
        raise UsageError(f"threads must be an integer in 1..{cpus} (the CPUs this process may use), not {count!r}",
                         fix=f"use at most {cpus} (the default is {physical_cores()}, one per core)")  # fmt: skip


def _generation_config(options: dict[str, Any]) -> GenerationConfig:
    unknown = sorted(set(options) - set(GenerationConfig.__dataclass_fields__))
    if unknown:
        known = ", ".join(GenerationConfig.__dataclass_fields__)
        raise UsageError(f"unknown generation option {', '.join(map(repr, unknown))}", fix=f"use: {known}")
    return GenerationConfig(**options)


def load(
    package: str | os.PathLike[str],
    target: str | None = None,
    *,
    variant: str | None = None,
    providers: Sequence[str] | None = None,
    strict: bool = False,
    verify: bool = True,
    threads: int | None = None,
    settings: RuntimeSettings | None = None,
    tuned: bool = True,
    chat_template: str | None = None,
    on_fallback: Callable[[str], None] | None = None,
) -> Model:
    """Load a package's variant on the first execution provider that starts.

    ``target`` picks the variant the package deploys for it (unless ``variant`` is given) and its provider
    chain; a target the package was not built for is a ``UsageError`` naming those it was.
    The variant's files are checked against the manifest before onnxruntime sees them (``verify=False``
    skips the hashing only; the file list, links, paths and the genai_config.json allow-list are always
    checked). The provider chain comes from ``providers``, else the target's entry in the manifest, else
    the variant's own provider followed by the CPU. A provider that is missing or fails to start is
    skipped with a notice (``on_fallback``, a ``UserWarning`` by default); ``strict=True`` raises
    ``ProviderUnavailableError`` instead. A model the CPU cannot load is a ``PackageError``, not a
    provider problem. ``threads``: onnxruntime's intra-op threads; ``settings``: threads, memory arena and
    the prompt's pieces on the CPU (``RuntimeSettings``) together; without either, the settings
    ``edgekit tune`` recorded for this package variant on this machine class apply (``tuned=False`` ignores
    them), else one thread per physical core and the prompt in pieces of ``DEFAULT_PREFILL_CHUNK``.
    ``chat_template``: a Jinja template to use instead of the package's. No native library is ever
    loaded: edgekit's graphs use onnxruntime's built-in operators only.
    """
    root = Path(package)
    manifest = read_manifest(root)
    if target is not None:  # checked even beside a variant: a target names a provider chain too
        deployed = _target_variant(root, manifest, target)
        variant = variant or deployed
    name, folder = variant_dir(root, manifest, variant)
    if verify:
        verify_variant(root, manifest, manifest["variants"][name]["path"])
    else:  # no hashing, but links, unlisted files and paths out of the package are still refused
        verify_files(root, manifest, manifest["variants"][name]["path"], hashes=False)
    config = read_genai_config(folder)  # checked again: the verdict cache must not stand in for the schema
    manifest_hash = hashlib.sha256((root / "manifest.json").read_bytes()).hexdigest()
    fingerprint = variant_fingerprint(manifest, name)  # tuning survives `edgekit eval` rewriting the manifest
    runtime, settings_from = _runtime_settings(threads, settings, tuned, fingerprint, name)
    chain = list(providers or _default_chain(manifest, name, target))
    unknown = [p for p in chain if p not in PROVIDERS]
    if unknown:
        raise UsageError(f"unknown provider '{unknown[0]}'", path=root, fix=f"use one of: {', '.join(PROVIDERS)}")
    genai_model, provider, skipped = _start(folder, chain, strict, runtime, on_fallback)
    tried = [reason.split(":", 1)[0] for reason in skipped] + [provider]
    chunk = runtime.prefill_chunk if provider == "cpu" else None  # a GPU takes the prompt whole
    info = ModelInfo(
        str(root), name, provider, runtime.threads, manifest_hash, tried, skipped, runtime.cpu_mem_arena, settings_from,
        fingerprint, chunk,
    )  # fmt: skip
    rule = recorded_rule(manifest)
    tokenizer = TextTokenizer(folder, add_bos=rule.add_bos_token, bos_token_id=rule.bos_token_id)
    template = chat_template if chat_template is not None else read_chat_template(folder)
    return Model(genai_model, info, config, tokenizer, template, special_tokens(folder))


def _start(
    folder: Path,
    chain: list[str],
    strict: bool,
    runtime: RuntimeSettings,
    on_fallback: Callable[[str], None] | None,
) -> tuple[Any, str, list[str]]:
    """The first provider of ``chain`` that starts: (og.Model, provider, why each one before it did not)."""
    import onnxruntime_genai as og

    present = set(available_providers())
    tried: list[str] = []
    for position, provider in enumerate(chain):
        reason = None if provider in present else "not available in the installed onnxruntime-genai"
        if reason is None:
            try:
                return og.Model(_genai_config(og, folder, provider, strict, runtime)), provider, tried
            except Exception as exc:  # a provider that fails at session start, or a model it cannot load
                reason = first_line(exc)
                if provider == "cpu":  # the CPU provider is always there: the model itself is at fault
                    raise PackageError(
                        f"onnxruntime-genai cannot load this variant on the CPU ({reason})",
                        path=folder,
                        fix="rebuild the package with `edgekit build`",
                    ) from None
        tried.append(f"{provider}: {reason}")
        if strict:
            raise ProviderUnavailableError(f"provider '{provider}' cannot start: {reason}", path=folder)
        following = f"trying '{chain[position + 1]}'" if position + 1 < len(chain) else "no provider is left"
        message = f"provider '{provider}' skipped ({reason}); {following}"
        if on_fallback is not None:
            on_fallback(message)
        else:
            warnings.warn(f"edgekit: {message}", stacklevel=3)
    raise ProviderUnavailableError(
        f"no provider could start ({'; '.join(tried)})",
        path=folder,
        fix="install an onnxruntime-genai build for one of them, or add 'cpu' to the chain",
    )


def _target_variant(root: Path, manifest: dict[str, Any], target: str) -> str:
    """The variant the package deploys for ``target``; a target it was not built for is a usage error."""
    built_for = manifest.get("targets", {})
    if target not in built_for:
        raise UsageError(
            f"the package was not built for target '{target}' (built for: {', '.join(built_for) or 'none'})",
            path=root,
            fix=f"pass one of those targets, or build the model again with -t {target}",
        )
    return str(built_for[target]["variant"])


def _default_chain(manifest: dict[str, Any], variant: str, target: str | None) -> list[str]:
    targets = manifest.get("targets", {})
    if target in targets:
        return list(targets[target]["providers"])
    own = manifest["variants"][variant].get("provider", "cpu")
    return [own] if own == "cpu" else [own, "cpu"]


def _runtime_settings(
    threads: int | None, settings: RuntimeSettings | None, tuned: bool, fingerprint: str, variant: str
) -> tuple[RuntimeSettings, str]:
    """The threads, arena and prompt pieces to run with, and where they came from (see ``load``)."""
    threads = None if threads == 0 and not isinstance(threads, bool) else threads  # 0: automatic, as onnxruntime's
    if threads is not None:
        _check_threads(threads)
        return RuntimeSettings(threads=threads), "given"
    if settings is not None:
        _check_threads(settings.threads)
        return settings, "given"
    recorded = read_tuning(fingerprint, variant) if tuned else None
    if recorded is not None:
        return recorded, "tuned"
    return RuntimeSettings(threads=physical_cores()), "default"


def _genai_config(og: Any, folder: Path, provider: str, strict: bool, runtime: RuntimeSettings) -> Any:
    config = og.Config(str(folder))
    config.clear_providers()
    spec = PROVIDERS[provider]
    if spec.genai_name is not None:
        config.append_provider(spec.genai_name)
    # Explicit thread counts: onnxruntime's defaults decode slower (see cpu_threads.py).
    session: dict[str, Any] = {"intra_op_num_threads": runtime.threads, "inter_op_num_threads": 1}
    if not runtime.cpu_mem_arena:
        session["enable_cpu_mem_arena"] = False
    if strict:
        session.update(dict(spec.session_entries))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
    return config
