"""Load test of ``edgekit serve``: concurrent streaming clients against one package, on loopback only.

Run: python benchmarks/bench_serve.py PACKAGE [--clients 8] [--requests 20] [--max-tokens 48]
         [--max-concurrency 4] [--loads 2] [--batching]

Starts the server in a child process on a free 127.0.0.1 port (the ``serve`` command, so the clients' threads
here do not share the server's interpreter), then:

1. one client asks each distinct question once, one request at a time: the reference answers, and the
   1-client time to first token and tokens/s;
2. a short warm-up load (``--warmup-requests`` per client), after which the server's RSS is the baseline;
3. ``--loads`` times, ``--clients`` clients each send ``--requests`` streaming requests at once (greedy, the
   same questions): every answer must equal the reference answer of its question and none may fail;
   /health is polled meanwhile, to show how long the event loop waits behind a model step.

Prints p50/p95 time to first token and total tokens/s for 1 client and for N, the /health latency, and the
server's RSS after the warm-up and after each load. ``--batching`` also measures onnxruntime-genai's batching
engine (``og.Engine``, several sequences per step) against one sequence at a time, in this process.
Exits 1 when a request failed or differed, or the RSS grew more than ``--rss-slack-mib`` over the last load.
Every request is bounded (``--max-tokens``, a 120 s client timeout), so the run is too.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from machine import describe_machine

QUESTIONS = [
    "What is the capital of France?", "Name three primary colors.", "What is 12 times 12?",
    "Write a haiku about the sea.", "Who wrote Romeo and Juliet?", "What is water made of?",
    "Give me a synonym for happy.", "How many days are in a leap year?", "What is the largest planet?",
    "Say hello in Spanish.", "What do bees make?", "Name a famous painter.", "What is the boiling point of water?",
    "List three fruits.", "What language is spoken in Brazil?", "What is the opposite of cold?",
    "How many legs does a spider have?", "What is the square root of 81?", "Name a mammal that can fly.",
    "What color is the sky on a clear day?",
]  # fmt: skip


@dataclass
class Result:
    """One streamed request as the client saw it."""

    question: int
    text: str = ""
    ttft: float | None = None
    seconds: float = 0.0
    tokens: int = 0
    error: str | None = None


def main() -> None:
    """Run the benchmark from the command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", type=Path)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=20, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--max-concurrency", type=int, default=4, help="the server's generation slots")
    parser.add_argument("--loads", type=int, default=2, help="measured loads after the warm-up load")
    parser.add_argument("--warmup-requests", type=int, default=2, help="requests per client in the warm-up load")
    parser.add_argument("--rss-slack-mib", type=float, default=16.0, help="allowed RSS growth over the last load")
    parser.add_argument("--batching", action="store_true", help="also measure og.Engine batching")
    args = parser.parse_args()
    print(f"machine: {describe_machine()}")
    print(f"package: {args.package}; {args.clients} clients x {args.requests} requests, max_tokens {args.max_tokens}, "
          f"max_concurrency {args.max_concurrency}")  # fmt: skip
    ok = run_load_test(args)
    if args.batching:
        measure_batching(args.package, args.max_tokens)
    sys.exit(0 if ok else 1)


def run_load_test(args: argparse.Namespace) -> bool:
    """Start the server, run the passes, print the figures; True when every check held."""
    import psutil

    port = free_port()
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in the finally below, after the server has exited
    server = start_server(args.package, port, args.max_concurrency, log)
    url = f"http://127.0.0.1:{port}"
    try:
        model_id = wait_ready(url, server)
        mib = lambda: psutil.Process(server.pid).memory_info().rss / 2**20  # noqa: E731
        solo, solo_wall = run_pass(url, model_id, [list(range(len(QUESTIONS)))], args.max_tokens)
        reference = {r.question: r.text for r in solo}
        report("1 client", solo, solo_wall)
        # A short load first: onnxruntime's allocator grows to what N concurrent caches need, once.
        warm, _ = run_pass(url, model_id, plan_for(args.clients, args.warmup_requests), args.max_tokens)
        failures = check(warm, reference)
        rss = [mib()]
        for load in range(1, args.loads + 1):
            failures += load_pass(args, url, model_id, reference, f"{args.clients} clients (load {load})")
            rss.append(mib())
        steps = ", ".join(f"{value:.0f}" for value in rss[1:])
        print(f"server RSS: {rss[0]:.0f} MiB after the warm-up load, then {steps} MiB after each load "
              f"(last load {rss[-1] - rss[-2]:+.1f} MiB)")  # fmt: skip
        grew = rss[-1] - rss[-2] > args.rss_slack_mib
        print(f"checks: {failures} failed or differing requests; RSS growth over the last load "
              f"{'over' if grew else 'within'} {args.rss_slack_mib:.0f} MiB")  # fmt: skip
        return failures == 0 and not grew
    except BaseException:
        log.seek(0)
        sys.stderr.write(log.read().decode("utf-8", "replace")[-4000:])  # the server's side of a failure
        raise
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def plan_for(clients: int, requests: int) -> list[list[int]]:
    """Which questions each client asks, in order: spread so that clients ask different questions at once."""
    return [[(c * requests + r) % len(QUESTIONS) for r in range(requests)] for c in range(clients)]


