"""Thread counts for onnxruntime: one per physical core the process may use, set explicitly on every load."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgekit.runtimes import model as runtime_model
from edgekit.runtimes.cpu_threads import physical_cores, usable_cpus
from edgekit.runtimes.tuning import RuntimeSettings


def fake_topology(root: Path, cores: dict[int, tuple[int, int]]) -> Path:
    """A /sys/devices/system/cpu tree where logical CPU -> (package, core)."""
    for cpu, (package, core) in cores.items():
        topology = root / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text(f"{package}\n")
        (topology / "core_id").write_text(f"{core}\n")
    return root


def test_hyperthread_siblings_count_once(tmp_path: Path) -> None:
    # 2 packages x 2 cores x 2 threads: 8 logical CPUs, 4 physical cores.
    layout = {cpu: (cpu // 4, (cpu // 2) % 2) for cpu in range(8)}
    sys_cpu = fake_topology(tmp_path, layout)
    assert physical_cores(set(range(8)), sys_cpu) == 4
    assert physical_cores({0, 1}, sys_cpu) == 1  # two siblings of one core
    assert physical_cores({0, 2, 4}, sys_cpu) == 3


def test_without_topology_every_logical_cpu_counts(tmp_path: Path) -> None:
    assert physical_cores({0, 1, 2}, tmp_path / "missing") == 3
    assert physical_cores(set(), tmp_path / "missing") == 1


def test_this_machine_has_at_least_one_usable_core() -> None:
    assert 1 <= physical_cores() <= len(usable_cpus())


@pytest.mark.parametrize("threads", [None, 1])
def test_every_load_sets_the_thread_counts(tiny_llama_package, monkeypatch, threads) -> None:
    seen: list[dict] = []
    original = runtime_model._genai_config

    def spy(og, folder, provider, strict, runtime):
        config = original(og, folder, provider, strict, runtime)
        seen.append({"threads": runtime.threads})
        return config

    monkeypatch.setattr(runtime_model, "_genai_config", spy)
    with runtime_model.load(tiny_llama_package, threads=threads) as model:
        expected = threads or physical_cores()
        assert model.info.threads == expected
        assert seen == [{"threads": expected}]
        assert len(model.generate_tokens([5, 6, 7], max_new_tokens=3)) == 3


@pytest.mark.parametrize("arena", [True, False])
def test_onnxruntime_genai_accepts_the_session_options(tiny_llama_package, arena: bool) -> None:
    # og.Config validates an overlay's keys and raises on unknown ones (as it does for config_entries).
    og = pytest.importorskip("onnxruntime_genai")
    runtime = RuntimeSettings(threads=3, cpu_mem_arena=arena)
    config = runtime_model._genai_config(og, tiny_llama_package / "int4-rtn", "cpu", False, runtime)
    model = og.Model(config)
    assert og.Tokenizer(model) is not None
