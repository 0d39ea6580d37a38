"""README.md works as written (issue "What a new user hit"): every code block of the README runs, in a clean folder,
in the order a reader meets them; only the set-up and test commands themselves (which install and which run this
suite) are not rerun here, and are checked for the two things CI depends on."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"```(bash|python)\n(.*?)```", README, flags=re.DOTALL)


def test_the_readme_is_a_short_manual() -> None:
    assert len(README.splitlines()) <= 250
    setup, tests = (body for kind, body in BLOCKS[:2])
    assert "pip install torch==2.13.0" in setup and "edgekit demo" in setup
    assert tests.strip() == "./scripts/test.sh"
    assert "./scripts/test.sh" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


@pytest.mark.slow
def test_every_code_block_runs_as_written(tmp_path: Path, smollm2_package: Path) -> None:
    """The quickstart's shell lines, the server's curl lines, and the Python snippets, in README order.

    ``demo-out`` starts as a copy of the session's demo build (``edgekit build DEMO.gguf --target laptop-cpu``,
    what ``edgekit demo`` runs on an empty folder, tests/test_user_errors.py), so ``edgekit demo`` finds its
    package and asks its question: the same bytes, without building the demo twice in one run."""
    pytest.importorskip("edgekit.demo").demo_gguf_path()
    shutil.copytree(smollm2_package, tmp_path / "demo-out")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for kind, body in BLOCKS[2:]:
        if kind == "bash":
            script = "set -e\n" + body
            done = subprocess.run(
                ["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500
            )
            assert done.returncode == 0, f"{body}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            if "curl" in body:
                assert "Paris" in done.stdout, done.stdout[-3000:]
        else:
            code = f"import os\nos.chdir({str(tmp_path)!r})\n{body}"
            done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=1500)  # fmt: skip
            assert done.returncode == 0, f"{body}\n{done.stderr[-3000:]}"
            if "model.chat" in body:
                assert "Paris" in done.stdout
    assert (tmp_path / "demo-out.tar.gz").is_file() and (tmp_path / "demo-copy" / "manifest.json").is_file()
