"""A model that cannot load fails its own agents only: the run goes on on quorum.

Loads fail for many reasons: the file was deleted after planning, the device is out of memory,
a runtime raises something of its own. Each is tried with both memory seams of the one engine
(the run's own budget, as `localmoa run` has, with the sizes given or read from the backend; and
a request's admission on `localmoa serve`'s shared pool), with the shipped fake backend and with
real llama.cpp. Cancellation must still end the run, and the events must never say a model was
unloaded that never was loaded.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from conftest import write_config
from rich.console import Console

from localmoa.backends import make_backends
from localmoa.backends.fake import FakeBackend
from localmoa.cli.progress import Progress
from localmoa.config import Agent, Ensemble, FakeModel, Settings, parse_config
from localmoa.errors import BackendError, LayerFailedError, ModelFileError
from localmoa.planning.fewest_loads import Plan, make_plan
from localmoa.runtime.engine import Executor
from localmoa.runtime.events import Event, LoadFailed, ModelLoaded, ModelUnloaded, RunResult
from localmoa.runtime.moa import Call, calls_for, stages_of
from localmoa.runtime.prepare import prepare
from localmoa.serve.pool import ModelPool
from localmoa.tinymodels import ensemble_config

GiB = 1 << 30
QUESTION = "Why is the sky blue?"
THREE = Ensemble(layers=[["a", "b", "c"], ["a", "b", "c"]], aggregator=Agent(model="a"))
PATHS = ["budget", "budget-no-sizes", "pool"]
FAILURES = {
    "file gone": ModelFileError("/models/b.gguf: file not found (model b)"),
    "out of memory": BackendError("b", "out of memory: CUDA error 2"),
    "runtime's own": RuntimeError("ggml_backend_alloc failed"),
}


class FailingLoads(FakeBackend):
    """Loads of the models in ``failures`` raise; ``hold`` makes a load wait (to cancel it),
    after the model became resident when ``resident_first`` (a load the backend completed
    although its caller was cancelled, as an Ollama preload does)."""

    def __init__(
        self,
        failures: dict[str, BaseException] | None = None,
        *,
        hold: str | None = None,
        resident_first: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.failures = failures or {}
        self.hold = hold
        self.resident_first = resident_first
        self.holding = asyncio.Event()

    async def load(self, name: str, config: Any, placement: Any = None) -> None:
        if name in self.failures:
            raise self.failures[name]
        if name == self.hold:
            if self.resident_first:
                await super().load(name, config)
            self.holding.set()
            await asyncio.Event().wait()  # until cancelled
        await super().load(name, config)


def fake_models(*names: str) -> dict[str, FakeModel]:
    return {n: FakeModel(backend="fake", memory=GiB) for n in names}


async def run_on(
    path: str,
    backend: FakeBackend,
    stages: list[list[Call]],
    plan: Plan,
    models: dict[str, Any],
    sizes: dict[str, int],
    events: list[Event],
) -> RunResult:
    """Run ``plan`` as `localmoa run` does (its own budget; without sizes, the engine reads
    them from the backend), or as a `serve` request does (a shared pool, closed at the end as
    serve's shutdown does)."""
    backends = {"fake": backend, "llamacpp": backend}
    question = [{"role": "user", "content": QUESTION}]
    conversation = [type_checked(m) for m in question]
    if path == "budget":
        executor = Executor(models, backends, sizes=sizes, on_event=events.append)
        return await executor.run(stages, plan, conversation)
    if path == "budget-no-sizes":
        executor = Executor(models, backends, on_event=events.append)
        return await executor.run(stages, plan, conversation)
    pool = ModelPool(models, backends, sizes, plan.budget_bytes)
    executor = Executor(models, backends, sizes=sizes, on_event=events.append)
    try:
        return await executor.run(stages, plan, conversation, admission=pool.admission(ticket=1))
    finally:
        for model in pool.resident():  # serve's shutdown; what it unloads is really loaded
            events.append(ModelUnloaded(model))
        await asyncio.shield(pool.close())


def type_checked(message: dict[str, str]) -> Any:
    from localmoa.backends.base import ChatMessage

    return ChatMessage.model_validate(message)


def unloaded_only_what_loaded(events: list[Event]) -> None:
    loaded: set[str] = set()
    for event in events:
        if isinstance(event, ModelLoaded):
            loaded.add(event.model)
        elif isinstance(event, ModelUnloaded):
            assert event.model in loaded, f"{event.model} unloaded but never loaded: {events}"
            loaded.discard(event.model)


async def fake_run(
    path: str, backend: FailingLoads, ensemble: Ensemble = THREE, budget: int = 3 * GiB
) -> tuple[RunResult, list[Event]]:
    models = fake_models(*sorted({m for stage in stages_of(ensemble) for m in stage}))
    sizes = {n: int(m.memory) for n, m in models.items()}
    plan = make_plan(stages_of(ensemble), sizes, budget)
    events: list[Event] = []
    result = await run_on(path, backend, calls_for(ensemble), plan, models, sizes, events)
    return result, events


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("failure", list(FAILURES))
async def test_a_model_that_cannot_load_fails_its_agents_and_the_run_goes_on(
    path: str, failure: str
) -> None:
    backend = FailingLoads({"b": FAILURES[failure]}, capacity=3 * GiB)
    result, events = await fake_run(path, backend)
    assert result.answer == f"a has considered: {QUESTION}"
    failed = [c for c in result.calls if not c.ok]
    assert [(c.layer, c.model) for c in failed] == [(1, "b"), (2, "b")]
    why = {
        "file gone": 'model "b" could not load: /models/b.gguf: file not found (model b)',
        "out of memory": 'model "b": out of memory: CUDA error 2',
        "runtime's own": 'model "b" could not load: RuntimeError: ggml_backend_alloc failed',
    }[failure]
    assert all(c.error == why for c in failed)
    # Admission is per model, not per wave: the plan's one stay of b tries once, on either seam
    # (a later stay or request tries again: tests/serve/test_pool.py).
    assert [e for e in events if isinstance(e, LoadFailed)] == [LoadFailed("b", why)]
    assert "b" not in {e.model for e in events if isinstance(e, ModelUnloaded)}
    unloaded_only_what_loaded(events)
    assert backend.resident == {}
    # Nobody quotes a failed agent: the aggregator read a's and c's answers only.
    aggregator = backend.requests[-1][1].messages[0].content
    assert "1. a has considered" in aggregator and "2. c has considered" in aggregator
    assert "3." not in aggregator and "could not load" not in aggregator


@pytest.mark.parametrize("path", PATHS)
async def test_a_layer_whose_every_model_cannot_load_stops_the_run(path: str) -> None:
    failures = {m: BackendError(m, "out of memory") for m in "bc"}
    ensemble = Ensemble(layers=[["b", "c"]], aggregator=Agent(model="a"))
    backend = FailingLoads(failures, capacity=3 * GiB)
    with pytest.raises(LayerFailedError, match=r"every agent of layer 1 failed .*out of memory"):
        await fake_run(path, backend, ensemble)
    assert backend.resident == {}


@pytest.mark.parametrize("path", PATHS)
async def test_an_aggregator_that_cannot_load_stops_the_run(path: str) -> None:
    backend = FailingLoads({"a": ModelFileError("/models/a.gguf: file not found")})
    ensemble = Ensemble(layers=[["b", "c"]], aggregator=Agent(model="a"))
    with pytest.raises(LayerFailedError, match=r"the aggregator failed .*a\.gguf: file not"):
        await fake_run(path, backend, ensemble)
    assert backend.resident == {}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("resident_first", [False, True], ids=["load-undone", "load-done"])
async def test_cancelling_during_a_load_still_ends_the_run_and_says_only_the_truth(
    path: str, resident_first: bool
) -> None:
    """A cancel (Ctrl-C, SIGTERM, a client gone) is not a failed load: it ends the run. A
    model whose load the backend completed anyway is unloaded; one never loaded is not said
    to be."""
    backend = FailingLoads(hold="b", resident_first=resident_first, capacity=3 * GiB)
    events: list[Event] = []
    ensemble = Ensemble(layers=[["a", "b"]], aggregator=Agent(model="a"))
    models = fake_models("a", "b")
    sizes = {"a": GiB, "b": GiB}
    plan = make_plan(stages_of(ensemble), sizes, 2 * GiB)
    task = asyncio.create_task(
        run_on(path, backend, calls_for(ensemble), plan, models, sizes, events)
    )
    await backend.holding.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert backend.resident == {}
    said = [e.model for e in events if isinstance(e, ModelUnloaded)]
    assert said.count("a") == 1
    assert ("b" in said) == resident_first
    assert not any(isinstance(e, LoadFailed) for e in events)


def test_progress_says_the_load_failed_and_never_that_it_unloaded_it() -> None:
    out = StringIO()
    progress = Progress(
        Console(file=out, width=200), show_layers=False, n_waves=1, labels=["layer 1", "aggregator"]
    )
    backend = FailingLoads({"b": FAILURES["file gone"]}, capacity=3 * GiB)
    result, events = asyncio.run(fake_run("budget", backend))
    for event in events:
        progress(event)
    progress.close()
    text = out.getvalue()
    assert (
        'load failed: model "b" could not load: /models/b.gguf: file not found (model b); its '
        "agents fail, the others go on" in text
    )
    assert "unloaded b" not in text and "unloaded a" in text and "unloaded c" in text
    assert result.answer


# --- real llama.cpp ----------------------------------------------------------------------------


@pytest.fixture
def own_models(tmp_path: Path, tiny_models: dict[str, Path]) -> dict[str, Path]:
    """Copies of the session's tiny models, so this test may delete one."""
    folder = tmp_path / "models"
    folder.mkdir()
    return {name: Path(shutil.copy(path, folder / path.name)) for name, path in tiny_models.items()}


@pytest.mark.parametrize("path", ["budget", "pool"])
async def test_a_gguf_deleted_after_planning_fails_its_agents_only(
    own_models: dict[str, Path], path: str
) -> None:
    config = parse_config(ensemble_config(own_models, max_tokens=8))
    backends = make_backends(Settings())
    prepared = await prepare(config, "default", backends, memory_budget="1GiB", prompt=QUESTION)
    own_models["tiny-b"].unlink()  # gone between the plan and its load
    events: list[Event] = []
    sizes = {name: fp.total for name, fp in prepared.footprints.items()}
    try:
        result = await run_on(
            path,
            backends["llamacpp"],  # type: ignore[arg-type]
            prepared.stages,
            prepared.plan,
            dict(config.models),
            sizes,
            events,
        )
    finally:
        await backends["llamacpp"].aclose()
    assert result.answer == result.calls[-1].text != ""
    failed = [c for c in result.calls if not c.ok]
    assert [(c.layer, c.model) for c in failed] == [(1, "tiny-b"), (2, "tiny-b")]
    for call in failed:
        assert call.error is not None
        assert call.error.startswith('model "tiny-b" could not load: ')
        assert "tiny-b.gguf: file not found" in call.error
    assert all(c.ok for c in result.calls if c.model != "tiny-b")
    unloaded_only_what_loaded(events)
    assert backends["llamacpp"].loaded() == []


def test_the_cli_answers_from_the_others_when_a_model_file_is_missing(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    """Through `localmoa run`: a model whose file is missing at load time (its `memory` given,
    so planning never read it) fails its agents; the answer comes from the others, exit 0."""
    models = "\n".join(
        f'[models.{name}]\nbackend = "llamacpp"\npath = "{path}"\nn_ctx = 2048\nseed = 7\n'
        for name, path in tiny_models.items()
    )
    write_config(
        tmp_path,
        models
        + f"""
[models.gone]
backend = "llamacpp"
path = "{tmp_path / "gone.gguf"}"
memory = "50MB"

[ensembles.default]
layers = [["tiny-a", "gone", "tiny-b"]]
aggregator = "tiny-a"
max_tokens = 8
""",
    )
    out = subprocess.run(
        [sys.executable, "-m", "localmoa", "run", QUESTION, "--json", "--memory-budget", "1GiB"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    calls = json.loads(out.stdout)["calls"]
    gone = [c for c in calls if c["model"] == "gone"]
    assert len(gone) == 1 and not gone[0]["ok"]
    assert gone[0]["error"].startswith('model "gone" could not load: ')
    assert "gone.gguf: file not found" in gone[0]["error"]
    assert all(c["ok"] for c in calls if c["model"] != "gone")
    assert json.loads(out.stdout)["answer"]
    assert "Traceback" not in out.stderr
