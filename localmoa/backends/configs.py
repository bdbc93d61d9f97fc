"""The ``[models.NAME]`` table of each backend, and the strict base every table of models.toml has.

These live with the backends, not in :mod:`localmoa.config`, because the backend registry
(:mod:`localmoa.backends.registry`) pairs each ``backend = "..."`` tag with its table, and
``localmoa.config`` derives its tagged union from that registry: the tables must be importable
without ``localmoa.config``, or the two modules would import each other. Nothing here imports a
backend's runtime library, so reading a models.toml never needs llama.cpp.

Every table forbids unknown keys, because a misspelt key silently ignored (``n_ctxx = 8192``)
is a run that quietly overflows memory later. Sizes (``memory``) go through
:func:`localmoa.sizes.parse_size`, which refuses ``inf``, ``nan``, ``1e400`` and anything over
1 PiB, so each becomes a line naming its key. Context lengths stop at 2^30 tokens (a hundred
times the longest real context, 10M): the KV cache grows with them, and the memory estimate must
stay a sane number of bytes.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, NonNegativeFloat, PositiveInt

from localmoa.sizes import parse_size

__all__ = [
    "MAX_CTX",
    "MAX_PARALLEL",
    "ContextLength",
    "FakeModel",
    "LlamaCppModel",
    "ModelTable",
    "OllamaModel",
    "OpenAIModel",
    "Parallel",
    "Size",
    "StrictModel",
    "context_tokens",
    "pinned_models",
    "size_or_auto",
    "split_models",
]


def size_or_auto(value: Any) -> Any:
    """Sizes as people write them; "auto" passes through to the field that allows it."""
    return value if value == "auto" else parse_size(value)


Size = Annotated[int, BeforeValidator(size_or_auto)]
MAX_CTX = 1 << 30
ContextLength = Annotated[int, Field(gt=0, le=MAX_CTX)]
MAX_PARALLEL = 64
Parallel = Annotated[int, Field(gt=0, le=MAX_PARALLEL)]
"""Sequences one model answers at once: each holds its own context's KV cache, so the bound
keeps a memory estimate sane (llama.cpp itself allows 256)."""


class StrictModel(BaseModel):
    """A table of models.toml: unknown keys are errors, values never change once read."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelTable(StrictModel):
    """What every ``[models.NAME]`` table has, whatever its backend: the tag that chooses the
    backend. Code that needs a backend's own keys narrows with ``isinstance`` to its table."""

    backend: str
    device: str | None = None
    """Pins the model to this device (a name from ``[[settings.devices]]``, or as found: gpu0,
    gpu1...): the planner places it nowhere else. How a backend that places models itself is
    planned per device: one Ollama server per GPU, each model on its server's GPU."""


class LlamaCppModel(ModelTable):
    """A GGUF file run in process by llama.cpp (llama-cpp-python, the ``llamacpp`` extra)."""

    backend: Literal["llamacpp"]
    path: Path
    """GGUF file; ``~`` is expanded, relative paths are relative to the config file."""
    n_ctx: ContextLength = 4096
    n_gpu_layers: int = -1
    """Layers offloaded to the GPU: -1 = all (ignored by CPU-only builds)."""
    n_batch: PositiveInt = 512
    n_threads: PositiveInt | None = None
    use_mmap: bool = True
    parallel: Parallel | None = None
    """Sequences decoded together in one context (an agent's ``samples``, Self-MoA), each with
    its own n_ctx of KV cache, all counted in the memory estimate; unset = the most samples any
    agent of the run asks of this model."""
    seed: int | None = None
    """Sampling seed for reproducible answers; unset = random. An agent's ``seed`` wins."""
    memory: Size | None = None
    """Overrides the estimate from the GGUF header; the planner uses it as-is."""
    split: bool = False
    """May span several GPUs (llama.cpp's tensor_split) when it fits on none alone. Off by
    default: a split model pays for transfers between GPUs on every token."""


class OllamaModel(ModelTable):
    """A model served by a local Ollama; localmoa decides when it is loaded and unloaded."""

    backend: Literal["ollama"]
    model: str
    """The Ollama tag, e.g. "llama3.1:8b"."""
    num_ctx: ContextLength = 4096
    """Context length, sent with every request for this model (preload included), so Ollama
    never reloads it because options changed."""
    parallel: Parallel = 1
    """Requests the Ollama server answers at once for one model: set it to the server's
    ``OLLAMA_NUM_PARALLEL``. An agent's ``samples`` go this many at a time (else one after
    another); Ollama holds num_ctx of KV cache per slot, which the estimate counts."""
    memory: Size | None = None
    """Overrides the estimate and any measurement."""
    ollama_host: str | None = Field(default=None, min_length=1)
    """The Ollama server this model is on ("127.0.0.1:11435", a URL); unset =
    ``settings.ollama_host``, else OLLAMA_HOST, else 127.0.0.1:11434. Ollama cannot pin a
    model to a GPU, so several GPUs are served by one ``ollama serve`` each (its own
    ``CUDA_VISIBLE_DEVICES`` and port) and each model names its server here. A host off this
    machine must be listed in ``settings.allowed_hosts``."""


class OpenAIModel(ModelTable):
    """A model behind an OpenAI-compatible server (llama-server, LM Studio, vLLM...)."""

    backend: Literal["openai"]
    base_url: str
    """The API root, e.g. "http://127.0.0.1:8080/v1"."""
    model: str
    """The model id the server expects."""
    api_key: str | None = None
    """Sent as a Bearer token when set."""
    parallel: Parallel = 1
    """Requests the server answers at once (llama-server's ``--parallel``): an agent's
    ``samples`` go this many at a time, else one after another."""
    memory: Size | None = None
    """Counted against the budget only when declared: such servers manage their own models, so
    by default localmoa treats them as always resident and outside its budget."""


class FakeModel(ModelTable):
    """A model that answers from a script, for trying plans and for tests (no weights at all)."""

    backend: Literal["fake"]
    memory: Size
    reply: str = "{model} has considered: {prompt}"
    """Reply template; ``{model}``, ``{prompt}`` (the last user message) and ``{seed}`` (the
    request's seed, or ``none``) are filled in, in one pass; other braces are literal, so a
    template may be JSON."""
    load_seconds: NonNegativeFloat = 0.0
    seconds_per_token: NonNegativeFloat = 0.0
    fail: str | None = None
    """When set, every call to this model fails with this message."""
    n_ctx: ContextLength | None = None
    """When set, a call whose prompt (counted as the backend's documented estimate) plus
    ``max_tokens`` exceeds it fails as a real context overflow would; unset = no limit."""
    parallel: Parallel = 1
    """Requests answered at once (an agent's ``samples``), as a server's slots would."""


def context_tokens(model: ModelTable) -> int | None:
    """The context a model is configured with, in tokens (each sequence's); None when localmoa
    does not know it (an OpenAI-compatible server's, a fake's without ``n_ctx``)."""
    for key in ("n_ctx", "num_ctx"):
        value = getattr(model, key, None)
        if isinstance(value, int):
            return value
    return None


def split_models(tables: Mapping[str, ModelTable]) -> list[str]:
    """The models that may span several devices (``split = true``)."""
    return [name for name, table in tables.items() if getattr(table, "split", False)]


def pinned_models(tables: Mapping[str, ModelTable], devices: Collection[str]) -> dict[str, str]:
    """The models pinned (``device = "..."``) to one of ``devices``: a pin to a device that the
    plans do not name (several devices planned as their sum) does not hold."""
    return {
        name: table.device
        for name, table in tables.items()
        if table.device is not None and table.device in devices
    }
