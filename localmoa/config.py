"""The models.toml schema, where the file is looked up, and how its problems are reported.

The file has three tables: ``[settings]`` (with ``[[settings.devices]]``, the devices declared
by hand, and ``[settings.cluster]``), ``[models.NAME]`` (one per model, tagged by ``backend``)
and ``[ensembles.NAME]`` (layers of agents plus an aggregator). Every table
forbids unknown keys, because a misspelt key silently ignored (``n_ctxx = 8192``) is a run that
quietly overflows memory later.

The ``[models.NAME]`` tables are the backends' own (:mod:`localmoa.backends.configs`): the union
of them, tagged by ``backend``, and the backends an error message lists are derived from the
backend registry (:mod:`localmoa.backends.registry`), so a new backend is added in one place.
Their classes are re-exported here for callers that build configs in code.

Sizes (``memory_budget``, a model's or a device's ``memory``) go through
:func:`localmoa.sizes.parse_size`, which refuses ``inf``, ``nan``, ``1e400`` and anything over
1 PiB with a ValueError, so each becomes a line naming its key.

Errors are collected, not raised one at a time: schema problems from pydantic and reference
problems (an agent naming a model that does not exist) are reported together, each with its key
path, in one :class:`~localmoa.errors.ConfigError`.
"""

from __future__ import annotations

import functools
import operator
import os
import re
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeAlias

import platformdirs
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ByteSize,
    Field,
    NonNegativeInt,
    PositiveInt,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from localmoa.backends.base import ResponseFormat, Seed, StopList
from localmoa.backends.configs import (
    MAX_PARALLEL,
    FakeModel,
    LlamaCppModel,
    ModelTable,
    OllamaModel,
    OpenAIModel,
)
from localmoa.backends.configs import StrictModel as _Strict
from localmoa.backends.configs import size_or_auto as _size
from localmoa.backends.registry import NAMES, REGISTRY
from localmoa.cluster.settings import ClusterSettings
from localmoa.errors import ConfigError, ConfigNotFoundError
from localmoa.hardware import DeviceKind
from localmoa.sizes import parse_size

__all__ = [
    "Agent",
    "Config",
    "DeviceDeclaration",
    "Ensemble",
    "FakeModel",
    "Judge",
    "LlamaCppModel",
    "ModelConfig",
    "OllamaModel",
    "OpenAIModel",
    "Settings",
    "find_config",
    "load_config",
    "parse_config",
    "user_config_dir",
]

CONFIG_NAME = "models.toml"

_AT = "localmoa_key"
"""The error type of :func:`_at`, which :func:`_describe` reads."""


def _at(key: str, message: str) -> PydanticCustomError:
    """A problem a table's own validator finds in one of its keys. Pydantic files a model
    validator's error under the table (settings.devices[0]); ``key`` (".index") names the key."""
    return PydanticCustomError(_AT, message, {"key": key})


_DEVICE_NAME = re.compile(r"[A-Za-z0-9_./:-]+")
_BYTE_SIZE = TypeAdapter(ByteSize)


def _device_name(name: str) -> str:
    if not name:
        raise ValueError('empty: name the device, e.g. name = "gpu0"')
    if not _DEVICE_NAME.fullmatch(name):
        raise ValueError(
            f"{name!r} is not a device name: use letters, digits and - _ . : only, "
            'e.g. "gpu0" or "node2:gpu1"'
        )
    return name


def _device_memory(value: Any) -> int:
    try:
        return parse_size(value)
    except ValueError:
        if _is_nothing(value):
            raise ValueError(
                f"{value!r} is no memory: give the bytes models may use on the device, above 0, "
                'e.g. memory = "24GiB" (to keep a GPU free, leave it out of settings.devices)'
            ) from None
        raise


def _is_nothing(value: Any) -> bool:
    """Is ``value`` a size, but of zero or fewer bytes (0, "0GiB")?"""
    if isinstance(value, bool):
        return False
    try:
        return int(_BYTE_SIZE.validate_python(value)) <= 0
    except (ValidationError, ValueError, OverflowError):
        return False


