"""Writing runs into the run log as they go: what ``run``, ``serve``, ``chat`` and batches call.

::

    recorder = Recorder.open(settings)      # once per process (a server: once)
    recording = recorder.start(source="run", ensemble=name, ensemble_config=ensemble,
                               plan=plan, budget=budget, conversation=messages,
                               models=config.models)    # the run's row, status "running"
    with recorded(recording, interrupted="interrupted"):  # "failed" / "interrupted" if so
        result = await executor.run(..., on_event=recording.on_event)  # a row per call, load
    recording.finish("ok", answer=result.answer, seconds=result.seconds)

**The privacy switch** is :func:`record_mode`: ``LOCALMOA_RECORD`` when set, else
``settings.record``. "full" keeps everything; "metadata" never writes a text (the prompt, the
conversation, the messages a call sent, what it wrote, the answer, and the texts of the config:
system prompts, aggregate prompts, the task, a fake model's reply template), so no prompt,
message or answer text is anywhere in the file; "off" opens and creates nothing at all. A value
of LOCALMOA_RECORD that is none of these is refused (a UserError), not taken as the default: a
typo in a privacy switch must not record everything.

**Faults never cost an answer.** A log that cannot be opened or written (a corrupt file, a
read-only file or folder, a lock held beyond the store's busy timeout) is one warning, naming
the file and ``settings.record = "off"`` (or LOCALMOA_RECORD=off) as the way out; the recorder
then writes nothing more for the rest of the process, and the run goes on. So
:meth:`Recorder.open` and every method of a recording never raise for the store's sake. The
warning goes to ``logging`` unless the caller gives ``warn`` (a command: its one stderr line).

**Written synchronously, in the caller's thread.** A write is one short transaction of a row or
two in WAL mode with ``synchronous = NORMAL`` (no fsync per commit; see localmoa.records.store).
Measured on the project's 2-core development machine (300 runs of 7 calls through this class):
a call's row with 2 KB of messages and 1.5 KB of text takes 0.05 ms (median; 0.07 ms at the
95th percentile), a run's start 0.15 ms, its finish 0.06 ms, a load 0.03 ms; the rare slowest,
about 5 ms, are WAL checkpoints, one per 4 MB written. On scripts/bench_overhead.py's run (19
calls on the fake backend answering instantly, so only localmoa's own work is timed) recording
takes localmoa's work per call from 0.14 to 0.28 ms (medians of 60 runs each, interleaved): the
whole of it still a fraction of a millisecond beside calls that take tens of milliseconds at the
least on a real model. Writes well under a millisecond are made where the event happens; a
background thread and its queue would add code, and a flush at exit, for no time a user would
see. Only a lock held by another process makes a write wait, once, up to the store's busy
timeout; then recording stops.

Which backend served a call is not in the engine's events; pass the run's model tables as
``models`` to :meth:`Recorder.start` to have it recorded (else "unknown"). Those tables are kept
with the ensemble's config, an OpenAI-compatible server's ``api_key`` left out.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.metadata
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import psutil

from localmoa.backends.base import ChatMessage
from localmoa.config import Ensemble, ModelConfig, Settings
from localmoa.errors import LocalMoaError, UserError
from localmoa.hardware import DETECTED, Budget, detect_budget
from localmoa.planning.fewest_loads import Plan
from localmoa.records.models import LoggedCall, LoggedLoad, RunDetail, RunSource, RunStatus
from localmoa.records.store import Store, StoreError, iso_utc, log_path, new_id
from localmoa.runtime.events import CallFinished, Event, ModelLoaded, ModelUnloaded

__all__ = ["ENV", "RecordMode", "Recorder", "RunRecording", "record_mode", "recorded"]

log = logging.getLogger(__name__)

RecordMode = Literal["full", "metadata", "off"]
ENV = "LOCALMOA_RECORD"

_CONFIG_TEXTS = frozenset({"system_prompt", "aggregate_prompt", "task", "reply"})
"""The config's keys that hold prompt or answer text (a fake model's ``reply`` is its answers'
template): not kept with "metadata"."""
_SECRETS = frozenset({"api_key"})
"""Model-table keys never kept, whatever the mode."""
_VERSIONED = ("localmoa", "llama-cpp-python", "ollama")
"""Packages whose versions a run records, when installed."""


def record_mode(settings: Settings | None = None) -> RecordMode:
    """LOCALMOA_RECORD when set (a wrong value is a UserError), else ``settings.record``."""
    value = os.environ.get(ENV)
    if value is None or not value.strip():
        return settings.record if settings is not None else "full"
    wanted = value.strip().lower()
    for mode in get_args(RecordMode):
        if wanted == mode:
            return mode  # type: ignore[no-any-return]
    choices = ", ".join(get_args(RecordMode))
    raise UserError(
        f'{ENV}="{value}" is not a recording mode (choose one of: {choices}); unset it to use '
        "settings.record"
    )


class Recorder:
    """This process's writer into the run log; does nothing with mode "off" or after a fault."""

    def __init__(
        self,
        mode: RecordMode,
        store: Store | None,
        path: Path | None,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.mode = mode
        self.warn = warn or _log_warning
        """Where the one fault warning goes: the log by default; a command passes its own
        stderr line (the console wraps a logged line, and a wrapped path cannot be copied)."""
        self.store = store
        """The open log (for reading too: ``list_runs``, ``run``); None with "off" or when it
        could not be opened."""
        self.path = path
        self._failed = store is None
        self._open_loads: dict[str, int] = {}
        """Each model's load row that has no unload yet. Kept per process, not per run: in a
        server, a model one request loaded may be unloaded by another's plan."""
        self._device: dict[str, Any] | None = None

    @classmethod
    def open(
        cls,
        settings: Settings | None = None,
        *,
        path: Path | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> Recorder:
        """Open the log for writing (creating it), as :func:`record_mode` says. Never raises for
        the store: a fault is one warning (to ``warn``, default the ``logging`` warning) and a
        recorder that records nothing. An invalid LOCALMOA_RECORD raises (see the module
        docstring)."""
        mode = record_mode(settings)
        if mode == "off":
            return cls(mode, None, None, warn)
        path = path or log_path()
        try:
            store = Store.open(path)
        except StoreError as exc:
            recorder = cls(mode, None, path, warn)
            recorder._fault(exc)
            return recorder
        return cls(mode, store, path, warn)

    def close(self) -> None:
        """Close the log (a server's shutdown); later runs are not recorded."""
        if self.store is not None:
            self.store.close()
        self._failed = True

    @property
    def recording(self) -> bool:
        """True while runs are written: not "off", and no fault so far."""
        return not self._failed

    def start(
        self,
        *,
        source: RunSource,
        ensemble: str,
        ensemble_config: Ensemble,
        plan: Plan | None = None,
        budget: Budget | None = None,
        conversation: Sequence[ChatMessage],
        chat_id: str | None = None,
        models: Mapping[str, ModelConfig] | None = None,
        stages: Sequence[str] | None = None,
    ) -> RunRecording:
        """Write a run's row now (status "running") and return its recording. ``stages``: each
        stage's label ("layer 1", "judge 1", "aggregator"; a plan's waves number stages), kept
        with the plan as ``stage_labels`` so ``logs show`` names them."""
        began = time.perf_counter()
        if self._failed:
            return RunRecording(self, None, {}, began)
        full = self.mode == "full"
        used = _used_models(ensemble_config)
        tables = {name: models[name] for name in used if models is not None and name in models}
        config = ensemble_config.model_dump(mode="json")
        config["models"] = {
            name: {k: v for k, v in table.model_dump(mode="json").items() if k not in _SECRETS}
            for name, table in tables.items()
        }
        now = time.time()
        run = RunDetail(
            id=new_id(now),
            status="running",
            source=source,
            chat_id=chat_id,
            ensemble=ensemble,
            started=iso_utc(now),
            seconds=None,
            error=None,
            config=config if full else _without_texts(config),
            plan=None if plan is None else _plan_json(plan, stages),
            budget_bytes=None if budget is None else budget.bytes,
            budget_source=None if budget is None else budget.source,
            device=self._snapshot(budget),
            versions=_versions(),
            conversation=list(conversation) if full else None,
            answer=None,
            calls=[],
            loads=[],
        )
        if not self._write(lambda store: store.add_run(run)):
            return RunRecording(self, None, {}, began)
        backends = {name: table.backend for name, table in tables.items()}
        return RunRecording(self, run.id, backends, began)

    def _write(self, write: Callable[[Store], object]) -> bool:
        """Run ``write(store)``; False (after the one warning) when the log fails."""
        if self._failed or self.store is None:
            return False
        try:
            write(self.store)
        except StoreError as exc:
            self._fault(exc)
            return False
        return True

    def _fault(self, exc: StoreError) -> None:
        """The one warning of the process; nothing is written after it."""
        self._failed = True
        self.warn(
            f"{exc}. Nothing more is recorded by this process; the run goes on. Set "
            f'settings.record = "off" (or {ENV}=off) to not record at all'
        )

    def _loaded(self, run_id: str, load: LoggedLoad) -> None:
        if self._failed or self.store is None:
            return
        store = self.store
        try:
            self._open_loads[load.model] = store.add_load(run_id, load)
        except StoreError as exc:
            self._fault(exc)

    def unloaded(self, model: str) -> None:
        """``model`` left memory outside any run (a chat ended, a server's pool closed): its
        last recorded load gets its unload time."""
        self._unloaded(model, time.time())

    def _unloaded(self, model: str, at: float) -> None:
        load_id = self._open_loads.pop(model, None)
        if load_id is not None:
            self._write(lambda store: store.set_unloaded(load_id, at))

    def _snapshot(self, budget: Budget | None) -> dict[str, Any]:
        """The device at the start: the detected budget (the run's own when it was detected,
        else read once per process: detection may take NVML's start-up time) and the
        platform."""
        if budget is not None and budget.source in DETECTED:
            detected = budget.model_dump(mode="json")
        else:
            if self._device is None:
                self._device = detect_budget().model_dump(mode="json")
            detected = self._device
        return {**_platform(), "memory": detected}


class RunRecording:
    """One run being recorded; every method is a no-op when the run is not recorded
    (:attr:`id` None: mode "off", or the log failed)."""

    def __init__(
        self, recorder: Recorder, run_id: str | None, backends: Mapping[str, str], began: float
    ) -> None:
        self.recorder = recorder
        self.id = run_id
        self._backends = dict(backends)
        self._began = began
        self._finished = False

    def on_event(self, event: Event) -> None:
        """Write what ``event`` ends: a call (CallFinished), a load (ModelLoaded), an unload."""
        run_id = self.id
        if run_id is None or self._finished:
            return
        recorder = self.recorder
        if isinstance(event, CallFinished):
            call = self._call(event)
            recorder._write(lambda store: store.add_call(run_id, call))
        elif isinstance(event, ModelLoaded):
            now = time.time()
            load = LoggedLoad(
                model=event.model,
                device=event.device,
                node=event.node,
                started_at=now - event.seconds,
                seconds=event.seconds,
                bytes_estimated=event.estimated_bytes,
                bytes_measured=event.measured_bytes,
                bytes_peak=event.peak_bytes,
                unloaded_at=None,
            )
            recorder._loaded(run_id, load)
        elif isinstance(event, ModelUnloaded):
            recorder._unloaded(event.model, time.time())

    def finish(
        self,
        status: RunStatus,
        answer: str | None = None,
        error: str | None = None,
        seconds: float | None = None,
    ) -> None:
        """Close the run's row; ``seconds`` defaults to the time since :meth:`Recorder.start`.
        Only the first call counts (a run ends once)."""
        run_id = self.id
        if run_id is None or self._finished:
            return
        self._finished = True
        took = time.perf_counter() - self._began if seconds is None else seconds
        kept = answer if self.recorder.mode == "full" else None
        self.recorder._write(
            lambda store: store.finish_run(
                run_id, status=status, answer=kept, error=error, seconds=took
            )
        )

    def _call(self, event: CallFinished) -> LoggedCall:
        record, full = event.record, self.recorder.mode == "full"
        messages = event.request.messages if full and event.request is not None else None
        return LoggedCall(
            layer=record.layer,
            index=record.index,
            role=record.role,
            model=record.model,
            backend=self._backends.get(record.model, "unknown"),
            device=record.device,
            node=record.node,
            ok=record.ok,
            error=record.error,
            tokens_in=record.prompt_tokens,
            tokens_out=record.tokens,
            ttft_s=record.ttft_s,
            prefill_tok_s=record.prefill_tok_s,
            decode_tok_s=record.decode_tok_s,
            seconds=record.seconds,
            queued_at=record.queued_at,
            started_at=record.started_at,
            first_token_at=record.first_token_at,
            ended_at=record.ended_at,
            references=record.references,
            truncated=record.truncated,
            selected=record.selected,
            stop=record.stop,
            parsed=record.parsed,
            messages=messages,
            text=record.text if full else None,
        )


@contextlib.contextmanager
def recorded(recording: RunRecording, *, interrupted: str) -> Iterator[None]:
    """Close ``recording`` when the run in the block does not end well: "failed" on an error,
    "interrupted" (with ``interrupted`` as its error) when it was cancelled; the calls and
    loads that had finished are in the log already. A run that ends well is the caller's to
    finish, with its answer."""
    try:
        yield
    except asyncio.CancelledError:
        recording.finish("interrupted", error=interrupted)
        raise
    except LocalMoaError as exc:
        recording.finish("failed", error=str(exc))
        raise
    except Exception as exc:
        recording.finish("failed", error=f"{type(exc).__name__}: {exc}")
        raise


def _log_warning(line: str) -> None:
    log.warning("%s", line)


def _used_models(ensemble: Ensemble) -> list[str]:
    names = [agent.model for layer in ensemble.layers for agent in layer]
    names.append(ensemble.aggregator.model)
    if ensemble.judge is not None:
        names.append(ensemble.judge.model or ensemble.aggregator.model)
    if ensemble.roles is not None:
        names.append(ensemble.roles_model or ensemble.aggregator.model)
    return list(dict.fromkeys(names))


def _without_texts(value: Any) -> Any:
    """``value`` with every prompt text of an ensemble's config (:data:`_CONFIG_TEXTS`) None."""
    if isinstance(value, dict):
        return {k: None if k in _CONFIG_TEXTS else _without_texts(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_texts(v) for v in value]
    return value


@functools.cache
def _versions() -> dict[str, str]:
    """localmoa's and the backend libraries' versions, those installed (read once)."""
    found = {}
    for package in _VERSIONED:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    found["python"] = platform.python_version()
    return found


@functools.cache
def _platform() -> dict[str, Any]:
    return {
        "system": platform.system(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "ram_bytes": int(psutil.virtual_memory().total),
    }


def _plan_json(plan: Plan, stages: Sequence[str] | None) -> dict[str, Any]:
    """The plan as stored: its own JSON, with the stages' labels beside it when given."""
    dumped = plan.model_dump(mode="json")
    return {**dumped, "stage_labels": list(stages)} if stages else dumped
