"""What a new user got wrong, or hit, and the one-line answers they get (a tester's findings, 2026-11-30)."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from edgekit.cli import main
from edgekit.errors import OutputExistsError, UsageError


def test_demo_refuses_a_folder_that_is_not_a_package_and_leaves_it_alone(runner, tmp_path: Path) -> None:
    folder = tmp_path / "mydocs"
    folder.mkdir()
    (folder / "thesis.txt").write_text("years of work", encoding="utf-8")
    result = runner.invoke(main, ["demo", "-o", str(folder)])
    assert result.exit_code == 2, result.output
    assert "not an edgekit package" in result.output and "Traceback" not in result.output
    assert (folder / "thesis.txt").read_text(encoding="utf-8") == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mydocs"]


def test_demo_builds_the_demo_gguf_for_the_default_target_into_an_empty_folder(runner, tmp_path: Path,
                                                                              monkeypatch) -> None:  # fmt: skip
    """What the README's test skips by starting from the session's build of the same file and target."""
    import edgekit.pipeline
    from edgekit.demo import demo_gguf_path
    from edgekit.targets import DEFAULT_TARGET

    calls = []

    def build(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append((args, kwargs))
        raise UsageError("stop here")

    monkeypatch.setattr(edgekit.pipeline, "build", build)
    result = runner.invoke(main, ["demo", "-o", str(tmp_path / "demo-out")])
    assert result.exit_code == 2 and "stop here" in result.output, result.output
    assert calls == [((demo_gguf_path(), tmp_path / "demo-out", DEFAULT_TARGET), {"force": True})]


@pytest.mark.parametrize("target", ["no-such", "edge-cuda"])
def test_a_target_the_package_was_not_built_for_is_refused(runner, tiny_llama_package: Path, target: str) -> None:
    import edgekit

    with pytest.raises(UsageError, match=f"not built for target '{target}'") as info:
        edgekit.load(tiny_llama_package, target=target)
    assert "laptop-cpu-rtn" in info.value.problem
    result = runner.invoke(main, ["run", str(tiny_llama_package), "-p", "hi", "-t", target])
    assert result.exit_code == 2 and result.output.startswith("edgekit: error: "), result.output
    with edgekit.load(tiny_llama_package, target="laptop-cpu-rtn") as model:
        assert model.info.variant == "int4-rtn"


@pytest.mark.parametrize("option", ["--junit", "--markdown"])
def test_a_report_file_that_cannot_be_written_is_refused_before_any_work(runner, tmp_path: Path, option: str) -> None:
    missing_package = tmp_path / "no-package"  # the option is refused first: the package is never read
    for where, phrase in ((tmp_path, "is a folder"), (tmp_path / "none" / "x.xml", "not an existing folder")):
        result = runner.invoke(main, ["check", str(missing_package), "-t", "laptop-cpu", option, str(where)])
        assert result.exit_code == 2, result.output
        assert phrase in result.output and option in result.output and "Traceback" not in result.output


def test_bench_json_into_a_folder_is_refused(runner, tmp_path: Path) -> None:
    result = runner.invoke(main, ["bench", str(tmp_path / "no-package"), "--json", str(tmp_path)])
    assert result.exit_code == 2 and "is a folder" in result.output, result.output


def test_an_output_another_command_made_meanwhile_is_not_replaced_without_force(tmp_path: Path) -> None:
    from edgekit.package.staging import staged_output

    out = tmp_path / "out"
    with (
        pytest.raises(OutputExistsError, match="appeared while this command ran"),
        staged_output(out, force=False) as staging,
    ):
        (staging / "mine.txt").write_text("mine", encoding="utf-8")
        out.mkdir()
        (out / "theirs.txt").write_text("theirs", encoding="utf-8")
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with staged_output(out, force=True) as staging:
        (staging / "mine.txt").write_text("mine", encoding="utf-8")
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]


@pytest.fixture
def default_sigint():  # type: ignore[no-untyped-def]
    """A test run started in the background by a shell inherits SIGINT ignored: give the CLI the default."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_at_the_chat_prompt_exits_130(runner, tiny_llama_package: Path, monkeypatch, default_sigint) -> None:
    from edgekit import interrupts

    def interrupted_prompt(*args, **kwargs):  # type: ignore[no-untyped-def]
        interrupts._interrupted.set()  # what the SIGINT handler records before click turns it into Abort
        raise click.Abort

    monkeypatch.setattr(click, "prompt", interrupted_prompt)
    monkeypatch.setattr("os._exit", lambda code: (_ for _ in ()).throw(SystemExit(code)))  # not the test's process
    result = runner.invoke(main, ["run", str(tiny_llama_package), "--chat"])
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.output

    monkeypatch.setattr(click, "prompt", lambda *a, **k: (_ for _ in ()).throw(click.Abort()))
    result = runner.invoke(main, ["run", str(tiny_llama_package), "--chat"])
    assert result.exit_code == 0, result.output  # end of input (Ctrl-D) still ends the chat normally


def test_a_chat_template_file_that_does_not_compile_is_named_before_the_model_loads(runner, tmp_path: Path) -> None:
    template = tmp_path / "bad.jinja"
    template.write_text("{% for %}", encoding="utf-8")
    missing_package = tmp_path / "no-package"  # refused first: the package is never read
    result = runner.invoke(main, ["run", str(missing_package), "-p", "hi", "--chat-template", str(template)])
    assert result.exit_code == 2, result.output
    assert str(template) in result.output and "does not compile" in result.output


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["-p", "hi \udcff"], "the text is not valid Unicode: it holds '\\udcff'"),  # a non-UTF-8 byte in argv
        (["-p", "hi", "--seed", str(2**31)], "--seed"),
        (["-p", "hi", "--top-k", str(2**31)], "--top-k"),
    ],
)  # fmt: skip
def test_run_refuses_text_and_numbers_the_runtime_cannot_take(runner, tiny_llama_package: Path, args, phrase) -> None:
    """A lone surrogate ended in a traceback from tokenizers; a 2**31 seed failed inside onnxruntime-genai."""
    result = runner.invoke(main, ["run", str(tiny_llama_package), *args])
    assert result.exit_code == 2, result.output
    assert phrase in result.output and "Traceback" not in result.output


def test_chat_input_that_is_not_utf8_is_one_line(runner, tiny_llama_package: Path, monkeypatch) -> None:
    """Under a UTF-8 locale Python reads stdin strictly: a stray byte was a UnicodeDecodeError traceback."""

    def undecodable(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    monkeypatch.setattr(click, "prompt", undecodable)
    result = runner.invoke(main, ["run", str(tiny_llama_package), "--chat"])
    assert result.exit_code == 2, result.output
    assert "the chat input is not UTF-8 text" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("where", ["/dev/full", "/proc/version", "stdout"])
def test_report_files_that_cannot_be_written_are_one_line(runner, tiny_llama_package: Path, where: str,
                                                          tmp_path: Path) -> None:  # fmt: skip
    """A full disk or a path the system refuses was an OSError traceback; /dev/stdout still works."""
    import os

    path = "/dev/stdout" if where == "stdout" else where
    if not os.path.exists(path):
        pytest.skip(f"{path} is not on this system")
    before = os.stat(path, follow_symlinks=False)
    result = runner.invoke(main, ["bench", str(tiny_llama_package), "--runs", "1", "--gen-tokens", "2",
                                  "--prompt-tokens", "8", "--json", path])  # fmt: skip
    if where == "stdout":
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code == 2, result.output
        assert f"{path}: cannot be written" in result.output and "Traceback" not in result.output
    after = os.stat(path, follow_symlinks=False)
    assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)  # the device is still the device
