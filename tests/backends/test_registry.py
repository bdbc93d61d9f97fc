"""The one backend registry: what is derived from it, and backends made only when used."""

from __future__ import annotations

import sys
import typing
from typing import Any, get_args

import pytest

from localmoa.backends import (
    REGISTRY,
    REQUEST_OPTIONS,
    TIMED_BACKENDS,
    Backends,
    FakeBackend,
    LlamaCppBackend,
    OllamaBackend,
    backend_for,
    make_backends,
)
from localmoa.backends import registry as registry_module
from localmoa.config import Config, FakeModel, LlamaCppModel, Settings, parse_config
from localmoa.errors import ConfigError

EXTRA = "pip install 'localmoa[llamacpp]'"


@pytest.fixture
def no_llama_cpp(monkeypatch: pytest.MonkeyPatch) -> None:
    """llama_cpp unimportable, as in an install without the llamacpp extra."""
    monkeypatch.setitem(sys.modules, "llama_cpp", None)


def test_each_entry_names_its_table_by_its_tag() -> None:
    for kind in REGISTRY:
        assert get_args(kind.table.model_fields["backend"].annotation) == (kind.name,)


def test_the_config_union_and_the_timed_set_come_from_the_registry() -> None:
    annotated = Config.model_fields["models"].annotation
    union = get_args(get_args(annotated)[1])[0]
    assert set(typing.get_args(union)) == {kind.table for kind in REGISTRY}
    assert (
        {kind.name for kind in REGISTRY if kind.timed} == TIMED_BACKENDS == {"llamacpp", "ollama"}
    )


def test_config_messages_list_the_registrys_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"models": {"a": {"backend": "llamacp", "path": "a"}}})
    assert 'unknown backend "llamacp" (choose one of: llamacpp, ollama, openai, fake)' in str(
        caught.value
    )
    with pytest.raises(ConfigError) as caught:
        parse_config({"models": {"a": {"backend": "fake", "memory": 1, "path": "x"}}})
    assert "models.a.path: unknown key (allowed: backend, device, memory, reply," in str(
        caught.value
    )


def test_backends_are_made_when_first_asked_for() -> None:
    backends = make_backends(Settings(ollama_host="http://127.0.0.1:9"))
    assert isinstance(backends, Backends) and list(backends) == []
    ollama = backends["ollama"]
    assert isinstance(ollama, OllamaBackend) and ollama.host == "http://127.0.0.1:9"
    assert backends["ollama"] is ollama  # one instance per kind
    assert isinstance(backends["fake"], FakeBackend)
    assert list(backends) == ["ollama", "fake"]  # what closing iterates: only those made
    with pytest.raises(KeyError, match=r'no backend "nope" \(known: llamacpp, ollama'):
        backends["nope"]


def test_backend_for_gives_a_models_backend() -> None:
    fake = FakeBackend()
    models = {"m": FakeModel(backend="fake", memory=1)}
    assert backend_for({"fake": fake}, models, "m") is fake
    session = make_backends(Settings())
    assert backend_for(session, models, "m") is session["fake"]


def test_an_ollama_session_never_imports_llama_cpp(no_llama_cpp: None) -> None:
    backends = make_backends(Settings())
    backends["ollama"], backends["openai"], backends["fake"]
    assert "llamacpp" not in backends


def test_a_llamacpp_model_without_llama_cpp_names_the_extra(no_llama_cpp: None) -> None:
    models = {"qwen": LlamaCppModel(backend="llamacpp", path="qwen.gguf")}
    with pytest.raises(ConfigError) as caught:
        backend_for(make_backends(Settings()), models, "qwen")
    assert str(caught.value) == (
        'models.qwen uses backend "llamacpp", which needs llama-cpp-python, which is not '
        f"installed; install it with: {EXTRA}"
    )
    assert caught.value.exit_code == 2
    with pytest.raises(ConfigError, match=r'^backend "llamacpp" needs llama-cpp-python, which'):
        make_backends(Settings())["llamacpp"]


def test_a_broken_llama_cpp_says_to_reinstall(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(name: str) -> Any:
        raise RuntimeError("Failed to load shared library 'libllama.so'")

    monkeypatch.setattr(registry_module.importlib, "import_module", failing)
    with pytest.raises(ConfigError) as caught:
        make_backends(Settings())["llamacpp"]
    assert "installed but cannot be imported (Failed to load shared library" in str(caught.value)
    assert str(caught.value).endswith(f"{EXTRA} --force-reinstall")


def test_with_llama_cpp_the_backend_is_made() -> None:
    assert isinstance(make_backends(Settings())["llamacpp"], LlamaCppBackend)


def test_every_backend_says_which_request_options_it_honours() -> None:
    for kind in REGISTRY:
        backend = make_backends(Settings())[kind.name]
        assert type(backend).supports == frozenset(REQUEST_OPTIONS), kind.name