class DeviceDeclaration(_Strict):
    """One ``[[settings.devices]]`` table: a device the planner may place models on, declared
    by hand rather than read from the machine. For planning on paper (a machine you do not
    have), for tests, and to keep a GPU out of localmoa's hands (declare the others only)."""

    name: Annotated[str, AfterValidator(_device_name)]
    """How plans, ``--json`` and the records name it ("gpu0"). Letters, digits and - _ . :
    only: it is a JSON key and a column of ``localmoa plan``, and must read as one word."""
    memory: Annotated[int, BeforeValidator(_device_memory)]
    """Bytes of models it may hold at once ("24GiB"), used exactly as given (no margin is
    taken off a declared size)."""
    kind: DeviceKind = "gpu"
    """"gpu" (a discrete GPU), "unified" (Apple unified memory) or "cpu" (RAM)."""
    index: NonNegativeInt | None = None
    """A gpu's CUDA ordinal (as the process sees it, after CUDA_VISIBLE_DEVICES): llama.cpp's
    ``main_gpu`` for models placed on it. Unset: models placed on it are not pinned."""

    @model_validator(mode="after")
    def _index_is_a_gpus(self) -> DeviceDeclaration:
        if self.index is not None and self.kind != "gpu":
            raise _at(
                ".index",
                f'only a gpu device has an index, and this one is kind = "{self.kind}"; remove '
                'index, or set kind = "gpu"',
            )
        return self


class Settings(_Strict):
    """Run-wide settings: ``[settings]``."""

    memory_budget: Annotated[Literal["auto"] | int, BeforeValidator(_size)] = "auto"
    """"auto" = detected device memory minus a safety margin (see localmoa.hardware), or a size
    such as "12GiB" used exactly as given (at most 1 PiB: localmoa.sizes)."""
    max_parallel_calls: PositiveInt | None = None
    """Upper bound on calls running at once; unset = one per resident model."""
    max_calls_per_second: PositiveInt | None = None
    """Rate limit on call starts (useful when a backend is a shared server); unset = none."""
    ollama_host: str | None = None
    """Ollama's URL; unset = the OLLAMA_HOST environment variable, else http://127.0.0.1:11434."""
    allowed_hosts: list[str] = Field(default_factory=list)
    """Hosts other than loopback that network backends may reach (on-prem servers). Empty =
    loopback only: localmoa refuses any other host before connecting."""
    plan_for: Literal["time", "loads"] = "time"
    """"time": the fewest-loads plan, then a search for one the cost model estimates faster on
    this kind of machine (localmoa.planning.refine); "loads": the fewest-loads plan as it is."""
    min_gain: float = Field(default=0.05, ge=0.0, le=1.0)
    """A plan with more loads than the fewest is chosen only when the cost model estimates it
    at least this much faster (a fraction): below that, the estimate's own error could make it
    slower in fact. scripts/bench_fidelity.py measured that error on real llama.cpp runs: the
    predicted ratio of two plans is off by 1.9 % (median) where their loads differ, and one
    extra load predicted 3.3 % faster was 8.6 % slower; hence 5 %. Reorderings with as many
    loads as the fewest need no margin."""
    timing_profile: Literal[
        "auto", "laptop-8g", "desktop-24g", "server-80g", "apple-32g", "cpu-16g"
    ] = "auto"
    """The cost-model profile whose speeds time the plan (localmoa.planning.timing.PROFILES); "auto"
    picks by the detected device. Set it when `localmoa plan` names the wrong kind."""
    record: Literal["full", "metadata", "off"] = "full"
    """What the run log (``localmoa logs``; localmoa.records.store) keeps of each run: "full" =
    everything, the prompts, every message sent and every answer included; "metadata" = models,
    timings, token counts and errors, but no prompt, message or answer text anywhere in the
    file; "off" = nothing is written, no file is even created. The LOCALMOA_RECORD environment
    variable, when set, overrides this."""
    devices: list[DeviceDeclaration] = Field(default_factory=list)
    """``[[settings.devices]]``: the devices plans use, in this order, instead of the ones
    detected (localmoa.hardware.resolve_devices); empty = detect them. Not together with
    ``memory_budget``, which stands for one device."""
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    """``[settings.cluster]``: which engine runs the models, and where (localmoa.cluster)."""

    def device_problems(self) -> list[str]:
        """What :func:`parse_config` would say of ``devices`` between tables (a name or GPU
        declared twice, ``memory_budget`` beside them): for settings made in code."""
        return _device_problems(self.model_dump(include={"devices", "memory_budget"}))