def load_pass(args: argparse.Namespace, url: str, model_id: str, reference: dict[int, str], label: str) -> int:
    """One load of ``args.clients`` x ``args.requests`` with /health polled meanwhile; failed or differing requests."""
    health: list[float] = []
    stop = threading.Event()
    poller = threading.Thread(target=poll_health, args=(url, stop, health), daemon=True)
    poller.start()
    results, wall = run_pass(url, model_id, plan_for(args.clients, args.requests), args.max_tokens)
    stop.set()
    poller.join()
    failures = check(results, reference)
    report(label, results, wall)
    print(f"  /health during the load: p50 {pct(health, 50) * 1000:.0f} ms, max {max(health) * 1000:.0f} ms "
          f"({len(health)} polls)")  # fmt: skip
    return failures


def start_server(package: Path, port: int, max_concurrency: int, log: Any) -> subprocess.Popen[bytes]:
    """``edgekit serve PACKAGE`` on 127.0.0.1:``port`` in a child process, writing its log to ``log``."""
    code = "import sys; from edgekit.serve.command import serve; serve(sys.argv[1:])"
    command = [sys.executable, "-c", code, str(package), "--host", "127.0.0.1", "--port", str(port),
               "--max-concurrency", str(max_concurrency), "--max-queue", "1000"]  # fmt: skip
    env = {**os.environ, "EDGEKIT_API_KEY": ""}
    return subprocess.Popen(command, stdout=log, stderr=log, env=env)


def wait_ready(url: str, server: subprocess.Popen[bytes], limit_s: float = 300) -> str:
    """Wait until /health answers; the model id it reports."""
    import httpx

    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}")
        try:
            return str(httpx.get(f"{url}/health", timeout=5).json()["model"])
        except (httpx.HTTPError, ValueError, KeyError):
            time.sleep(0.2)
    raise SystemExit("the server did not start")


def run_pass(url: str, model_id: str, plan: list[list[int]], max_tokens: int) -> tuple[list[Result], float]:
    """One client thread per list in ``plan``, each asking its questions in order; results and wall time."""
    results: list[Result] = []
    lock = threading.Lock()

    def client(questions: list[int]) -> None:
        import openai

        api = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        for question in questions:
            result = ask(api, model_id, question, max_tokens)
            with lock:
                results.append(result)

    threads = [threading.Thread(target=client, args=(questions,)) for questions in plan]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, time.perf_counter() - started


def ask(api: Any, model_id: str, question: int, max_tokens: int) -> Result:
    """One greedy streaming chat request, timed from sending to the first text and to the end."""
    result = Result(question)
    started = time.perf_counter()
    try:
        messages = [{"role": "user", "content": QUESTIONS[question]}]
        stream = api.chat.completions.create(model=model_id, messages=messages, max_tokens=max_tokens, temperature=0,
                                             stream=True, stream_options={"include_usage": True})  # fmt: skip
        for chunk in stream:
            if chunk.usage is not None:
                result.tokens = chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].delta.content:
                if result.ttft is None:
                    result.ttft = time.perf_counter() - started
                result.text += chunk.choices[0].delta.content
    except Exception as exc:  # counted as a failed request, with its reason
        result.error = f"{type(exc).__name__}: {exc}"
    result.seconds = time.perf_counter() - started
    return result


def poll_health(url: str, stop: threading.Event, latencies: list[float]) -> None:
    """Time GET /health every 50 ms until ``stop``."""
    import httpx

    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            started = time.perf_counter()
            client.get(f"{url}/health")
            latencies.append(time.perf_counter() - started)
            stop.wait(0.05)


def check(results: list[Result], reference: dict[int, str]) -> int:
    """Failed requests, and answers that differ from the same question asked alone; prints the first few."""
    bad = [r for r in results if r.error or r.text != reference[r.question]]
    for result in bad[:3]:
        print(f"  question {result.question}: {result.error or 'differs: ' + json.dumps(result.text[:80])}")
    return len(bad)


def report(label: str, results: list[Result], wall: float) -> None:
    """p50/p95 time to first token and total tokens/s of one pass."""
    ttfts = [r.ttft for r in results if r.ttft is not None]
    tokens = sum(r.tokens for r in results)
    print(f"{label}: {len(results)} requests in {wall:.1f} s; time to first token p50 {pct(ttfts, 50) * 1000:.0f} ms, "
          f"p95 {pct(ttfts, 95) * 1000:.0f} ms; {tokens} tokens, {tokens / wall:.1f} tokens/s in total")  # fmt: skip


