"""The package's tokenizer and chat template against the source's Hugging Face tokenizer, at build time.

The runtime encodes with the ``tokenizers`` library on the variant's tokenizer.json and the recorded BOS
rule, and renders the variant's chat template in its own bounded sandbox (``runtimes/``); users of the
source model get what transformers' ``AutoTokenizer`` on the source folder gives. The two can part (a
tokenizer re-saved under another class, a slow tokenizer converted, a template lost or rewritten, a BOS
rule read wrong), and nothing else in the build would notice: the weights are validated on ids both sides
share. So a build encodes a fixed set of strings both ways, decodes the ids back both ways (whole and
streamed), renders one conversation both ways, and fails on the first difference.

One difference is by design and not checked: a text that already starts with the literal BOS token gets no
second BOS from the runtime, where transformers adds one; the strings here hold special tokens inside the
text only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekit.errors import SourceError, UsageError, ValidationError
from edgekit.runtimes.chat_template import (
    TemplateLimitError,
    foreign_template_bounds,
    read_chat_template,
    render_chat,
    special_tokens,
)
from edgekit.runtimes.tokens import TextTokenizer
from edgekit.tokenizer_record import TokenizerRule

# What users feed a model: each kind of text a tokenizer's normalizer, pre-tokenizer or byte fallback
# treats on its own path. Kept short so a build spends well under a second here.
FIXED_STRINGS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog. It's 3.14, isn't it? Yes!",
    "Café, naïve résumé, Ångström, façade, Øresund, señor, Straße, ĳ ﬁ ½",
    "東京は日本の首都です。北京欢迎你。서울특별시",
    "🦊🚀 👍🏽 👩‍👩‍👧‍👦 🇫🇷 ✔︎",
    "  two leading spaces",
    "trailing spaces   ",
    "multiple     spaces  in   between",
    " ",
    "line one\nline two\n\n\nafter blank lines\r\nwindows line",
    "\tindented with a tab\t\tand two\n\t\n",
    'def square(x: int) -> int:\n    """Square x."""\n    return x ** 2  # {"k": [1, 2.5, null]}\n',
    "for (int i = 0; i < n; ++i) { total += a[i] * 0x1F; } // done",
    "",
)
# The conversation rendered both ways: every role, a system message, non-ASCII content.
CONVERSATION: tuple[dict[str, str], ...] = (
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan? 東京 🦊"},
)
_NAMED_SPECIALS = ("bos_token", "eos_token", "pad_token", "unk_token")
# Bounds the special tokens checked: real tokenizers declare thousands (Gemma's unused tokens).
MAX_SPECIAL_STRINGS = 24
_SHOWN_IDS = 12
# How render_chat words a template that raised or failed (not one stopped at a bound).
_FAILED = "the chat template failed"
_FIX = (
    "the exported tokenizer files do not reproduce the source's tokenizer; report the source model "
    "(edgekit copies its tokenizer files as transformers saves them)"
)


@dataclass(frozen=True)
class TokenizerParity:
    """What the parity check compared: how many strings, and the chat template's outcome."""

    strings: int
    chat_template: str
    """``"same"``, ``"none"`` (neither side has one) or ``"no system role"`` (it rejects system messages)."""

    def as_dict(self) -> dict[str, Any]:
        """The manifest's form (``tokenizer.parity``)."""
        return {"strings": self.strings, "chat_template": self.chat_template}


def check_tokenizer_parity(source_folder: Path, variant_folder: Path, rule: TokenizerRule) -> TokenizerParity:
    """Check that ``variant_folder``'s tokenizer and chat template, as the runtime uses them, match the source's.

    The reference is ``AutoTokenizer`` on ``source_folder`` (no remote code). Raises ``ValidationError`` (one
    line) naming the first string or template that differs, and re-raises a template the bounded renderer
    refuses as the ``SourceError`` it is, without handing it to transformers' unbounded renderer.
    """
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(source_folder), trust_remote_code=False)
    ours = TextTokenizer(variant_folder, add_bos=rule.add_bos_token, bos_token_id=rule.bos_token_id)
    strings = [*FIXED_STRINGS, *special_token_strings(reference)]
    for text in strings:
        _check_string(reference, ours, text, variant_folder)
    outcome = _check_chat_template(reference, ours, source_folder, variant_folder)
    return TokenizerParity(len(strings), outcome)


def special_token_strings(reference: Any) -> list[str]:
    """One string per special token the tokenizer knows, each inside text.

    BOS, EOS, PAD and UNK, the special tokens the chat template writes, then the other special added tokens
    by id, up to ``MAX_SPECIAL_STRINGS``. Each token sits after a word, never at the start, where the
    runtime deliberately differs (no double BOS).
    """
    tokens: list[str] = []
    for name in _NAMED_SPECIALS:
        token = getattr(reference, name, None)
        if isinstance(token, str) and token:
            tokens.append(token)
    template = reference.chat_template
    if isinstance(template, dict):  # named templates
        template = "".join(t for t in template.values() if isinstance(t, str))
    template = template if isinstance(template, str) else ""
    added = [t.content for _, t in sorted(reference.added_tokens_decoder.items()) if t.special]
    tokens.extend(token for token in added if token in template)  # the chat special tokens first
    tokens.extend(t for t in reference.all_special_tokens if isinstance(t, str))
    tokens.extend(added)
    unique = list(dict.fromkeys(token for token in tokens if token))
    return [f"Hi{token} there {token}\n" for token in unique[:MAX_SPECIAL_STRINGS]]


