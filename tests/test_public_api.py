"""The curated public surface: complete, importable, and free of accidents."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import localmoa
from localmoa import errors


def test_every_exported_name_exists_and_the_list_is_sorted() -> None:
    assert localmoa.__all__ == sorted(localmoa.__all__)
    for name in localmoa.__all__:
        assert getattr(localmoa, name) is not None


def test_every_error_of_the_tree_is_exported() -> None:
    tree = [
        getattr(errors, name) for name in errors.__all__ if isinstance(getattr(errors, name), type)
    ]
    assert all(issubclass(cls, errors.LocalMoaError) for cls in tree)
    assert {cls.__name__ for cls in tree} <= set(localmoa.__all__)
    assert all(cls.__name__ in (errors.__doc__ or "") for cls in tree)  # drawn in the docstring


def test_user_errors_exit_2_and_run_errors_exit_1() -> None:
    assert errors.UserError("x").exit_code == 2 and errors.ConfigNotFoundError("x").exit_code == 2
    assert errors.RunError("x").exit_code == 1 and errors.BackendError("m", "x").exit_code == 1


def test_every_module_imports_without_reading_config_or_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LOCALMOA_HOME", "/nonexistent/should-not-be-read")
    for module in pkgutil.walk_packages(localmoa.__path__, "localmoa."):
        if module.name != "localmoa.__main__":
            importlib.import_module(module.name)


def test_the_engine_its_calls_and_the_shared_pool_are_public_and_the_wave_classes_gone() -> None:
    assert {"Call", "CallRecord", "Executor", "ModelPool", "RunResult"} <= set(localmoa.__all__)
    for gone in ("Residency", "PlanResidency", "PoolResidency"):
        assert not hasattr(localmoa, gone)
