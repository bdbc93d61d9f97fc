"""Checks made before anything loads: the prompt's size against the ensemble's contexts."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any

import pytest

from localmoa.backends import llamacpp, make_backends
from localmoa.backends.base import Backend, ChatMessage
from localmoa.backends.llamacpp import LlamaCppBackend
from localmoa.config import Config, Settings, parse_config
from localmoa.errors import PromptTooLongError
from localmoa.runtime.moa import build_request, calls_for
from localmoa.runtime.prepare import (
    CHARS_PER_TOKEN_MAX,
    check_prompt,
    context_tokens,
    prepare,
    prompt_char_limit,
)

TINY_N_CTX = 256


def config_for(
    tiny_models: dict[str, Path],
    layer: list[str],
    aggregator: str,
    *,
    n_ctx: dict[str, int] | None = None,
    extra: dict[str, Any] | None = None,
) -> Config:
    models: dict[str, Any] = {
        name: {"backend": "llamacpp", "path": str(path), "n_ctx": (n_ctx or {}).get(name, 2048)}
        for name, path in tiny_models.items()
    }
    models.update(extra or {})
    return parse_config(
        {
            "models": models,
            "ensembles": {"default": {"layers": [layer], "aggregator": aggregator}},
        }
    )


def backends() -> dict[str, Backend]:
    return make_backends(Settings())


async def check(config: Config, text: str, found: dict[str, Backend] | None = None) -> None:
    stages = calls_for(config.ensemble("default"))
    messages = [ChatMessage(role="user", content=text)]
    await check_prompt(config, stages, found or backends(), messages)


async def tokens_of(config: Config, model: str, text: str, *, aggregating: bool = False) -> int:
    """What the model would read: the request its call sends (references not known yet)."""
    stages = calls_for(config.ensemble("default"))
    call = next(c for stage in stages for c in stage if c.model == model)
    question = [ChatMessage(role="user", content=text)]
    request = build_request(call, question, [] if aggregating else None)
    return await LlamaCppBackend().prompt_tokens(model, config.models[model], request.messages)


def test_context_tokens_and_the_character_limit(tiny_models: dict[str, Path]) -> None:
    config = config_for(
        tiny_models,
        ["tiny-a", "tiny-b", "o", "f"],
        "tiny-c",
        n_ctx={"tiny-a": 1024},
        extra={
            "o": {"backend": "ollama", "model": "x:1b", "num_ctx": 8192},
            "f": {"backend": "fake", "memory": "1GiB"},
            "w": {"backend": "openai", "base_url": "http://127.0.0.1:1/v1", "model": "w"},
        },
    )
    assert context_tokens(config.models["tiny-a"]) == 1024
    assert context_tokens(config.models["o"]) == 8192
    assert context_tokens(config.models["f"]) is None
    assert context_tokens(config.models["w"]) is None
    stages = calls_for(config.ensemble("default"))
    assert prompt_char_limit(config, stages) == 8192 * CHARS_PER_TOKEN_MAX
    unknown = parse_config(
        {
            "models": config.model_dump(include={"models": {"f", "w"}})["models"],
            "ensembles": {"default": {"layers": [["f"]], "aggregator": "w"}},
        }
    )
    assert prompt_char_limit(unknown, calls_for(unknown.ensemble("default"))) is None


async def test_text_far_beyond_every_context_is_refused_without_tokenizing(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*args: Any) -> int:
        raise AssertionError("the tokenizer was handed the prompt")

    monkeypatch.setattr(llamacpp, "_count", never)
    config = config_for(tiny_models, ["tiny-a", "tiny-b"], "tiny-c", n_ctx={"tiny-b": 4096})
    with pytest.raises(PromptTooLongError) as refused:
        await check(config, "x" * (4096 * CHARS_PER_TOKEN_MAX + 1))
    assert str(refused.value) == (
        "the prompt has 32,769 characters, more than any model of this ensemble can read: the "
        "largest context is 4096 tokens ([models.tiny-b]), at most 32,768 characters; "
        "shorten the prompt"
    )


async def test_a_layer_no_model_can_read_is_refused_with_the_n_ctx_to_raise(
    tiny_models: dict[str, Path],
) -> None:
    small = {"tiny-a": TINY_N_CTX, "tiny-b": TINY_N_CTX}
    config = config_for(tiny_models, ["tiny-a", "tiny-b"], "tiny-c", n_ctx=small)
    text = "the sea " * 100  # within the character limit, beyond 256 tokens
    a, b = await tokens_of(config, "tiny-a", text), await tokens_of(config, "tiny-b", text)
    assert a >= TINY_N_CTX and b >= TINY_N_CTX
    with pytest.raises(PromptTooLongError) as refused:
        await check(config, text)
    assert str(refused.value) == (
        f'the prompt does not fit layer 1: model "tiny-a" reads it as {a} tokens, its n_ctx is '
        f'256; model "tiny-b" reads it as {b} tokens, its n_ctx is 256; raise n_ctx of '
        f"[models.tiny-a] to at least {a + 512} or raise n_ctx of [models.tiny-b] to at least "
        f"{b + 512}, or shorten the prompt"
    )


async def test_an_aggregator_that_cannot_read_the_prompt_is_refused(
    tiny_models: dict[str, Path],
) -> None:
    config = config_for(tiny_models, ["tiny-a", "tiny-b"], "tiny-c", n_ctx={"tiny-c": TINY_N_CTX})
    with pytest.raises(PromptTooLongError, match=r"^the prompt does not fit the aggregator: "):
        await check(config, "the sea " * 100)


async def test_some_agents_that_cannot_read_it_are_a_warning_and_the_run_goes_on(
    tiny_models: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    config = config_for(tiny_models, ["tiny-a", "tiny-b"], "tiny-c", n_ctx={"tiny-a": TINY_N_CTX})
    with caplog.at_level(logging.WARNING, logger="localmoa.runtime.prepare"):
        await check(config, "the sea " * 100)
    assert "the prompt does not fit 1 of 2 agents of layer 1" in caplog.text
    assert "raise n_ctx of [models.tiny-a] to at least" in caplog.text


async def test_a_prompt_that_fits_passes_and_ollama_models_are_never_refused(
    tiny_models: dict[str, Path],
) -> None:
    ollama = {"o": {"backend": "ollama", "model": "x:1b", "num_ctx": 64}}
    config = config_for(tiny_models, ["o"], "tiny-c", extra=ollama)
    await check(config, "the sea " * 100)  # Ollama truncates; tiny-c has 2048
    await check(config_for(tiny_models, ["tiny-a", "tiny-b"], "tiny-c"), "Why is the sky blue?")


async def test_prepare_refuses_the_prompt_before_anything_loads(
    tiny_models: dict[str, Path],
) -> None:
    small = {"tiny-a": TINY_N_CTX, "tiny-b": TINY_N_CTX}
    config = config_for(tiny_models, ["tiny-a", "tiny-b"], "tiny-c", n_ctx=small)
    found = backends()
    with pytest.raises(PromptTooLongError, match="raise n_ctx of"):
        await prepare(config, "default", found, memory_budget="1GiB", prompt="the sea " * 100)
    assert all(backend.loaded() == [] for backend in found.values())
    plan = await prepare(config, "default", found, memory_budget="1GiB", prompt="hi")
    assert plan.plan.loads >= 3


async def test_a_cancelled_check_never_waits_for_the_tokenizer(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client gone or a signal ends the check at once, whatever the tokenizer is doing."""
    inside, release = threading.Event(), threading.Event()

    def count(vocab: Any, messages: list[ChatMessage]) -> int:
        inside.set()
        release.wait(60)
        return 1

    monkeypatch.setattr(llamacpp, "_count", count)
    config = config_for(tiny_models, ["tiny-a"], "tiny-b")
    checking = asyncio.create_task(check(config, "Why is the sky blue?"))
    assert await asyncio.to_thread(inside.wait, 60)
    checking.cancel()
    with pytest.raises(asyncio.CancelledError):
        await checking
    release.set()


