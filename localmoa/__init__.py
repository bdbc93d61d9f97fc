"""localmoa: a local-first Mixture-of-Agents runner with a memory-aware scheduler.

The public surface; everything else is an implementation detail that may change.
"""

from localmoa.backends import (
    Backend,
    ChatDelta,
    ChatMessage,
    ChatRequest,
    FakeBackend,
    LlamaCppBackend,
    OllamaBackend,
    OpenAIBackend,
    make_backends,
)
from localmoa.config import Config, load_config, parse_config
from localmoa.errors import (
    AddressInUseError,
    BackendError,
    BudgetError,
    ConfigError,
    ConfigNotFoundError,
    EgressError,
    LayerFailedError,
    LocalMoaError,
    ModelFileError,
    ModelNotInstalledError,
    PromptTooLongError,
    RunError,
    ServerUnavailableError,
    UsageRefused,
    UserError,
)
from localmoa.footprint.estimate import Footprint, estimate, read_gguf
from localmoa.hardware import Budget, detect_budget
from localmoa.planning.fewest_loads import Plan, Wave, make_plan
from localmoa.runtime.admission import ModelPool, PlanResidency, PoolResidency, Residency
from localmoa.runtime.engine import CallRecord, Executor, RunResult
from localmoa.runtime.prepare import Prepared, prepare

__all__ = [
    "AddressInUseError",
    "Backend",
    "BackendError",
    "Budget",
    "BudgetError",
    "CallRecord",
    "ChatDelta",
    "ChatMessage",
    "ChatRequest",
    "Config",
    "ConfigError",
    "ConfigNotFoundError",
    "EgressError",
    "Executor",
    "FakeBackend",
    "Footprint",
    "LayerFailedError",
    "LlamaCppBackend",
    "LocalMoaError",
    "ModelFileError",
    "ModelNotInstalledError",
    "ModelPool",
    "OllamaBackend",
    "OpenAIBackend",
    "Plan",
    "PlanResidency",
    "PoolResidency",
    "Prepared",
    "PromptTooLongError",
    "Residency",
    "RunError",
    "RunResult",
    "ServerUnavailableError",
    "UsageRefused",
    "UserError",
    "Wave",
    "detect_budget",
    "estimate",
    "load_config",
    "make_backends",
    "make_plan",
    "parse_config",
    "prepare",
    "read_gguf",
]