if TYPE_CHECKING:
    ModelConfig: TypeAlias = ModelTable
    """To the type checker, a model's table is some backend's: narrow with ``isinstance``."""
else:
    ModelConfig = Annotated[
        functools.reduce(operator.or_, (k.table for k in REGISTRY)),
        Field(discriminator="backend"),
    ]
    """A ``[models.NAME]`` table: the registry's tables, chosen by their ``backend`` tag."""
BACKENDS = NAMES
"""The ``backend`` values models.toml accepts (from the registry)."""


def _aggregate_prompt(text: str) -> str:
    if "{responses}" not in text:
        raise ValueError(
            'must contain {responses}, where the numbered answers go, e.g. "Merge these '
            'answers into one:\n\n{responses}"'
        )
    return text


AggregatePrompt = Annotated[str, AfterValidator(_aggregate_prompt)]


class Agent(_Strict):
    """One agent in a layer: a model plus optional per-agent sampling and system prompt.

    In TOML either a model name (``"qwen"``) or an inline table
    (``{model = "qwen", temperature = 0.2}``).
    """

    model: str
    system_prompt: str | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    max_tokens: PositiveInt | None = None
    stop: StopList | None = None
    """Strings that end this agent's answer (one, or a list of up to 4); not included in it."""
    seed: Seed | None = None
    """Sampling seed of this agent's calls, for reproducible answers (beats a model's seed)."""
    response_format: ResponseFormat | None = None
    """OpenAI's shape: ``{type = "json_object"}`` for any JSON object, or ``{type =
    "json_schema", json_schema = {name = "...", schema = {...}}}`` for JSON matching a schema."""
    aggregate_prompt: AggregatePrompt | None = None
    """Replaces the ensemble's aggregate-and-synthesize instruction for this agent's calls
    (those that read references); ``{responses}`` marks where the numbered answers go."""
    samples: Annotated[int, Field(ge=1, le=MAX_PARALLEL)] = 1
    """Answers this agent gives, each its own call with its own seed (Self-MoA, arXiv
    2502.00674): on llama.cpp they decode together as parallel sequences of one context."""

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: Any) -> Any:
        return {"model": data} if isinstance(data, str) else data


class Judge(_Strict):
    """Sparse MoA's judge (arXiv 2411.03284): after each proposer layer, one call reads the
    layer's answers and passes only the best ``top_k`` on; with ``early_stop`` it may also end
    the proposer layers early when the answers agree.

    In TOML an inline table (``{model = "qwen", top_k = 2, early_stop = true}``) or a model
    name alone."""

    model: str | None = None
    """The judging model; unset = the aggregator's."""
    top_k: PositiveInt = 2
    """Answers passed on, best first; fewer than the layer's answers."""
    early_stop: bool = False
    """May the judge end the proposer layers early (``"stop": true``)?"""
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    """0 by default: a judgement should not be a dice roll."""
    max_tokens: PositiveInt = 256
    """Room for the JSON verdict and its one-line reason."""

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: Any) -> Any:
        return {"model": data} if isinstance(data, str) else data


class Ensemble(_Strict):
    """Layers of proposer agents, then one aggregator that writes the answer."""

    layers: list[Annotated[list[Agent], Field(min_length=1)]] = Field(min_length=1)
    aggregator: Agent
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    max_tokens: PositiveInt = 512
    cycles: PositiveInt = 1
    """The layer list runs this many times over (groq-moa's knob): ``layers = [A, B]`` with
    ``cycles = 2`` is layers A, B, A, B, then the aggregator."""
    aggregate_prompt: AggregatePrompt | None = None
    """Replaces the built-in aggregate-and-synthesize instruction for every call that reads
    references (an agent's own ``aggregate_prompt`` wins); ``{responses}`` marks where the
    numbered answers go."""
    judge: Judge | None = None
    """Sparse MoA: a judge after each proposer layer (see :class:`Judge`)."""
    roles: Literal["auto"] | None = None
    """"auto": one call writes a distinct role (occupation, viewpoint, style) per proposer
    for ``task``, cached on disk and merged into each proposer's system message."""
    task: str | None = None
    """What the ensemble is for, in a sentence: what ``roles = "auto"`` writes roles for."""
    roles_model: str | None = None
    """The model that writes the roles; unset = the aggregator's."""
    final: Literal["aggregate", "select"] = "aggregate"
    """"aggregate": the aggregator writes the answer; "select": the judge's first choice of
    the last layer is the answer (the MoA paper's LLM-Ranker baseline, for comparisons)."""