def pct(values: list[float], q: int) -> float:
    """The ``q``-th percentile (0 for no values)."""
    if len(values) < 2:
        return values[0] if values else 0.0
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def measure_batching(package: Path, max_tokens: int) -> None:
    """Tokens/s of one sequence at a time against og.Engine's static batches of 1, 4 and 8, and agreement.

    Runs in this process on the package's default variant with edgekit's thread settings; the prompts are the
    first 8 questions under the chat template, decoded greedily.
    """
    import edgekit

    with edgekit.load(package) as model:
        prompts = [model.tokenizer.encode(model.apply_chat_template([{"role": "user", "content": q}]), add_bos=False)
                   for q in QUESTIONS[:8]]  # fmt: skip
        folder = Path(model.info.package) / model.info.variant
        threads = model.info.threads
    for batch in (None, 1, 4, 8):  # load and warm each model before any timing
        cached_model(folder, threads, batch)
    sequential(folder, threads, prompts[0], 4)
    one_by_one, seconds = timed(lambda: [sequential(folder, threads, p, max_tokens) for p in prompts])
    total = sum(map(len, one_by_one))
    print(f"batching: one sequence at a time: {total} tokens, {total / seconds:.1f} tokens/s")
    for batch in (1, 4, 8):
        outputs, seconds = timed(lambda b=batch: batched(folder, threads, prompts[:b], max_tokens))
        total = sum(map(len, outputs))
        same = sum(a == b for a, b in zip(outputs, one_by_one, strict=False))
        print(f"batching: og.Engine, up to {batch} sequences per step: {total} tokens, {total / seconds:.1f} tokens/s; "
              f"{same}/{batch} answers equal to one-at-a-time greedy")  # fmt: skip


def timed(work: Any) -> tuple[Any, float]:
    """``work()`` and the seconds it took."""
    started = time.perf_counter()
    value = work()
    return value, time.perf_counter() - started


def genai_model(folder: Path, threads: int, batch: int | None = None) -> Any:
    """An og.Model of ``folder`` on the CPU with edgekit's thread settings (and a static batch size)."""
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.clear_providers()
    overlay: dict[str, Any] = {"model": {"decoder": {"session_options": {"intra_op_num_threads": threads,
                                                                         "inter_op_num_threads": 1}}}}  # fmt: skip
    if batch is not None:
        overlay["engine"] = {"static_batching": {"max_batch_size": batch}}
    config.overlay(json.dumps(overlay))
    return og.Model(config)


_MODELS: dict[tuple[Path, int | None], Any] = {}


def cached_model(folder: Path, threads: int, batch: int | None) -> Any:
    """One og.Model per batch size, made once (loading is not what is timed)."""
    if (folder, batch) not in _MODELS:
        _MODELS[(folder, batch)] = genai_model(folder, threads, batch)
    return _MODELS[(folder, batch)]


def sequential(folder: Path, threads: int, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy ids after ``prompt``, one sequence per og.Generator (what the server does), without the EOS id."""
    import onnxruntime_genai as og

    model = cached_model(folder, threads, None)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + max_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    ids: list[int] = []
    while not generator.is_done() and len(ids) < max_tokens:
        generator.generate_next_token()
        ids.append(int(generator.get_next_tokens()[0]))
    eos = set(_eos_ids(folder))
    return [i for i in ids if i not in eos]


def batched(folder: Path, threads: int, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy ids of every prompt, all submitted at once to an og.Engine that steps them together."""
    import numpy as np
    import onnxruntime_genai as og

    model = cached_model(folder, threads, len(prompts))
    engine = og.Engine(model)
    events = engine.create_event_buffer(256)
    requests = []
    for prompt in prompts:
        request = engine.create_request()
        options = og.TurnOptions(request)
        options.set_max_generated_tokens(max_tokens)
        options.set_temperature(0.0)
        request.begin_turn(np.array(prompt, dtype=np.int32), options)
        requests.append(request)
    outputs: list[list[int]] = [[] for _ in prompts]
    while engine.has_pending_requests():
        for event in engine.run(events):
            index = next(i for i, r in enumerate(requests) if r is event.request)
            if event.token is not None:
                outputs[index].append(int(event.token))
    eos = set(_eos_ids(folder))
    return [[i for i in ids if i not in eos] for ids in outputs]


def _eos_ids(folder: Path) -> list[int]:
    eos = json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))["model"]["eos_token_id"]
    return eos if isinstance(eos, list) else [eos]


if __name__ == "__main__":
    main()
