"""Zero-config: the ensemble built from what a (fake) Ollama has, and the reasons it gives."""

from __future__ import annotations

from pathlib import Path

import pytest
from fake_ollama import FakeOllama, FakeOllamaModel
from servers import free_port

from localmoa.backends.ollama import OllamaBackend
from localmoa.config import Agent, OllamaModel, Settings
from localmoa.errors import ConfigNotFoundError
from localmoa.footprint.measurements import MeasurementCache
from localmoa.hardware import Budget
from localmoa.sizes import format_bytes
from localmoa.zeroconfig import LAYERS, MAX_PROPOSERS, ZeroConfig, from_ollama

GB = 1_000_000_000
MISSING = ConfigNotFoundError("no models.toml found")


def model(tag: str, family: str, gb: float, **kwargs: object) -> FakeOllamaModel:
    return FakeOllamaModel(name=tag, family=family, size=int(gb * GB), **kwargs)  # type: ignore[arg-type]


def backend(server: FakeOllama, tmp_path: Path) -> OllamaBackend:
    return OllamaBackend(server.url, cache=MeasurementCache(tmp_path / "measured.json"))


async def footprint(backend: OllamaBackend, tag: str) -> int:
    """What zero-config counts for ``tag``: its footprint at the default num_ctx."""
    found = await backend.find(tag, setting="test")
    return backend.estimate(found, OllamaModel(backend="ollama", model=tag)).total


async def build(
    models: list[FakeOllamaModel], tmp_path: Path, budget: int | None = None
) -> ZeroConfig:
    with FakeOllama(models) as server:
        ollama = backend(server, tmp_path)
        try:
            return await from_ollama(
                ollama,
                Budget(bytes=budget or 1000 * GB, source="flag", detail="test"),
                Settings(),
                MISSING,
            )
        finally:
            await ollama.aclose()


def proposers(built: ZeroConfig) -> list[list[str]]:
    return [[agent.model for agent in layer] for layer in built.config.ensembles["default"].layers]


async def test_one_proposer_per_family_largest_first(tmp_path: Path) -> None:
    built = await build(
        [
            model("llama3.2:3b", "llama", 2),
            model("llama3.1:8b", "llama", 5),
            model("qwen2.5:7b", "qwen2", 4.5),
            model("gemma2:9b", "gemma2", 5.5),
            model("phi3:3.8b", "phi3", 2.2),
        ],
        tmp_path,
    )
    # Families ordered by their largest model; only MAX_PROPOSERS of them propose.
    chosen = ["gemma2:9b", "llama3.1:8b", "qwen2.5:7b"]
    assert MAX_PROPOSERS == 3
    assert proposers(built) == [chosen] * LAYERS
    assert "not a proposer phi3:3.8b: at most 3 families are used" in built.reasons
    assert not any("llama3.2:3b" in reason for reason in built.reasons)  # smaller of a family
    for tag in chosen:
        assert any(r.startswith(f"proposer {tag}: largest ") for r in built.reasons), tag
    config = built.config
    assert set(config.models) == set(chosen)
    assert all(isinstance(m, OllamaModel) and m.model == tag for tag, m in config.models.items())


async def test_the_aggregator_is_the_largest_instruct_model(tmp_path: Path) -> None:
    built = await build(
        [
            model("llama3.1:70b-text-q2_K", "llama", 26),
            model("qwen2.5:14b-base", "qwen2", 9),
            model("qwen2.5:7b", "qwen2", 4.5),
            model("mistral:7b", "llama", 4.1),
        ],
        tmp_path,
    )
    assert built.config.ensembles["default"].aggregator == Agent(model="qwen2.5:7b")
    aggregator = [r for r in built.reasons if r.startswith("aggregator ")]
    assert len(aggregator) == 1
    assert aggregator[0].startswith("aggregator qwen2.5:7b: largest instruct model that fits")
    # The base and text variants still propose: only synthesis needs instruction tuning.
    assert proposers(built)[0] == ["llama3.1:70b-text-q2_K", "qwen2.5:14b-base"]
    assert set(built.config.models) == {"llama3.1:70b-text-q2_K", "qwen2.5:14b-base", "qwen2.5:7b"}


