"""What one build is: the caller's settings and the context its steps (``build_steps.py``) fill in as they go."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekit.accuracy.evaluate import DEFAULT_CTX, DEFAULT_WINDOWS
from edgekit.accuracy.texts import Corpus
from edgekit.exporters.tokenizer_parity import TokenizerParity
from edgekit.exporters.validate import ParityResult
from edgekit.progress import StepReporter
from edgekit.sources.checkpoint import CheckedFolder, SourceSpec
from edgekit.targets import Target
from edgekit.tokenizer_record import TokenizerRule
from edgekit.variants import VariantSpec

BUILD_LOG = "build.log"


@dataclass(frozen=True)
class EvalSettings:
    """How a build evaluates its variants (``None`` in place of this: it does not)."""

    corpus: Corpus | None = None
    """The text to score; the built-in corpus's evaluation part by default."""
    windows: int = DEFAULT_WINDOWS
    ctx: int = DEFAULT_CTX


@dataclass(frozen=True)
class CalibrationSettings:
    """Calibration of GPTQ variants: text, sample count and length, seed."""

    corpus: Corpus | None = None
    """The text to calibrate on; the built-in corpus's calibration part by default."""
    samples: int = 128
    seq_len: int = 512
    seed: int = 0


@dataclass(frozen=True)
class BuildOptions:
    """What the caller asked of the build beyond source, output and target."""

    allow_pickle: bool = False
    evaluation: EvalSettings | None = EvalSettings()
    calibration: CalibrationSettings = CalibrationSettings()
    streaming: bool = False
    targets_file: Path | None = None


@dataclass(frozen=True)
class PreparedSource:
    """The source staged as a Hugging Face folder the builder reads, with what its checks found."""

    folder: Path
    checked: CheckedFolder
    files: list[Path]
    """The user's weight files (or GGUF file), hashed into the manifest."""
    parameters: int
    rule: TokenizerRule


@dataclass
class BuildContext:
    """One build: its inputs, where it writes, and what each step has produced so far."""

    spec: SourceSpec
    target: Target
    options: BuildOptions
    staging: Path
    work: Path
    reporter: StepReporter
    prechecked: CheckedFolder | None
    warnings: list[str] = field(default_factory=list)
    source: PreparedSource | None = None
    plan: list[VariantSpec] = field(default_factory=list)
    folders: dict[str, Path] = field(default_factory=dict)
    """Variant name -> the folder it is exported from, where not the staged source (GPTQ, a reference)."""
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    parity: ParityResult | None = None
    tokenizer_parity: TokenizerParity | None = None
    recipe_dropped: str | None = None
    """Why the target's recipe is not built (memory), where the build (whole or streamed) runs without it."""

    @property
    def log_path(self) -> Path:
        """The build log inside the package."""
        return self.staging / BUILD_LOG

    @property
    def prepared(self) -> PreparedSource:
        """The prepared source (after the first step)."""
        if self.source is None:
            raise RuntimeError("the build's source is not prepared yet")
        return self.source
