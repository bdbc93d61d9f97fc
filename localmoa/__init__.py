"""localmoa: a local-first Mixture-of-Agents runner with a memory-aware scheduler.

The public surface; everything else is an implementation detail that may change.
"""

from localmoa.backends import Backend, ChatMessage, ChatRequest, FakeBackend, LlamaCppBackend
from localmoa.config import Config, load_config, parse_config
from localmoa.ensemble import Prepared, prepare
from localmoa.errors import (
    BackendError,
    BudgetError,
    ConfigError,
    LayerFailedError,
    LocalMoaError,
    ModelFileError,
    RunError,
    UserError,
)
from localmoa.executor import CallRecord, Executor, RunResult
from localmoa.hardware import Budget, detect_budget
from localmoa.memory import Footprint, estimate, read_gguf
from localmoa.planner import Plan, Wave, make_plan

__all__ = [
    "Backend",
    "BackendError",
    "Budget",
    "BudgetError",
    "CallRecord",
    "ChatMessage",
    "ChatRequest",
    "Config",
    "ConfigError",
    "Executor",
    "FakeBackend",
    "Footprint",
    "LayerFailedError",
    "LlamaCppBackend",
    "LocalMoaError",
    "ModelFileError",
    "Plan",
    "Prepared",
    "RunError",
    "RunResult",
    "UserError",
    "Wave",
    "detect_budget",
    "estimate",
    "load_config",
    "make_plan",
    "parse_config",
    "prepare",
    "read_gguf",
]