def test_plan_policy_times_only_timed_backends_and_reads_the_device_only_when_needed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import localmoa.hardware
    from localmoa.hardware import Budget
    from localmoa.runtime.prepare import plan_policy

    reads: list[str] = []

    def detect() -> Budget:
        reads.append("device")
        return Budget(bytes=40 << 30, source="nvml", detail="test")

    monkeypatch.setattr(localmoa.hardware, "detect_budget", detect)
    models = {
        "gguf": {"backend": "llamacpp", "path": str(tmp_path / "m.gguf")},
        "fake": {"backend": "fake", "memory": "1GiB"},
    }
    ensembles = {"default": {"layers": [["gguf"]], "aggregator": "gguf"}}
    config = parse_config({"models": models, "ensembles": ensembles})
    flag = Budget(bytes=8 << 30, source="flag", detail="--memory-budget")
    assert plan_policy(config, ["gguf", "fake"], flag).profile is None and not reads
    timed = plan_policy(config, ["gguf"], flag)
    assert reads == ["device"] and timed.profile is not None
    assert timed.profile.name == "desktop-24g" and timed.min_gain == config.settings.min_gain
    detected = Budget(bytes=70 << 30, source="nvml", detail="GPU 0")
    assert plan_policy(config, ["gguf"], detected).profile.name == "server-80g"  # type: ignore[union-attr]
    named = parse_config(
        {"settings": {"timing_profile": "cpu-16g"}, "models": models, "ensembles": ensembles}
    )
    assert plan_policy(named, ["gguf"], flag).profile.name == "cpu-16g"  # type: ignore[union-attr]
    assert reads == ["device"]
