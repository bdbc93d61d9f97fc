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
    DeviceLost,
    EgressError,
    LayerFailedError,
    LocalMoaError,
    MissingExtraError,
    ModelFileError,
    ModelNotInstalledError,
    PromptTooLongError,
    RunError,
    ServerUnavailableError,
    StoreError,
    UsageRefused,
    UserError,
)
from localmoa.footprint.estimate import Footprint, estimate, read_gguf
from localmoa.hardware import Budget, Device, Placement, detect_budget, detect_devices
from localmoa.planning import PlanPolicy, plan_run
from localmoa.planning.fewest_loads import Plan, Wave, make_plan
from localmoa.runtime.engine import Executor
from localmoa.runtime.events import CallRecord, RunResult
from localmoa.runtime.moa import Call
from localmoa.runtime.prepare import Prepared, prepare
from localmoa.serve.pool import ModelPool

__all__ = [
    "AddressInUseError",
    "Backend",
    "BackendError",
    "Budget",
    "BudgetError",
    "Call",
    "CallRecord",
    "ChatDelta",
    "ChatMessage",
    "ChatRequest",
    "Config",
    "ConfigError",
    "ConfigNotFoundError",
    "Device",
    "DeviceLost",
    "EgressError",
    "Executor",
    "FakeBackend",
    "Footprint",
    "LayerFailedError",
    "LlamaCppBackend",
    "LocalMoaError",
    "MissingExtraError",
    "ModelFileError",
    "ModelNotInstalledError",
    "ModelPool",
    "OllamaBackend",
    "OpenAIBackend",
    "Placement",
    "Plan",
    "PlanPolicy",
    "Prepared",
    "PromptTooLongError",
    "RunError",
    "RunResult",
    "ServerUnavailableError",
    "StoreError",
    "UsageRefused",
    "UserError",
    "Wave",
    "detect_budget",
    "detect_devices",
    "estimate",
    "load_config",
    "make_backends",
    "make_plan",
    "parse_config",
    "plan_run",
    "prepare",
    "read_gguf",
]
