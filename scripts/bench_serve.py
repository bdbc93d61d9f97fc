"""Serving throughput: N concurrent requests against the same N one after another.

    python scripts/bench_serve.py [-n 4] [--repeat 3] [--max-tokens 32] [--budget-models 3]
                                  [--parallel N] [--stream] [--json] [--workdir DIR]

One ``MoaServer`` (what ``localmoa serve`` runs) is started in this process on a loopback port,
with real uvicorn in a background thread and real llama.cpp behind it, on the three tiny
random-weight models (``localmoa.tinymodels``: their answers are noise, but every token is really
decoded, and they almost never stop early, so each call does ``--max-tokens`` tokens of work).
The ensemble is 2 layers of tiny-a, tiny-b, tiny-c with tiny-a aggregating: 7 calls a request
(``--large``: three models of about 100 MB instead).

What is asked: does the server turn concurrent requests into throughput? The executor already
runs a layer's calls in parallel, one worker thread per model; calls of several requests to one
model that wait for its turn are made together in the next (decoded as sequences of one context
when the model holds several: ``--parallel``), and one ``ModelPool`` shares loaded models
between requests.
So the same N requests are sent (a) one after another and (b) all at once, with the official
``openai`` client; per mode we report the wall time, throughput (requests/s) and p50/p95 latency
of a whole answer (non-streamed; ``--stream`` streams instead and adds time to first token), and
the concurrent/sequential throughput ratio. Both modes run in one process and one run,
``--repeat`` times each in alternating order (seq, conc, conc, seq, ...), so drift on a noisy
machine falls on both alike: compare the ratio, not the absolute figures, across machines.

``--parallel N`` loads every model with N sequences (``parallel = N``): the calls of
concurrent requests to one model are then made together, decoded as sequences of one context.
A third mode, ``one_per_turn``, sends the same N requests at once but has each model make one
request's calls per turn (``Executor.together = False``, what the engine did before calls were
made together), so the gain of decoding them together is measured side by side.

One request warms the server first, so the first loads of the models are not timed. The budget
is, by default, room for all three models (the sum of localmoa's estimates); ``--budget-models 2``
leaves room for the two largest only, so every request swaps models and loads are timed: then
the pool's sharing of loaded models between concurrent requests shows. The pool's peak bytes are
checked against the budget at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shlex
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import openai
import uvicorn

from localmoa.backends import make_backends
from localmoa.config import Config, parse_config
from localmoa.footprint.estimate import estimate, read_gguf
from localmoa.hardware import Budget
from localmoa.serve.app import MoaServer
from localmoa.tinymodels import (
    ENGLISH_VOCAB,
    PRESETS,
    TinySpec,
    ensemble_config,
    write_tiny_model,
)

MiB = 1 << 20
MODELS = ("tiny-a", "tiny-b", "tiny-c")
LARGE: dict[str, TinySpec] = {
    # about 100, 89 and 73 MB (F32): decoding reads the weights, as a real model's does
    name: dataclasses.replace(spec, english=True, n_vocab=ENGLISH_VOCAB)
    for name, spec in {
        "large-a": PRESETS["large-100m"],
        "large-b": TinySpec(n_layer=7, n_embd=512, n_head=8, n_head_kv=4, n_ff=1536, seed=31),
        "large-c": TinySpec(n_layer=6, n_embd=512, n_head=8, n_head_kv=2, n_ff=1536, seed=32),
    }.items()
}
"""``--large``: models big enough that one sequence's decode is bound by reading the weights,
where decoding several requests together pays (the tiny ones are bound by overhead), with
English word pieces in their vocabulary so prompts are as long in tokens as a real model's
vocabulary makes them (``TinySpec.english``; the fixtures' byte-level one makes them 4 times
longer, and a prompt's evaluation, which calls made together do not share, 4 times costlier)."""
N_CTX = 2048
N_BATCH = 512
SEED = 7
START_TIMEOUT = 60.0
QUESTIONS = (
    "Why is the sky blue?",
    "How do tides work?",
    "What makes bread rise?",
    "Explain how a compass finds north.",
    "Name three uses of copper.",
    "What is a prime number?",
    "How does a refrigerator keep food cold?",
    "Why do leaves change colour in autumn?",
)


@dataclass
class Sample:
    """One request as the client saw it."""

    seconds: float
    first_token: float | None


@dataclass
class Round:
    """One mode, once: N requests, sequential or all at once."""

    mode: str
    wall: float
    samples: list[Sample]
    loads: int
    """Model loads the pool did during the round (``--budget-models`` below 3 forces some)."""


@dataclass
class Summary:
    mode: str
    rounds: int
    wall_median: float
    throughput_median: float
    p50: float
    p95: float
    loads_per_request: float
    ttft_p50: float | None = None
    ttft_p95: float | None = None
    throughputs: list[float] = field(default_factory=list)


# --- models, config, budget ----------------------------------------------------------------------


def tiny_models(folder: Path, large: bool = False) -> dict[str, Path]:
    """The three tiny models (or ``large`` ones), written once into ``folder`` and reused."""
    folder.mkdir(parents=True, exist_ok=True)
    specs = LARGE if large else {name: PRESETS[name] for name in MODELS}
    paths = {}
    for name, spec in specs.items():
        path = folder / f"{name}.gguf"
        if not path.exists():
            partial = path.with_suffix(".partial")
            write_tiny_model(partial, spec)
            partial.replace(path)  # a run killed mid-write leaves no truncated model behind
        paths[name] = path
    return paths


def bench_config(paths: dict[str, Path], max_tokens: int, parallel: int = 0) -> Config:
    raw = ensemble_config(paths, n_ctx=N_CTX, max_tokens=max_tokens, seed=SEED)
    if parallel:  # sequences per context: concurrent requests' calls decode together
        for model in raw["models"].values():
            model["parallel"] = parallel
    return parse_config(raw)


def bench_budget(paths: dict[str, Path], models: int, parallel: int = 0) -> Budget:
    """Room for the ``models`` largest models by localmoa's estimate, so any that many fit."""
    n_seq = parallel or 1
    sizes = sorted(
        (
            estimate(read_gguf(p), n_ctx=N_CTX, n_batch=N_BATCH, n_seq=n_seq).total
            for p in paths.values()
        ),
        reverse=True,
    )
    room = sum(sizes[:models])
    detail = f"bench_serve: room for {models} of {len(sizes)} models ({room / MiB:.1f} MiB)"
    return Budget(bytes=room, source="flag", detail=detail)


# --- the server, in its own thread ---------------------------------------------------------------


class _Uvicorn(uvicorn.Server):
    """Says when it accepts connections, so the benchmark waits on an event, not a sleep."""

    def __init__(self, config: uvicorn.Config, ready: threading.Event) -> None:
        super().__init__(config)
        self.ready = ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()


class Serving:
    """A MoaServer on a loopback socket, in a background thread with its own event loop."""

    def __init__(self, config: Config, budget: Budget, max_queue: int) -> None:
        self.config, self.budget, self.max_queue = config, budget, max_queue
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))  # bound here and handed over: no free-port race
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.ready = threading.Event()
        self.server: MoaServer | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.uv: _Uvicorn | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._thread, name="bench-serve", daemon=True)

    def __enter__(self) -> Serving:
        self.thread.start()
        if not self.ready.wait(START_TIMEOUT) or self.error is not None:
            raise RuntimeError(f"the server did not start: {self.error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.uv is not None:
            self.uv.should_exit = True
        self.thread.join(30)
        self.sock.close()

    def _thread(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self.error = exc
            self.ready.set()  # wake the main thread, which then reports the error

    async def _main(self) -> None:
        server = MoaServer(
            self.config, make_backends(self.config.settings), self.budget, max_queue=self.max_queue
        )
        self.server = server
        self.loop = asyncio.get_running_loop()
        await server.start()
        self.uv = _Uvicorn(uvicorn.Config(server.app, log_level="warning"), self.ready)
        try:
            await self.uv.serve(sockets=[self.sock])
        finally:
            await server.aclose()
            for backend in server.backends.values():
                await backend.aclose()

    async def empty_pool(self) -> None:
        """Unload everything the pool holds (on the server's loop, where the pool lives), so
        the next request starts cold."""
        assert self.server is not None and self.server.pool is not None and self.loop is not None
        done = asyncio.run_coroutine_threadsafe(self.server.pool.close(), self.loop)
        await asyncio.wrap_future(done)

    @property
    def pool_loads(self) -> int:
        assert self.server is not None and self.server.pool is not None
        return self.server.pool.loads


# --- the client ----------------------------------------------------------------------------------


async def ask(client: openai.AsyncOpenAI, question: str, max_tokens: int, stream: bool) -> Sample:
    """One request; its latency is the whole answer's, from send to the last byte."""
    messages: list[Any] = [{"role": "user", "content": question}]
    began = time.perf_counter()
    if not stream:
        reply = await client.chat.completions.create(
            model="moa/default", messages=messages, max_tokens=max_tokens, temperature=0.0
        )
        assert reply.choices, "an answer without choices"
        return Sample(time.perf_counter() - began, None)
    first: float | None = None
    chunks = await client.chat.completions.create(
        model="moa/default",
        messages=messages,
        max_tokens=max_tokens,
        temperature=0.0,
        stream=True,
    )
    async for chunk in chunks:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - began
    return Sample(time.perf_counter() - began, first)


async def one_round(
    client: openai.AsyncOpenAI,
    serving: Serving,
    mode: str,
    questions: Sequence[str],
    max_tokens: int,
    stream: bool,
) -> Round:
    loads = serving.pool_loads
    assert serving.server is not None
    # "one_per_turn": concurrent, but each model makes one request's calls per turn, as before
    # calls waiting for one model were made together (set between rounds, while idle)
    serving.server.executor.together = mode != "one_per_turn"
    began = time.perf_counter()
    if mode == "sequential":
        samples = [await ask(client, q, max_tokens, stream) for q in questions]
    else:
        samples = list(
            await asyncio.gather(*(ask(client, q, max_tokens, stream) for q in questions))
        )
    wall = time.perf_counter() - began
    serving.server.executor.together = True
    return Round(mode, wall, samples, serving.pool_loads - loads)


async def measure(serving: Serving, args: argparse.Namespace) -> tuple[float, list[Round]]:
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.n)]
    async with (
        openai.DefaultAsyncHttpxClient(trust_env=False, timeout=600) as http,  # loopback: no proxy
        openai.AsyncOpenAI(
            base_url=serving.url, api_key="unused", http_client=http, max_retries=0
        ) as client,
    ):
        warm = await ask(client, "Warm up.", args.max_tokens, False)
        rounds = []
        modes = modes_of(args)
        for r in range(args.repeat):
            order = modes if r % 2 == 0 else tuple(reversed(modes))
            for mode in order:
                rounds.append(
                    await one_round(client, serving, mode, questions, args.max_tokens, args.stream)
                )
    return warm.seconds, rounds


