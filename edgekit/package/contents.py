"""Which files a package may hold: what edgekit's builds write, by name, and nothing else.

A native library, a script or any other file a build never writes has no business in a package; with
this list it cannot even sit there unused, waiting for a config key that would load it.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from edgekit.errors import PackageError

TOP_LEVEL_FILES = frozenset({"manifest.json", "build.log"})
EVAL_FOLDER = "eval"
EVAL_SUFFIXES = (".json", ".md", ".png", ".npz")
VARIANT_FILES = frozenset(
    {
        "genai_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "special_tokens_map.json",
        "generation_config.json",
        "added_tokens.json",
        "vocab.json",
        "merges.txt",
        "tokenizer.model",
    }
)
VARIANT_SUFFIXES = (".onnx", ".onnx.data", ".onnx_data")
_FIX = "rebuild the package with `edgekit build`; a package holds only the files edgekit writes"


def describe_allowed() -> str:
    """The allow-list in words, for errors and docs."""
    return (
        f"{', '.join(sorted(TOP_LEVEL_FILES))}; {EVAL_FOLDER}/*{{{','.join(EVAL_SUFFIXES)}}}; and in each variant "
        f"folder {', '.join(sorted(VARIANT_FILES))} and *{{{','.join(VARIANT_SUFFIXES)}}}"
    )


def is_allowed(relative: str) -> bool:
    """Whether a package-relative path is one edgekit's builds write."""
    parts = PurePosixPath(relative).parts
    if len(parts) == 1:
        return parts[0] in TOP_LEVEL_FILES
    if len(parts) != 2:
        return False
    folder, name = parts
    if folder == EVAL_FOLDER:
        return name.endswith(EVAL_SUFFIXES)
    return name in VARIANT_FILES or name.endswith(VARIANT_SUFFIXES)


def check_contents(relatives: list[str], root: str) -> None:
    """Refuse the first listed path that is not a file edgekit writes, naming it."""
    for relative in sorted(relatives):
        if not is_allowed(relative):
            raise PackageError(
                "is not a file edgekit puts in a package (a package holds only models, configs, tokenizers, "
                "reports and the manifest)",
                path=f"{root}/{relative}",
                fix=_FIX,
            )
