"""The wheel ships targets.yaml inside the package, identical to the repository's copy."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_contains_targets_yaml(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("edgekit-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read("edgekit/targets.yaml") == (ROOT / "targets.yaml").read_bytes()
        assert "edgekit/cli.py" in archive.namelist()
