"""The server's scheduler on a fake model: fair turns, a first-in first-out queue, cancellation that frees a slot
and closes the generation, finish reasons, stop strings, timeouts, and the Prometheus text."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from edgekit.runtimes.generation import GenerationConfig
from edgekit.serve.engine import GenerationTimeoutError, Job, QueueFullError, Scheduler
from edgekit.serve.metrics import Metrics

EOS = 2


class FakeTokenizer:
    def decode_stream(self, ids: Iterator[int]) -> Iterator[str]:
        for token in ids:
            if token != EOS:
                yield f"<{token}>"


class FakeModel:
    """Each prompt is ``[name]``; it yields ``name*100 + i`` for i in range(length), then EOS if ``ends``."""

    def __init__(self, length: int = 5, ends: bool = False, delay: float = 0.0) -> None:
        self.tokenizer = FakeTokenizer()
        self.length, self.ends, self.delay = length, ends, delay
        self.steps: list[int] = []
        self.closed: list[int] = []

    def token_stream(self, tokens: list[int], config: GenerationConfig) -> Iterator[int]:
        name = tokens[0]
        try:
            for i in range(min(self.length, config.max_new_tokens)):
                time.sleep(self.delay)
                self.steps.append(name)
                yield name * 100 + i
            if self.ends and self.length < config.max_new_tokens:
                yield EOS
        finally:
            self.closed.append(name)


def job(name: int, max_tokens: int = 8, stop: tuple[str, ...] = ()) -> Job:
    config = GenerationConfig(max_new_tokens=max_tokens, stop=stop)
    return Job([name], config, max_tokens, frozenset({EOS}), asyncio.get_running_loop())


async def run(scheduler: Scheduler, item: Job, deadline: float | None = None) -> str:
    scheduler.submit(item)
    return "".join([piece async for piece in scheduler.pieces(item, deadline)])


def test_active_requests_take_turns_and_the_queue_is_first_in_first_out() -> None:
    model = FakeModel(length=3)
    scheduler = Scheduler(model, max_concurrency=2, max_queue=10)

    async def main() -> list[str]:
        jobs = [job(n) for n in (1, 2, 3)]
        return await asyncio.gather(*(run(scheduler, j) for j in jobs))

    try:
        texts = asyncio.run(main())
    finally:
        scheduler.close()
    assert texts == ["<100><101><102>", "<200><201><202>", "<300><301><302>"]
    # The two slots alternate step by step (the first may start a step before the second arrives).
    assert sorted(model.steps[:6]) == [1, 1, 1, 2, 2, 2]
    assert model.steps[1:6] in ([2, 1, 2, 1, 2], [1, 2, 1, 2, 2])
    assert model.steps[6:] == [3, 3, 3]  # the third waited for a slot


def test_finish_reasons() -> None:
    async def main() -> list[tuple[str, int]]:
        outcomes = []
        for model, max_tokens in ((FakeModel(length=3, ends=True), 8), (FakeModel(length=9), 4)):
            scheduler = Scheduler(model, 1, 1)
            item = job(1, max_tokens)
            await run(scheduler, item)
            scheduler.close()
            assert item.outcome is not None
            outcomes.append((item.outcome.finish_reason, item.outcome.completion_tokens))
        return outcomes

    assert asyncio.run(main()) == [("stop", 4), ("length", 4)]


def test_stop_strings_cut_the_text_and_end_the_generation() -> None:
    model = FakeModel(length=9)
    scheduler = Scheduler(model, 1, 1)

    async def main() -> tuple[str, Job]:
        item = job(1, stop=("<103>",))
        return await run(scheduler, item), item

    try:
        text, item = asyncio.run(main())
    finally:
        scheduler.close()
    assert text == "<100><101><102>"
    assert item.outcome is not None and item.outcome.finish_reason == "stop"
    assert len(model.steps) < 9 and model.closed == [1]


def test_cancelling_a_running_job_closes_its_generation_and_frees_the_slot() -> None:
    model = FakeModel(length=1000, delay=0.002)
    scheduler = Scheduler(model, max_concurrency=1, max_queue=5)

    async def main() -> str:
        first = job(1, max_tokens=1000)
        scheduler.submit(first)
        pieces = scheduler.pieces(first)
        await pieces.__anext__()
        await pieces.aclose()  # the consumer leaves: the job is cancelled
        return await asyncio.wait_for(run(scheduler, job(2, max_tokens=3)), 10)

    try:
        assert asyncio.run(main()) == "<200><201><202>"
    finally:
        scheduler.close()
    assert model.closed[0] == 1 and model.steps.count(1) < 1000
    assert scheduler.active_count == 0 and scheduler.queue_length == 0


def test_a_cancelled_waiting_job_leaves_the_queue_at_once() -> None:
    model = FakeModel(length=50, delay=0.005)
    scheduler = Scheduler(model, max_concurrency=1, max_queue=5)

    async def main() -> None:
        running, waiting = job(1, 50), job(2, 50)
        scheduler.submit(running)
        while scheduler.active_count == 0:
            await asyncio.sleep(0.001)
        scheduler.submit(waiting)
        assert scheduler.queue_length == 1
        scheduler.cancel(waiting)
        assert scheduler.queue_length == 0
        assert [p async for p in scheduler.pieces(running)]

    try:
        asyncio.run(main())
    finally:
        scheduler.close()
    assert 2 not in model.steps


def test_a_full_queue_refuses() -> None:
    model = FakeModel(length=100, delay=0.01)
    scheduler = Scheduler(model, max_concurrency=1, max_queue=1)

    async def main() -> None:
        jobs = [job(n, 100) for n in (1, 2)]
        for item in jobs:
            scheduler.submit(item)
        while scheduler.active_count == 0:
            await asyncio.sleep(0.001)
        with pytest.raises(QueueFullError):
            scheduler.submit(job(3))
        for item in jobs:
            scheduler.cancel(item)

    try:
        asyncio.run(main())
    finally:
        scheduler.close()


def test_a_deadline_cancels_the_job() -> None:
    model = FakeModel(length=1000, delay=0.005)
    scheduler = Scheduler(model, 1, 1)

    async def main() -> None:
        item = job(1, 1000)
        with pytest.raises(GenerationTimeoutError):
            await run(scheduler, item, deadline=time.perf_counter() + 0.1)

    try:
        asyncio.run(main())
        deadline = time.monotonic() + 5
        while scheduler.active_count and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        scheduler.close()
    assert model.closed == [1] and len(model.steps) < 1000


def test_a_failing_step_fails_that_request_only() -> None:
    class Broken(FakeModel):
        def token_stream(self, tokens: list[int], config: GenerationConfig) -> Iterator[int]:
            if tokens[0] == 1:
                raise RuntimeError("onnxruntime failed")
            yield from super().token_stream(tokens, config)

    scheduler = Scheduler(Broken(length=2), 2, 2)

    async def main() -> list[Any]:
        return await asyncio.gather(run(scheduler, job(1)), run(scheduler, job(2)), return_exceptions=True)

    try:
        failed, fine = asyncio.run(main())
    finally:
        scheduler.close()
    assert isinstance(failed, RuntimeError) and fine == "<200><201>"


def test_metrics_are_prometheus_text() -> None:
    metrics = Metrics()
    metrics.count_request("/v1/chat/completions", 200)
    metrics.record_generation(10, 5, 0.2, 0.4, 0.6)
    text = metrics.render({"edgekit_queue_length": ("Waiting.", 3)})
    assert 'edgekit_requests_total{endpoint="/v1/chat/completions",status="200"} 1' in text
    assert "edgekit_prompt_tokens_total 10" in text and "edgekit_completion_tokens_total 5" in text
    assert 'edgekit_time_to_first_token_seconds_bucket{le="0.25"} 1' in text
    assert 'edgekit_decode_tokens_per_second_bucket{le="10"} 1' in text  # 4 tokens after the first in 0.4 s
    assert "# TYPE edgekit_queue_length gauge" in text and "edgekit_queue_length 3" in text
    for line in text.splitlines():
        assert line.startswith("#") or len(line.rsplit(" ", 1)) == 2
