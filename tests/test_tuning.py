"""``edgekit tune``: the candidates, the choice, the record in the user's cache (untrusted), and ``load`` using it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import edgekit.runtimes.model as runtime_model
from edgekit.cli import main
from edgekit.runtimes import tuning
from edgekit.runtimes.cpu_threads import physical_cores
from edgekit.runtimes.tuning import (
    Measurement,
    RuntimeSettings,
    TuningRecord,
    candidates,
    choose,
    read_tuning,
    record_path,
    write_tuning,
)

HASH = "ab" * 32


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty user cache for this test."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def settings(threads: int, arena: bool = True) -> RuntimeSettings:
    return RuntimeSettings(threads=threads, cpu_mem_arena=arena)


def measured(*scores: tuple[RuntimeSettings, float, float]) -> list[Measurement]:
    return [Measurement(settings=s, prefill_tps=p, decode_tps=d) for s, p, d in scores]


def record(chosen: RuntimeSettings, manifest: str = HASH, variant: str = "int4-rtn") -> TuningRecord:
    return TuningRecord(
        variant_sha256=manifest,
        variant=variant,
        machine=tuning.machine_class(),
        prompt_tokens=16,
        settings=chosen,
        measured=measured((settings(physical_cores()), 100.0, 10.0), (chosen, 120.0, 12.0)),
    )


CHUNK = tuning.DEFAULT_PREFILL_CHUNK


@pytest.mark.parametrize(
    ("cores", "logical", "others"),
    [(2, 2, [(1, True, CHUNK)]), (4, 8, [(8, True, CHUNK), (2, True, CHUNK)]), (1, 1, []), (6, 6, [(3, True, CHUNK)])],
)
def test_the_default_comes_first_then_the_arena_the_prompt_pieces_then_other_thread_counts(
    cores, logical, others
) -> None:
    first = [(cores, True, CHUNK), (cores, False, CHUNK), (cores, True, None), (cores, True, CHUNK // 2)]
    assert [(c.threads, c.cpu_mem_arena, c.prefill_chunk) for c in candidates(cores, logical)] == first + others


def test_a_candidate_within_the_margin_does_not_replace_the_default() -> None:
    default, other = settings(2), settings(1)
    assert choose(measured((default, 100, 10), (other, 104, 10.3))) == default
    assert choose(measured((default, 100, 10), (other, 110, 10.0))) == default  # sqrt(1.1) < 1.05
    assert choose(measured((default, 100, 10), (other, 112, 11.2))) == other
    assert choose(measured((default, 100, 10), (other, 300, 3.0))) == default  # prefill alone does not decide


def test_a_record_round_trips_for_its_package_variant_and_machine_only(cache: Path, monkeypatch) -> None:
    path = write_tuning(record(settings(1, False)))
    assert path.is_relative_to(cache) and path.parent.name == "tuning"
    assert read_tuning(HASH, "int4-rtn") == settings(1, False)
    assert read_tuning("cd" * 32, "int4-rtn") is None
    assert read_tuning(HASH, "fp32") is None
    monkeypatch.setattr(tuning, "machine_class", lambda: "another CPU | avx2 | 2 cores, 2 logical")
    assert read_tuning(HASH, "int4-rtn") is None


def _tamper(document: dict, change: str) -> dict | str:
    if change == "zero threads":
        document["settings"]["threads"] = 0
    elif change == "more threads than usable CPUs":
        document["settings"]["threads"] = len(os.sched_getaffinity(0)) + 1
    elif change == "an unknown key":
        document["settings"]["custom_ops_library"] = "/tmp/evil.so"
    elif change == "NaN speed":
        document["measured"][0]["decode_tps"] = float("nan")
    elif change == "another manifest inside":
        document["variant_sha256"] = "cd" * 32
    elif change == "a piece under the bound":
        document["settings"]["prefill_chunk"] = 8
    elif change == "a record from before prompt pieces":  # measured in one pass: its choice is not this one's
        document["format"] = 2
        for entry in [document["settings"], *(m["settings"] for m in document["measured"])]:
            del entry["prefill_chunk"]
    elif change == "not JSON":
        return "{ not json"
    elif change == "huge":
        return " " * (tuning._MAX_RECORD_BYTES + 1) + "{}"
    return document


@pytest.mark.parametrize(
    "change",
    ["zero threads", "more threads than usable CPUs", "an unknown key", "NaN speed", "another manifest inside",
     "a piece under the bound", "a record from before prompt pieces", "not JSON", "huge"],
)  # fmt: skip
def test_a_tampered_record_is_ignored(cache: Path, change: str) -> None:
    path = write_tuning(record(settings(1)))
    tampered = _tamper(json.loads(path.read_text()), change)
    path.write_text(tampered if isinstance(tampered, str) else json.dumps(tampered), encoding="utf-8")
    assert read_tuning(HASH, "int4-rtn") is None


def test_a_fifo_in_place_of_the_record_is_ignored_without_blocking(cache: Path) -> None:
    path = record_path(HASH, "int4-rtn", tuning.machine_class())
    path.parent.mkdir(parents=True)
    os.mkfifo(path)
    assert read_tuning(HASH, "int4-rtn") is None


def _spy_settings(monkeypatch) -> list[RuntimeSettings]:
    seen: list[RuntimeSettings] = []
    original = runtime_model._genai_config

    def spy(og, folder, provider, strict, runtime):
        seen.append(runtime)
        return original(og, folder, provider, strict, runtime)

    monkeypatch.setattr(runtime_model, "_genai_config", spy)
    return seen


def test_load_applies_the_record_unless_told_otherwise(tiny_llama_package: Path, cache: Path, monkeypatch) -> None:
    seen = _spy_settings(monkeypatch)
    with runtime_model.load(tiny_llama_package) as model:
        assert model.info.settings_from == "default"
        manifest_hash, variant = model.info.variant_sha256, model.info.variant
    write_tuning(record(RuntimeSettings(threads=1, cpu_mem_arena=False, prefill_chunk=None), manifest_hash, variant))
    with runtime_model.load(tiny_llama_package) as model:
        assert (model.info.threads, model.info.cpu_mem_arena, model.info.settings_from) == (1, False, "tuned")
        assert model.info.prefill_chunk is None
        assert model.info.describe() == f"{variant} on cpu, tuned: 1 thread, arena off, prompt in one pass"
        assert len(model.generate_tokens([5, 6, 7], max_new_tokens=3)) == 3
    with runtime_model.load(tiny_llama_package, tuned=False) as model:
        assert model.info.settings_from == "default" and model.info.cpu_mem_arena
    with runtime_model.load(tiny_llama_package, threads=1) as model:
        assert (model.info.threads, model.info.settings_from) == (1, "given")
    with runtime_model.load(tiny_llama_package, threads=0) as model:  # 0: automatic, as onnxruntime's
        assert model.info.settings_from == "tuned"
    cores = physical_cores()
    assert [(s.threads, s.cpu_mem_arena) for s in seen] == [(cores, True), (1, False), (cores, True), (1, True),
                                                            (1, False)]  # fmt: skip


@pytest.mark.parametrize("threads", [-1, True, "2", 10**6, "settings"])
def test_a_thread_count_outside_the_usable_cpus_is_a_usage_error(tiny_llama_package: Path, threads) -> None:
    from edgekit.errors import UsageError
    from edgekit.runtimes.cpu_threads import usable_cpus

    cpus = len(usable_cpus())
    given = {"settings": RuntimeSettings(threads=cpus + 1)} if threads == "settings" else {"threads": threads}
    with pytest.raises(UsageError, match=rf"threads must be an integer in 1\.\.{cpus} \(the CPUs"):
        runtime_model.load(tiny_llama_package, **given)


def test_tune_measures_every_candidate_records_the_choice_and_run_uses_it(
    runner, tiny_llama_package: Path, cache: Path
) -> None:
    options = ["--rounds", "1", "--prompt-tokens", "16", "--gen-tokens", "4"]
    dry = runner.invoke(main, ["tune", str(tiny_llama_package), *options, "--dry-run"], env={"COLUMNS": "200"})
    assert dry.exit_code == 0, dry.output
    assert "not recorded (--dry-run)" in dry.stdout
    assert not (cache / "edgekit" / "tuning").exists()

    result = runner.invoke(main, ["tune", str(tiny_llama_package), *options], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    labels = [c.label() for c in candidates(physical_cores(), len(os.sched_getaffinity(0)))]
    assert all(label in result.stdout for label in labels)
    (path,) = (cache / "edgekit" / "tuning").iterdir()
    saved = TuningRecord.model_validate_json(path.read_text())
    assert [m.settings.label() for m in saved.measured] == labels
    assert saved.settings.label() in labels and f"recorded in {path}" in result.stdout.replace("\n", "")

    run = runner.invoke(main, ["run", str(tiny_llama_package), "--prompt", "hi", "--max-new-tokens", "2"])
    assert run.exit_code == 0, run.output
    assert f"tuned: {saved.settings.label()}]" in run.stderr


@pytest.mark.parametrize(
    ("options", "message"),
    [(["--gen-tokens", "1"], "--gen-tokens"), (["--rounds", "0"], "--rounds"), (["--variant", "nope"], "nope")],
)
def test_tune_refuses_bad_options_in_one_line(runner, tiny_llama_package: Path, cache: Path, options, message) -> None:
    result = runner.invoke(main, ["tune", str(tiny_llama_package), *options])
    assert result.exit_code != 0
    assert message in result.stderr and "Traceback" not in result.output
    assert not (cache / "edgekit" / "tuning").exists()


def test_tune_on_a_folder_that_is_no_package_is_one_line(runner, tmp_path: Path, cache: Path) -> None:
    result = runner.invoke(main, ["tune", str(tmp_path)])
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgekit: error: ") and str(tmp_path) in lines[0]


def test_a_candidate_whose_generations_all_ended_at_once_is_an_error_not_a_speed() -> None:
    from edgekit.errors import UsageError
    from edgekit.runtimes.tune import _measurement

    assert _measurement(settings(2), [(100.0, None), (110.0, 9.0), (90.0, 11.0)]).decode_tps == 10.0
    with pytest.raises(UsageError, match="ended at its first token"):
        _measurement(settings(2), [(100.0, None), (120.0, None)])


def test_a_record_survives_an_evaluation_rewriting_the_manifest(
    tiny_llama_package: Path, cache: Path, tmp_path
) -> None:
    import shutil

    from edgekit.package.manifest import read_manifest, write_manifest

    root = Path(shutil.copytree(tiny_llama_package, tmp_path / "pkg"))
    with runtime_model.load(root) as model:
        fingerprint, variant = model.info.variant_sha256, model.info.variant
    write_tuning(record(settings(1, False), fingerprint, variant))
    manifest = read_manifest(root)
    manifest["evaluation"] = {"protocol": "a later edgekit eval", "windows": 1}  # what eval rewrites
    write_manifest(root, manifest)
    with runtime_model.load(root) as model:
        assert model.info.variant_sha256 == fingerprint and model.info.settings_from == "tuned"
    manifest["variants"][variant]["accuracy_level"] = 0  # another model: the record does not apply
    write_manifest(root, manifest)
    with runtime_model.load(root) as model:
        assert model.info.variant_sha256 != fingerprint and model.info.settings_from == "default"


@pytest.mark.parametrize(
    ("length", "chunk", "sizes"),
    [
        (40, 16, [13, 13, 14]),
        (32, 16, [16, 16]),
        (33, 16, [11, 11, 11]),
        (5, 16, [5]),
        (7, None, [7]),
        (17, 16, [8, 9]),
        (257, 256, [128, 129]),
    ],
)
def test_a_prompt_is_cut_into_consecutive_pieces(length: int, chunk: int | None, sizes: list[int]) -> None:
    tokens = list(range(length))
    pieces = runtime_model.prompt_pieces(tokens, chunk)
    assert [len(p) for p in pieces] == sizes and [t for p in pieces for t in p] == tokens


def test_a_bad_piece_size_is_refused_not_an_empty_prompt() -> None:
    for chunk in (0, -1):
        with pytest.raises(ValueError, match="at least one token"):
            runtime_model.prompt_pieces([1, 2, 3], chunk)


class _RecordingGenai:
    """onnxruntime-genai with each ``append_tokens`` call's length recorded."""

    def __init__(self, og) -> None:
        self._og, self.appended = og, []

    def __getattr__(self, name: str):
        return getattr(self._og, name)

    def Generator(self, *args):  # onnxruntime-genai's name
        generator, appended = self._og.Generator(*args), self.appended

        class Recorded:
            def __getattr__(self, name: str):
                return getattr(generator, name)

            def append_tokens(self, tokens) -> None:
                appended.append(len(tokens))
                generator.append_tokens(tokens)

        return Recorded()


