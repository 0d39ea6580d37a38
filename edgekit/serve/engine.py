"""The scheduler between the event loop and the model: a fair queue and one decode thread.

Requests wait in a first-in, first-out queue until one of ``max_concurrency`` slots is free. One worker
thread advances the active requests in turn, one text piece each per round, so every stream gets its
tokens as they are made and a long answer cannot starve a short one. The model runs one step at a time
anyway (``Model.token_stream`` holds its lock for each step), so a single thread loses no throughput and
keeps the order of turns exact. A cancelled request (its client went away, or it ran out of time) leaves
the queue at once, or has its generation closed at the worker's next turn, which frees its slot.

Pieces cross to the event loop with ``call_soon_threadsafe``; the event loop never waits on the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from edgekit.runtimes.generation import GenerationConfig, cut_at_stop


class QueueFullError(Exception):
    """More requests are waiting than the server queues."""


class GenerationTimeoutError(Exception):
    """A request ran past its time limit (waiting and generating together)."""

    def __init__(self, completion_tokens: int) -> None:
        super().__init__(f"the request ran out of time after {completion_tokens} generated tokens")
        self.completion_tokens = completion_tokens


class ModelRunner(Protocol):
    """What the scheduler needs of a model: token generation and streaming decoding."""

    tokenizer: Any

    def token_stream(self, tokens: list[int], config: GenerationConfig) -> Iterator[int]: ...


@dataclass(frozen=True)
class Outcome:
    """How a generation ended: ``finish_reason`` is OpenAI's ``stop`` or ``length``."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(eq=False)
class Job:
    """One request's generation: its inputs, its progress, and the channel its pieces come through."""

    ids: list[int]
    config: GenerationConfig
    allowed: int
    """New tokens that fit (``max_tokens``, bounded by the context); reaching it ends with ``length``."""
    eos_ids: frozenset[int]
    loop: asyncio.AbstractEventLoop
    channel: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    submitted: float = field(default_factory=time.perf_counter)
    first_piece_at: float | None = None
    finished_at: float | None = None
    completion_tokens: int = 0
    last_token: int | None = None
    hit_stop_string: bool = False
    cancelled: bool = False
    outcome: Outcome | None = None
    pieces: Generator[str, None, None] | None = None

    def send(self, item: Any) -> None:
        """Hand ``item`` to the event loop that waits for this job (from the worker thread)."""
        # A closed loop means the server is shutting down and nobody is listening.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.channel.put_nowait, item)

    def finish_reason(self) -> str:
        """``length`` when the token budget ran out, ``stop`` at the end of text or a stop string."""
        if self.hit_stop_string or self.last_token in self.eos_ids:
            return "stop"
        return "length" if self.completion_tokens >= self.allowed else "stop"


_DONE = object()


class Scheduler:
    """Runs jobs on one worker thread, ``max_concurrency`` at a time, the rest waiting in order."""

    def __init__(self, model: ModelRunner, max_concurrency: int, max_queue: int, on_finish: Any = None) -> None:
        if max_concurrency < 1 or max_queue < 0:
            raise ValueError("max_concurrency must be at least 1 and max_queue at least 0")
        self.model = model
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self._on_finish = on_finish
        self._waiting: deque[Job] = deque()
        self._active: list[Job] = []
        self._condition = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="edgekit-serve-decode", daemon=True)
        self._thread.start()

    @property
    def queue_length(self) -> int:
        """Requests waiting for a slot."""
        return len(self._waiting)

    @property
    def active_count(self) -> int:
        """Requests generating now."""
        return len(self._active)

    def submit(self, job: Job) -> None:
        """Queue ``job``; raise ``QueueFullError`` when ``max_queue`` requests already wait."""
        with self._condition:
            if self._closed:
                raise QueueFullError("the server is shutting down")
            if len(self._active) >= self.max_concurrency and len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(job)
            self._condition.notify()

    def cancel(self, job: Job) -> None:
        """Stop ``job``: out of the queue now, or closed at the worker's next turn if it is generating."""
        with self._condition:
            job.cancelled = True
            if job in self._waiting:
                self._waiting.remove(job)
            self._condition.notify()

    def close(self) -> None:
        """Stop the worker; jobs still running end with an error."""
        with self._condition:
            self._closed = True
            self._condition.notify()
        self._thread.join(timeout=30)

    async def pieces(self, job: Job, deadline: float | None = None) -> AsyncGenerator[str, None]:
        """Yield a submitted ``job``'s text pieces; ``job.outcome`` is set at the end.

        ``deadline`` (a ``time.perf_counter`` value) bounds the wait in the queue and the generation
        together: past it the job is cancelled and ``GenerationTimeoutError`` raised. Leaving early (the
        consumer was cancelled or closed this iterator) cancels the job too.
        """
        try:
            while True:
                remaining = None if deadline is None else deadline - time.perf_counter()
                try:
                    item = await asyncio.wait_for(job.channel.get(), remaining)
                except asyncio.TimeoutError:
                    raise GenerationTimeoutError(job.completion_tokens) from None
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if job.outcome is None:
                self.cancel(job)

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._closed and not self._active and not self._waiting:
                    self._condition.wait()
                if self._closed:
                    break
                while self._waiting and len(self._active) < self.max_concurrency:
                    self._active.append(self._waiting.popleft())
                turn = list(self._active)
            for job in turn:
                self._step(job)
                # onnxruntime-genai holds the GIL while a step runs; hand it over between steps so the
                # event loop can send what is ready and take new requests.
                time.sleep(0)
        for job in [*self._active, *self._waiting]:
            self._end(job, RuntimeError("the server is shutting down"))

    def _step(self, job: Job) -> None:
        """Give ``job`` one text piece (or end it); runs on the worker thread only."""
        if job.cancelled:
            self._end(job, None)
            return
        try:
            if job.pieces is None:
                job.pieces = _text_pieces(self.model, job)
            piece = next(job.pieces)
        except StopIteration:
            job.outcome = Outcome(job.finish_reason(), len(job.ids), job.completion_tokens)
            self._end(job, _DONE)
            return
        except Exception as exc:  # an onnxruntime failure ends this request only, not the server
            self._end(job, exc)
            return
        if job.first_piece_at is None:
            job.first_piece_at = time.perf_counter()
        job.send(piece)

    def _end(self, job: Job, last: Any) -> None:
        if job.pieces is not None:
            job.pieces.close()  # frees the generator and its cache now, not when garbage is collected
        job.finished_at = time.perf_counter()
        with self._condition:
            if job in self._active:
                self._active.remove(job)
        if last is not None:
            job.send(last)
        if self._on_finish is not None:
            self._on_finish(job)


def _text_pieces(model: ModelRunner, job: Job) -> Generator[str, None, None]:
    """The job's text as whole characters, counted by token, cut before its first stop string."""

    def counted() -> Iterator[int]:
        for token in model.token_stream(job.ids, job.config):
            job.completion_tokens += 1
            job.last_token = token
            yield token

    pieces = model.tokenizer.decode_stream(counted())
    if job.config.stop:

        def stopped() -> None:
            job.hit_stop_string = True

        pieces = cut_at_stop(pieces, job.config.stop, on_stop=stopped)
    yield from pieces