async def test_without_an_instruct_model_the_largest_aggregates(tmp_path: Path) -> None:
    built = await build(
        [model("llama3.1:8b-text", "llama", 5), model("qwen2.5:7b-base", "qwen2", 4.5)],
        tmp_path,
    )
    assert built.config.ensembles["default"].aggregator.model == "llama3.1:8b-text"


async def test_embedding_models_are_skipped_with_their_capabilities(tmp_path: Path) -> None:
    built = await build(
        [
            model("llama3.1:8b", "llama", 5),
            model("nomic-embed-text:latest", "nomic-bert", 0.3, capabilities=["embedding"]),
        ],
        tmp_path,
    )
    assert "skipped nomic-embed-text:latest: not a chat model (embedding)" in built.reasons
    assert set(built.config.models) == {"llama3.1:8b"}


async def test_models_over_the_budget_are_skipped_with_their_size(tmp_path: Path) -> None:
    models = [model("gemma2:27b", "gemma2", 16), model("gemma2:9b", "gemma2", 5.5)]
    with FakeOllama(models) as server:
        ollama = backend(server, tmp_path)
        big, small = await footprint(ollama, "gemma2:27b"), await footprint(ollama, "gemma2:9b")
        await ollama.aclose()
    budget = (big + small) // 2  # the 9B fits, the 27B does not
    built = await build(models, tmp_path, budget)
    assert (
        f"skipped gemma2:27b: needs {format_bytes(big)}, over the {format_bytes(budget)} budget"
        in built.reasons
    )
    assert f"proposer gemma2:9b: largest gemma2 model that fits ({format_bytes(small)})" in (
        built.reasons
    )
    assert set(built.config.models) == {"gemma2:9b"}


async def test_a_measured_footprint_counts_over_the_estimate(tmp_path: Path) -> None:
    with FakeOllama([model("llama3.1:8b", "llama", 5)]) as server:
        ollama = backend(server, tmp_path)
        estimate = await footprint(ollama, "llama3.1:8b")
        await ollama.load("l", OllamaModel(backend="ollama", model="llama3.1:8b"))
        measured = ollama.resident_bytes("l")
        await ollama.aclose()
        assert measured is not None and measured < estimate
        fresh = backend(server, tmp_path)  # a later session, reading the measurement cache
        budget = Budget(bytes=measured, source="flag", detail="test")  # fits only as measured
        built = await from_ollama(fresh, budget, Settings(), MISSING)
        await fresh.aclose()
    assert set(built.config.models) == {"llama3.1:8b"}
    assert f"({format_bytes(measured)})" in built.reasons[0]


async def test_nothing_fits_says_what_is_installed_and_what_to_pull(tmp_path: Path) -> None:
    with pytest.raises(ConfigNotFoundError) as caught:
        await build([model("llama3.1:8b", "llama", 5)], tmp_path, budget=GB)
    message = str(caught.value)
    assert message.startswith("no models.toml found; Ollama at http://127.0.0.1:")
    assert "has no chat model that fits the 953.7 MiB budget (installed: llama3.1:8b)" in message
    assert "`ollama pull qwen2.5:3b`, or write a models.toml" in message


async def test_only_embedding_models_is_no_ensemble(tmp_path: Path) -> None:
    embed = model("nomic-embed-text:latest", "nomic-bert", 0.3, capabilities=["embedding"])
    with pytest.raises(ConfigNotFoundError, match=r"has no chat model that fits"):
        await build([embed], tmp_path)


async def test_no_ollama_keeps_the_missing_config_in_the_message(tmp_path: Path) -> None:
    ollama = OllamaBackend(f"http://127.0.0.1:{free_port()}")
    budget = Budget(bytes=GB, source="flag", detail="test")
    with pytest.raises(ConfigNotFoundError) as caught:
        await from_ollama(ollama, budget, Settings(), MISSING)
    await ollama.aclose()
    assert str(caught.value).startswith(
        "no models.toml found; nor could one be built from Ollama: Ollama is not reachable at"
    )
