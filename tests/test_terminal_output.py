"""What a new user sees on a real terminal (issue "What a new user hit"): a build under a pseudo-terminal shows
edgekit's progress, not the builder's libraries' log records, which go to OUT/build.log as they do when piped."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a POSIX pseudo-terminal")
LIBRARY_RECORDS = re.compile(r"skip to quantize|\[INFO\]|INFO:")


def run_in_terminal(args: list[str], cwd: Path, timeout: float = 600) -> str:
    """Run ``python -m edgekit.cli ARGS`` with a pseudo-terminal as stdout and stderr; return what it showed."""
    import select
    import subprocess
    import time

    leader, follower = os.openpty()
    env = {**os.environ, "COLUMNS": "100", "TERM": "xterm-256color"}
    process = subprocess.Popen(
        [sys.executable, "-m", "edgekit.cli", *args], stdout=follower, stderr=follower, stdin=follower, cwd=cwd, env=env
    )
    os.close(follower)
    shown = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed: the process ended
                break
            if not chunk:
                break
            shown += chunk
        elif process.poll() is not None:
            break
    process.wait(timeout=30)
    os.close(leader)
    assert process.returncode == 0, shown.decode(errors="replace")[-2000:]
    return shown.decode(errors="replace")


@pytest.mark.slow
def test_a_build_on_a_terminal_shows_no_library_log_records(tiny_checkpoints, tmp_path: Path) -> None:
    shown = run_in_terminal(["build", str(tiny_checkpoints("llama")), "-o", "out", "--no-eval"], tmp_path)
    assert "next: edgekit run" in shown
    assert not LIBRARY_RECORDS.search(shown), LIBRARY_RECORDS.search(shown)
    log = (tmp_path / "out" / "build.log").read_text(encoding="utf-8")
    assert LIBRARY_RECORDS.search(log), "the quantizer's records belong in the build log"


def test_tables_are_never_cut_at_80_columns_or_when_piped() -> None:
    """`edgekit targets` hid its description column, `eval` headers became `perple...`, `bench` ranges `(2.371..`."""
    import io

    from rich.console import Console

    from edgekit.summary import print_bench, print_eval_report, print_targets
    from edgekit.targets import load_targets

    report = {
        "protocol": {"text": "builtin:evaluation", "windows": 20, "ctx": 512},
        "variants": {
            name: {
                "perplexity": 12.345678,
                "ppl_ratio": 1.2345,
                "kl_mean": 0.2734,
                "kl_p99": 2.3456,
                "top1_agreement": 0.7151,
                "bytes": 121_900_000,
                "bits_per_weight": 7.2345,
            }
            for name in ("fp32", "int4-rtn-with-a-long-name")
        },
        "budgets": {},
        "reference_cache": "hit",
    }
    stats = {"median": 2.371234, "min": 2.300001, "max": 2.512345}
    bench = [{"variant": "int4-rtn", "provider": "cpu", "prompt_tokens": 512, "gen_tokens": 128, "runs": 5,
              "ttft_s": stats, "prefill_tps": stats, "decode_tps": stats, "peak_rss_mb": 512.0,
              "model_bytes": 121_900_000}]  # fmt: skip
    for width in (80, 10_000):
        out = io.StringIO()
        console = Console(file=out, width=width, color_system=None)
        print_targets(load_targets(), console)
        print_eval_report(report, console)
        print_bench(bench, console)
        text = out.getvalue()
        assert "…" not in text, text  # rich's ellipsis: a cut value
        words = set(text.replace("│", " ").split())
        for target in load_targets().values():  # every word of every description is shown, wrapped if need be
            assert set(target.description.split()) <= words, target.description
        if width > 80:  # piped: nothing wraps, every value whole on its line
            assert "(2.300..2.512)" in text and "0.2734" in text and "top-1 agree" in text


def test_progress_into_a_log_is_whole_lines_in_order() -> None:
    """Piped into a CI log, a live display cut each step's line at 80 columns and printed it after the notes."""
    import io

    from edgekit.progress import StepReporter

    log = io.StringIO()
    name = "export int4-recipe (int4, cpu) " + "with a name well past eighty columns " * 2 + "[not markup]"
    with StepReporter(stream=log) as reporter:
        with reporter.step(name) as detail:
            detail("window 3/20")
        reporter.print("a note after the step")
        reporter.print(f"[yellow]{'a long warning ' * 12}[/yellow]")
        with pytest.raises(RuntimeError), reporter.step("evaluate"):
            raise RuntimeError
    lines = [line.rstrip() for line in log.getvalue().splitlines()]
    assert lines[0] == f"{name} ..."
    assert lines[1].startswith(f"{name}: done in ") and lines[1].endswith(" MiB)")
    assert lines[2:5] == ["a note after the step", ("a long warning " * 12).rstrip(), "evaluate ..."]
    assert lines[5].startswith("evaluate: failed after ")
    assert [record.name for record in reporter.records] == [name, "evaluate"]