class Config(_Strict):
    """A whole models.toml, plus where it came from (to resolve relative paths)."""

    settings: Settings = Settings()
    models: dict[str, ModelConfig] = Field(default_factory=dict, validate_default=True)
    ensembles: dict[str, Ensemble] = Field(default_factory=dict)
    source: Path | None = Field(default=None, exclude=True)

    @field_validator("models")
    @classmethod
    def _models_present(cls, models: dict[str, Any]) -> dict[str, Any]:
        if not models:
            raise ValueError("no models defined: add at least one [models.NAME] table")
        return models

    def ensemble(self, name: str) -> Ensemble:
        """The named ensemble, or a ConfigError listing the ones that exist."""
        try:
            return self.ensembles[name]
        except KeyError:
            known = ", ".join(sorted(self.ensembles)) or "none defined"
            where = f"{self.source}: " if self.source else ""
            raise ConfigError(
                f'{where}no ensemble "{name}" (defined: {known}); '
                f"add [ensembles.{name}] or pass --ensemble with one of those"
            ) from None


def user_config_dir() -> Path:
    """Where the user's models.toml lives: ``$LOCALMOA_HOME`` if set, else the platform dir."""
    home = os.environ.get("LOCALMOA_HOME")
    return Path(home) if home else Path(platformdirs.user_config_dir("localmoa"))


def find_config(explicit: Path | None = None, *, cwd: Path | None = None) -> Path:
    """``--config FILE``, else ./models.toml, else the user config dir's models.toml."""
    if explicit is not None:
        if not explicit.is_file():
            raise ConfigError(f"config file {explicit} does not exist; check the --config path")
        return explicit
    candidates = [(cwd or Path.cwd()) / CONFIG_NAME, user_config_dir() / CONFIG_NAME]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = " and ".join(str(c) for c in candidates)
    raise ConfigNotFoundError(
        f"no {CONFIG_NAME} found (looked at {looked}); create one from the commented example "
        "in the localmoa repository, or pass --config FILE"
    )


def load_config(explicit: Path | None = None) -> Config:
    """Find, read and validate models.toml."""
    path = find_config(explicit)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    return parse_config(raw, source=path)


def parse_config(raw: Mapping[str, Any], *, source: Path | None = None) -> Config:
    """Validate a parsed TOML document; every problem is reported in one ConfigError."""
    problems: list[str] = []
    config: Config | None = None
    try:
        config = Config.model_validate({**raw, "source": source})
    except ValidationError as exc:
        problems.extend(_describe(error, raw) for error in exc.errors())
    problems.extend(_reference_problems(raw))
    problems.extend(_variant_problems(raw))
    problems.extend(_device_problems(raw.get("settings")))
    if problems:
        where = str(source) if source else CONFIG_NAME
        unique = list(dict.fromkeys(problems))
        noun = "problem" if len(unique) == 1 else f"{len(unique)} problems"
        raise ConfigError(f"{where}: {noun}:\n" + "\n".join(f"  {p}" for p in unique))
    assert config is not None
    return _resolve_paths(config)


def _resolve_paths(config: Config) -> Config:
    base = config.source.parent if config.source else Path.cwd()
    models: dict[str, ModelConfig] = {}
    for name, model in config.models.items():
        if isinstance(model, LlamaCppModel):
            path = model.path.expanduser()
            model = model.model_copy(update={"path": path if path.is_absolute() else base / path})
        models[name] = model
    return config.model_copy(update={"models": models})


