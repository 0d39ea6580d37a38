"""`import edgekit` stays light: no torch or transformers until a build needs them."""

from __future__ import annotations

import subprocess
import sys


def test_import_edgekit_does_not_import_torch() -> None:
    code = (
        "import sys, edgekit, edgekit.runtimes, edgekit.targets, edgekit.package, edgekit.cli;"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_load_and_build_are_reachable_from_the_top_level() -> None:
    import edgekit

    assert callable(edgekit.load)
    assert callable(edgekit.build)