def _check_string(reference: Any, ours: TextTokenizer, text: str, folder: Path) -> None:
    expected = [int(i) for i in reference(text)["input_ids"]]
    got = ours.encode(text)
    if got != expected:
        raise ValidationError(
            f"the package's tokenizer gives other ids than the source's for {_shown(text)}: "
            f"package {_ids(got, expected)}, source {_ids(expected, got)}",
            path=folder,
            fix=_FIX,
        )
    wanted = str(reference.decode(expected, skip_special_tokens=True))
    decoded = ours.decode(expected)
    streamed = "".join(ours.decode_stream(iter(expected)))
    for how, text_back in (("decodes", decoded), ("decodes streamed", streamed)):
        if text_back != wanted:
            raise ValidationError(
                f"the package's tokenizer {how} the ids of {_shown(text)} to {_shown(text_back)}, "
                f"the source's to {_shown(wanted)}",
                path=folder,
                fix=_FIX,
            )


def _check_chat_template(reference: Any, ours: TextTokenizer, source_folder: Path, folder: Path) -> str:
    """Render the conversation with the package's template (bounded) first, then with transformers."""
    template = read_chat_template(folder)
    theirs = reference.chat_template
    if template is None or not theirs:
        if template is None and not theirs:
            return "none"
        which = "the package has no chat template" if template is None else "the source has no chat template"
        raise ValidationError(f"{which} but the other has one", path=folder, fix=_FIX)
    variables = special_tokens(folder)
    outcome, messages = "same", list(CONVERSATION)
    try:
        rendered = _render(template, messages, variables)
    except _Rejected as first:
        # A template may reject a system message on purpose (raise_exception, Gemma 2's); a conversation
        # without one must then render, or the first refusal stands. A bound passed is never retried.
        if not first.error.problem.startswith(_FAILED):
            raise _source_error(first.error, source_folder) from None
        messages = [m for m in messages if m["role"] != "system"]
        try:
            rendered = _render(template, messages, variables)
        except _Rejected:
            raise _source_error(first.error, source_folder) from None
        outcome = "no system role"
    try:
        with foreign_template_bounds():  # the source's template, run by transformers: bounded the same way
            expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateLimitError as exc:
        raise SourceError(f"its chat template was stopped: {exc}", path=source_folder, fix=_FIX_SOURCE) from None
    if rendered != expected:
        at = _first_difference(rendered, expected)
        start = max(0, at - 20)
        raise ValidationError(
            f"the package's chat template renders other text than the source's from character {at}: "
            f"package {_shown(rendered[start:])}, source {_shown(expected[start:])}",
            path=folder,
            fix=_FIX,
        )
    # The runtime encodes a rendered prompt as is (templates write their own BOS), as transformers does.
    expected_ids = [int(i) for i in reference(expected, add_special_tokens=False)["input_ids"]]
    got_ids = ours.encode(rendered, add_bos=False)
    if got_ids != expected_ids:
        raise ValidationError(
            f"the package's tokenizer gives other ids than the source's for the rendered chat prompt: "
            f"package {_ids(got_ids, expected_ids)}, source {_ids(expected_ids, got_ids)}",
            path=folder,
            fix=_FIX,
        )
    return outcome


class _Rejected(Exception):
    """Our renderer stopped or failed on the template; ``error`` is its one-line ``UsageError``."""

    def __init__(self, error: UsageError) -> None:
        super().__init__(error.problem)
        self.error = error


def _render(template: str, messages: Sequence[Mapping[str, str]], variables: Mapping[str, str]) -> str:
    try:
        return render_chat(template, messages, add_generation_prompt=True, variables=variables)
    except UsageError as error:
        raise _Rejected(error) from None


_FIX_SOURCE = "fix the source's chat template (chat_template.jinja or tokenizer_config.json) and build again"


def _source_error(error: UsageError, source_folder: Path) -> UsageError:
    return SourceError(
        f"{error.problem} (edgekit's bounded renderer; the package would not chat)",
        path=source_folder,
        fix=_FIX_SOURCE,
    )


def _shown(text: str, limit: int = 60) -> str:
    """``text`` as a one-line literal, shortened."""
    cut = text
    while len(repr(cut)) > limit:
        cut = cut[: min(len(cut) - 1, limit)]
    return repr(cut) if cut == text else f"{cut!r}..."


def _first_difference(a: Sequence[Any], b: Sequence[Any]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _ids(ids: Sequence[int], other: Sequence[int]) -> str:
    """``ids`` shortened around where they first part from ``other``, with their length."""
    start = max(0, _first_difference(ids, other) - 4)
    shown = ", ".join(str(i) for i in ids[start : start + _SHOWN_IDS])
    head = "..., " if start else ""
    tail = ", ..." if start + _SHOWN_IDS < len(ids) else ""
    return f"[{head}{shown}{tail}] ({len(ids)} ids)"
