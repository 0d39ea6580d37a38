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


@pytest.mark.slow
def test_the_release_files_pass_twine_check(tmp_path: Path) -> None:
    """edgekit is not on PyPI yet; its metadata stays ready: the sdist and wheel pass PyPI's checks."""
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    built = sorted(p.name for p in tmp_path.iterdir())
    assert any(n.endswith(".whl") for n in built) and any(n.endswith(".tar.gz") for n in built), built
    check = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", *map(str, tmp_path.iterdir())],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr
