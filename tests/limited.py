"""Run one of edgekit's front-door checks on files in a child process under an address-space limit.

The child sets ``RLIMIT_AS`` before importing anything of edgekit, imports only the checker's module,
times each call alone, and prints what happened as JSON: the error class and message, or a crash.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

MiB = 1 << 20
_CHILD = r"""
import importlib, json, resource, sys, time
from pathlib import Path
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
module_name, function_name = sys.argv[1].split(":")
function = getattr(importlib.import_module(module_name), function_name)
paths, warm = json.loads(sys.argv[3]), json.loads(sys.argv[4])
for name in warm:
    importlib.import_module(name)
from edgekit.errors import EdgekitError
results = []
for path in paths:
    start = time.perf_counter()
    try:
        function(Path(path))
        result = {"error": None}
    except EdgekitError as exc:
        result = {"error": type(exc).__name__, "message": str(exc), "path": exc.path}
    except BaseException as exc:
        result = {"error": "crash", "message": f"{type(exc).__name__}: {exc}"}
    result["seconds"] = time.perf_counter() - start
    results.append(result)
print(json.dumps(results))
"""


def run_limited(checker: str, paths: list[Path], limit: int, *, warm: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Call ``checker`` (``module:function``) on each path, in one child limited to ``limit`` bytes of address
    space; one result per path.

    ``warm`` names modules imported before the clock starts (the time of a check excludes imports).
    """
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, checker, str(limit), json.dumps([str(p) for p in paths]), json.dumps(warm)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, f"the child died: {done.returncode} {done.stderr[-2000:]}"
    results: list[dict[str, Any]] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def assert_refused_quickly(result: dict[str, Any], path: Path, phrase: str, fix: str) -> None:
    """``result`` (from ``run_limited``) is a one-line ``CorruptFileError`` naming ``path``, in under a second."""
    assert result["error"] == "CorruptFileError", result
    assert result["path"] == str(path)
    message = result["message"]
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert phrase in message
    assert fix in message
    assert result["seconds"] < 1.0, result