def test_a_prompt_in_pieces_generates_what_one_pass_does(tiny_llama_package: Path) -> None:
    prompt = [5 + (7 * i) % 200 for i in range(40)]
    made, appended = {}, {}
    for chunk in (None, 16):
        with runtime_model.load(tiny_llama_package, settings=RuntimeSettings(threads=1, prefill_chunk=chunk)) as model:
            assert model.info.prefill_chunk == chunk
            model._og = recording = _RecordingGenai(model._og)
            made[chunk] = model.generate_tokens(prompt, max_new_tokens=8)
            appended[chunk] = recording.appended
    assert appended == {None: [40], 16: [13, 13, 14]}
    assert made[16] == made[None] and len(made[None]) == 8


@pytest.mark.parametrize("chunk", [0, 8, 1 << 21])
def test_a_record_with_a_prompt_piece_out_of_bounds_is_refused(chunk: int) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        RuntimeSettings(threads=1, prefill_chunk=chunk)


def test_a_gpu_provider_takes_the_prompt_whole(tiny_llama_package: Path, monkeypatch) -> None:
    start = runtime_model._start
    monkeypatch.setattr(runtime_model, "_start", lambda *args: (start(*args)[0], "cuda", []))
    with runtime_model.load(tiny_llama_package, settings=RuntimeSettings(threads=1, prefill_chunk=16)) as model:
        assert model.info.provider == "cuda" and model.info.prefill_chunk is None


def test_tune_of_a_gpu_variant_leaves_out_the_prompt_pieces(tiny_llama_package: Path, cache: Path, monkeypatch) -> None:
    from edgekit.runtimes.tune import TuneSettings, tune_package

    start = runtime_model._start
    monkeypatch.setattr(runtime_model, "_start", lambda *args: (start(*args)[0], "cuda", []))
    result = tune_package(tiny_llama_package, settings=TuneSettings(1, 16, 4), record=False)
    expected = candidates(physical_cores(), len(os.sched_getaffinity(0)), pieces=False)
    assert [m.settings for m in result.record.measured] == expected
    assert len(expected) == len(candidates(physical_cores(), len(os.sched_getaffinity(0)))) - 2
    assert all(s.prefill_chunk is None and "in one pass" in s.label() for s in expected)
