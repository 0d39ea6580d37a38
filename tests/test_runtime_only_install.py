"""A runtime-only install (`pip install edgekit`: no torch, no transformers) loads and runs a package."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = """
import importlib.util, sys
assert importlib.util.find_spec("torch") is None, "torch is installed in the runtime-only environment"
assert importlib.util.find_spec("transformers") is None
import edgekit
with edgekit.load(sys.argv[1]) as model:
    text = model.generate("hello world", max_new_tokens=6)
    print("variant", model.info.variant, "provider", model.info.provider, "text", repr(text))
assert "torch" not in sys.modules
"""


@pytest.mark.slow
def test_runtime_only_environment_loads_and_generates(tiny_llama_package: Path, tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("edgekit-*.whl")
    env_dir = tmp_path / "runtime-venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    run = subprocess.run([str(python), "-c", SCRIPT, str(tiny_llama_package)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "variant int4-rtn provider cpu" in run.stdout