def _key_path(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _describe(error: Mapping[str, Any], raw: Mapping[str, Any]) -> str:
    """One pydantic error as ``key.path: message`` in the TOML's own terms."""
    loc = list(error["loc"])
    # A tagged union puts the tag in the path (models.qwen.llamacpp.path): drop it.
    if len(loc) >= 3 and loc[0] == "models" and loc[2] in BACKENDS:
        del loc[2]
    path = _key_path(loc) or "(top level)"
    kind, ctx = error["type"], error.get("ctx") or {}
    choices = ", ".join(BACKENDS)
    keys = tuple(part for part in loc if not isinstance(part, int))
    if kind == _AT:
        return f"{path}{ctx['key']}: {error['msg']}"
    if kind == "extra_forbidden":
        return f"{path}: unknown key{_allowed_keys(loc, raw)}"
    if kind == "missing" and keys in _MISSING_HINTS:
        return f"{path}: required key is missing: {_MISSING_HINTS[keys]}"
    if kind == "missing":
        return f"{path}: required key is missing"
    if kind == "list_type" and keys == ("settings", "devices"):
        return f"{path}: write one [[settings.devices]] table per device (double brackets)"
    if kind == "union_tag_invalid":
        return f'{path}.backend: unknown backend "{ctx.get("tag")}" (choose one of: {choices})'
    if kind == "union_tag_not_found":
        return f"{path}.backend: required key is missing (choose one of: {choices})"
    if kind == "too_short" and loc[-1:] == ["layers"]:
        return f"{path}: needs at least one layer of agents"
    if kind == "too_short" and loc[-2:-1] == ["layers"]:
        return f"{path}: a layer needs at least one agent (a model name or {{model = ...}})"
    message = str(error["msg"])
    if message.startswith("Value error, "):
        message = message.removeprefix("Value error, ")
    return f"{path}: {message}"


_MISSING_HINTS = {
    ("settings", "devices", "name"): 'name the device, e.g. name = "gpu0"',
    ("settings", "devices", "memory"): (
        'give the bytes models may use on the device, e.g. memory = "24GiB"'
    ),
}
"""What to write where a required key is missing, by key path without list positions."""


def _allowed_keys(loc: Sequence[int | str], raw: Mapping[str, Any]) -> str:
    owner: type[BaseModel] | None = None
    if loc[:2] == ["settings", "devices"] and len(loc) == 4:
        owner = DeviceDeclaration
    elif loc[:2] == ["settings", "cluster"] and len(loc) == 3:
        owner = ClusterSettings
    elif loc[:1] == ["settings"]:
        owner = Settings
    elif loc[:1] == ["models"] and len(loc) >= 3:
        model = raw.get("models", {}).get(loc[1], {})
        tag = model.get("backend") if isinstance(model, dict) else None
        owner = next((k.table for k in REGISTRY if k.name == tag), None)
    elif loc[:1] == ["ensembles"] and len(loc) == 3:
        owner = Ensemble
    elif loc[:1] == ["ensembles"] and len(loc) > 3 and loc[2] == "judge":
        owner = Judge
    elif loc[:1] == ["ensembles"] and len(loc) > 3:
        owner = Agent
    elif len(loc) == 1:
        return " (top-level tables are [settings], [models.NAME], [ensembles.NAME])"
    if owner is None:
        return ""
    keys = [k for k, f in owner.model_fields.items() if not f.exclude]
    return f" (allowed: {', '.join(keys)})"


def _agents(raw: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """Every agent in the raw document with its key path, tolerating malformed shapes."""
    ensembles = raw.get("ensembles")
    if not isinstance(ensembles, dict):
        return
    for name, ensemble in ensembles.items():
        if not isinstance(ensemble, dict):
            continue
        layers = ensemble.get("layers")
        if isinstance(layers, list):
            for i, layer in enumerate(layers):
                if isinstance(layer, list):
                    for j, agent in enumerate(layer):
                        yield f"ensembles.{name}.layers[{i}][{j}]", agent
        if "aggregator" in ensemble:
            yield f"ensembles.{name}.aggregator", ensemble["aggregator"]
        if "judge" in ensemble:
            judge = ensemble["judge"]
            if isinstance(judge, str):
                yield f"ensembles.{name}.judge", judge
            elif isinstance(judge, dict) and "model" in judge:
                yield f"ensembles.{name}.judge.model", judge["model"]
        if "roles_model" in ensemble:
            yield f"ensembles.{name}.roles_model", ensemble["roles_model"]


def _reference_problems(raw: Mapping[str, Any]) -> list[str]:
    models = raw.get("models")
    known = set(models) if isinstance(models, dict) else set()
    problems = []
    for path, agent in _agents(raw):
        name = agent.get("model") if isinstance(agent, dict) else agent
        if isinstance(name, str) and name not in known:
            listed = ", ".join(sorted(known)) or "none defined"
            problems.append(f'{path}: unknown model "{name}" (defined: {listed})')
    return problems


def _variant_problems(raw: Mapping[str, Any]) -> list[str]:
    """What each ensemble's variants ask that its own shape cannot give, with the key path:
    a ``top_k`` that keeps every answer of some layer, ``roles = "auto"`` without a task.
    Read from the raw tables, tolerating malformed shapes, so that these are reported with every
    other problem of the file at once (a value of the wrong type is pydantic's to report)."""
    ensembles = raw.get("ensembles")
    if not isinstance(ensembles, dict):
        return []
    problems = []
    for name, table in ensembles.items():
        if not isinstance(table, dict):
            continue
        where = f"ensembles.{name}"
        task = table.get("task")
        if table.get("roles") == "auto" and not (isinstance(task, str) and task.strip()):
            problems.append(
                f'{where}.roles: "auto" needs {where}.task = "..." (what the ensemble is for, '
                "in a sentence): the roles are written for it"
            )
        judge = table.get("judge")
        top_k = judge.get("top_k", 2) if isinstance(judge, dict) else 2 if judge else None
        layers = table.get("layers")
        if not isinstance(top_k, int) or top_k < 1 or not isinstance(layers, list):
            continue
        for number, layer in enumerate(layers):
            answers = _answers(layer)
            if answers is not None and top_k >= answers:
                problems.append(
                    f"{where}.judge.top_k: {top_k} keeps every answer of layers[{number}] "
                    f"({answers} answers), so the judge would leave nothing out; use a top_k "
                    f"below {answers}, or remove the judge"
                )
    return problems


def _device_problems(settings: Any) -> list[str]:
    """What ``settings.devices`` says wrong across its tables: a device declared twice (by name,
    or a gpu by index), or ``memory_budget`` set beside it. Read from the raw tables, tolerating
    malformed shapes, so that these are reported with every other problem of the file at once
    (a table's own mistakes are :class:`DeviceDeclaration`'s to report)."""
    if not isinstance(settings, Mapping):
        return []
    devices = settings.get("devices")
    if not isinstance(devices, list) or not devices:
        return []
    problems = []
    budget = settings.get("memory_budget")
    if budget is not None and budget != "auto":
        problems.append(
            "settings.memory_budget: set together with settings.devices; keep one "
            "(settings.devices declares every device a plan may use, memory_budget is the "
            'size of one): remove memory_budget or set it to "auto"'
        )
    names: dict[str, int] = {}
    gpus: dict[int, int] = {}
    for position, device in enumerate(devices):
        if not isinstance(device, Mapping):
            continue
        where = f"settings.devices[{position}]"
        name = device.get("name")
        if isinstance(name, str) and name in names:
            problems.append(
                f'{where}.name: "{name}" is declared twice (also settings.devices'
                f"[{names[name]}]); give each device its own name"
            )
        elif isinstance(name, str):
            names[name] = position
        index = device.get("index")
        if device.get("kind", "gpu") != "gpu" or not isinstance(index, int):
            continue
        if index in gpus:
            problems.append(
                f"{where}.index: GPU {index} is declared twice (also settings.devices"
                f"[{gpus[index]}]); give each device its own GPU index"
            )
        else:
            gpus[index] = position
    return problems


def _answers(layer: Any) -> int | None:
    """How many answers a raw layer gives (each agent's ``samples``); None when malformed."""
    if not isinstance(layer, list):
        return None
    total = 0
    for agent in layer:
        samples = agent.get("samples", 1) if isinstance(agent, dict) else 1
        if not isinstance(samples, int) or samples < 1:
            return None
        total += samples
    return total