def modes_of(args: argparse.Namespace) -> tuple[str, ...]:
    """Sequential and concurrent; with ``--parallel`` also concurrent one call per turn."""
    if args.parallel > 1:
        return ("sequential", "concurrent", "one_per_turn")
    return ("sequential", "concurrent")


# --- report --------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: int) -> float:
    """The q-th percentile, interpolated between samples (few samples: no extrapolation)."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def summarize(mode: str, rounds: list[Round]) -> Summary:
    mine = [r for r in rounds if r.mode == mode]
    latencies = [s.seconds for r in mine for s in r.samples]
    firsts = [s.first_token for r in mine for s in r.samples if s.first_token is not None]
    throughputs = [len(r.samples) / r.wall for r in mine]
    return Summary(
        mode=mode,
        rounds=len(mine),
        wall_median=statistics.median(r.wall for r in mine),
        throughput_median=statistics.median(throughputs),
        p50=percentile(latencies, 50),
        p95=percentile(latencies, 95),
        loads_per_request=sum(r.loads for r in mine) / len(latencies),
        ttft_p50=percentile(firsts, 50) if firsts else None,
        ttft_p95=percentile(firsts, 95) if firsts else None,
        throughputs=throughputs,
    )


def table(summaries: list[Summary], n: int, stream: bool) -> str:
    head = "| mode | wall | throughput | p50 latency | p95 latency | loads/request |"
    rule = "|---|--:|--:|--:|--:|--:|"
    if stream:
        head += " p50 first token | p95 first token |"
        rule += "--:|--:|"
    lines = [head, rule]
    for s in summaries:
        label = {
            "sequential": f"{n} one after another",
            "concurrent": f"{n} at once",
            "one_per_turn": f"{n} at once, one call per model turn",
        }[s.mode]
        row = (
            f"| {label} | {s.wall_median:.2f} s | {s.throughput_median:.2f} req/s "
            f"| {s.p50:.2f} s | {s.p95:.2f} s | {s.loads_per_request:.1f} |"
        )
        if stream and s.ttft_p50 is not None and s.ttft_p95 is not None:
            row += f" {s.ttft_p50:.2f} s | {s.ttft_p95:.2f} s |"
        lines.append(row)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=4, help="requests per round (default 4)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds per mode (default 3)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per call (default 32)")
    parser.add_argument(
        "--budget-models",
        type=int,
        choices=(1, 2, 3),
        default=3,
        help="models the budget holds at once (default 3: all; 2 forces swaps)",
    )
    parser.add_argument(
        "--parallel",
        type=int,
        default=0,
        help="sequences per llama.cpp context (parallel = N on every model): concurrent "
        "requests' calls to one model decode together; adds a one-call-per-turn mode to compare",
    )
    parser.add_argument(
        "--large", action="store_true", help="three ~100 MB models instead of the tiny ones"
    )
    parser.add_argument("--stream", action="store_true", help="stream; adds time to first token")
    parser.add_argument("--json", action="store_true", help="print the raw numbers as JSON")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "localmoa-bench-serve",
        help="where the tiny models are cached (default: under the system temp dir)",
    )
    args = parser.parse_args(argv)
    if args.n < 1 or args.repeat < 1 or args.max_tokens < 1:
        parser.error("-n, --repeat and --max-tokens must be positive")

    paths = tiny_models(args.workdir, args.large)
    config = bench_config(paths, args.max_tokens, args.parallel)
    budget = bench_budget(paths, args.budget_models, args.parallel)
    with Serving(config, budget, max_queue=max(16, args.n)) as serving:
        warm, rounds = asyncio.run(measure(serving, args))
        assert serving.server is not None and serving.server.pool is not None
        peak = serving.server.pool.peak_bytes
        total_loads = serving.server.pool.loads
    assert peak <= budget.bytes, f"the pool held {peak} bytes, over the {budget.bytes} budget"

    summaries = [summarize(mode, rounds) for mode in modes_of(args)]
    ratio = summaries[1].throughput_median / summaries[0].throughput_median
    together = (
        summaries[1].throughput_median / summaries[2].throughput_median
        if len(summaries) > 2
        else None
    )
    command = shlex.join(
        ["python", "scripts/bench_serve.py", *(sys.argv[1:] if argv is None else argv)]
    )
    if args.json:
        raw = {
            "command": command,
            "n": args.n,
            "repeat": args.repeat,
            "max_tokens": args.max_tokens,
            "budget_bytes": budget.bytes,
            "budget_models": args.budget_models,
            "peak_bytes": peak,
            "warmup_seconds": warm,
            "loads": total_loads,
            "throughput_ratio": ratio,
            "together_ratio": together,
            "parallel": args.parallel,
            "summaries": [asdict(s) for s in summaries],
            "rounds": [asdict(r) for r in rounds],
        }
        print(json.dumps(raw, indent=2))
        return
    print(f"`{command}`")
    print(
        f"{args.n} requests per round, each mode {args.repeat}x in alternating order; "
        f"2 layers x 3 {'~100 MB' if args.large else 'tiny'} models + aggregator = 7 calls "
        f"per request, {args.max_tokens} tokens "
        f"each; warm-up request ({warm:.2f} s, includes first model loads) not timed"
    )
    print()
    print(table(summaries, args.n, args.stream))
    print()
    print(f"concurrent / sequential throughput: {ratio:.2f}x")
    if together is not None:
        print(f"calls made together / one call per model turn: {together:.2f}x throughput")
    print(
        f"pool peak {peak / MiB:.1f} MiB (by localmoa's estimates) of a "
        f"{budget.bytes / MiB:.1f} MiB budget "
        f"({args.budget_models} of 3 models fit); never over budget; {total_loads} loads in all"
    )


if __name__ == "__main__":
    main()
