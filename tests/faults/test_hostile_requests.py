"""Hostile requests to `localmoa serve`: each is refused in OpenAI's shape, before it costs
anything, and the server goes on answering."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from servers import Serving, serving

from localmoa.backends import FakeBackend
from localmoa.config import Config, parse_config
from localmoa.tinymodels import ensemble_config

QUESTION = {"model": "moa/default", "messages": [{"role": "user", "content": "hi"}]}
JSON = {"Content-Type": "application/json"}


def fake_config() -> Config:
    models = {name: {"backend": "fake", "memory": "1GiB", "reply": "fine words"} for name in "abc"}
    return parse_config(
        {
            "models": models,
            "ensembles": {"default": {"layers": [["a", "b"]], "aggregator": "c"}},
        }
    )


@pytest.fixture
def served() -> Iterator[Serving]:
    with serving(fake_config(), 3 << 30, max_body=64 << 10) as running:
        yield running


def fake(served: Serving) -> FakeBackend:
    backend = served.server.backends["fake"]
    assert isinstance(backend, FakeBackend)
    return backend


def post(served: Serving, body: bytes | str, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{served.url}/chat/completions", content=body, headers=JSON | headers, timeout=30
    )


def refused(response: httpx.Response, status: int, code: str) -> dict[str, str | None]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["message"]
    return error  # type: ignore[no-any-return]


def still_answers(served: Serving) -> None:
    ok = post(served, json.dumps(QUESTION))
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]


def test_a_body_over_the_limit_is_refused_before_it_is_read(served: Serving) -> None:
    big = json.dumps({**QUESTION, "messages": [{"role": "user", "content": "x" * (80 << 10)}]})
    error = refused(post(served, big), 413, "body_too_large")
    assert "--max-body" in (error["message"] or "")

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while read
        for _ in range(20):
            yield b" " * (8 << 10)

    chunked = httpx.post(
        f"{served.url}/chat/completions", content=chunks(), headers=JSON, timeout=30
    )
    refused(chunked, 413, "body_too_large")
    assert fake(served).requests == []
    still_answers(served)


def test_a_prompt_far_beyond_every_context_never_reaches_a_tokenizer(
    tiny_models: dict[str, Path],
) -> None:
    config = parse_config(ensemble_config(tiny_models, max_tokens=8))
    with serving(config, 4 << 30) as running:
        text = "x" * 1_000_000  # minutes of llama.cpp's tokenizer, were it handed over
        body = json.dumps({**QUESTION, "messages": [{"role": "user", "content": text}]})
        error = refused(post(running, body), 400, "context_length_exceeded")
        assert error["param"] == "messages" and "2048 tokens" in (error["message"] or "")
        assert running.server.pool is not None and running.server.pool.loads == 0
        assert running.server.admitted == 0


def test_a_prompt_longer_than_the_context_is_a_400_before_anything_loads(
    tiny_models: dict[str, Path],
) -> None:
    config = parse_config(ensemble_config(tiny_models, max_tokens=8))
    with serving(config, 4 << 30) as running:
        words = "hello " * 600  # under the character bound, over 2048 tokens
        body = json.dumps({**QUESTION, "messages": [{"role": "user", "content": words}]})
        error = refused(post(running, body), 400, "context_length_exceeded")
        assert "n_ctx" in (error["message"] or "")
        assert running.server.pool is not None and running.server.pool.loads == 0


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        # A page on another site posting text/plain: no preflight, so the browser sends it.
        (
            {"Origin": "http://evil.example", "Content-Type": "text/plain"},
            403,
            "origin_not_allowed",
        ),
        ({"Origin": "http://evil.example"}, 403, "origin_not_allowed"),
        ({"Origin": "null"}, 403, "origin_not_allowed"),
        # DNS rebinding: a foreign name that resolves to 127.0.0.1.
        ({"Host": "evil.example:8000"}, 403, "host_not_allowed"),
        ({"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
        ({"Content-Type": "application/x-www-form-urlencoded"}, 415, "unsupported_media_type"),
    ],
)
def test_cross_site_requests_are_refused(
    served: Serving, headers: dict[str, str], status: int, code: str
) -> None:
    refused(post(served, json.dumps(QUESTION), **headers), status, code)
    assert fake(served).requests == []  # nothing ran


def test_same_origin_loopback_names_and_listed_origins_are_served() -> None:
    with serving(fake_config(), 3 << 30, allowed_origins=["http://localhost:3000"]) as running:
        port = httpx.URL(running.url).port
        for host in (f"localhost:{port}", f"app.localhost:{port}", f"127.0.0.1:{port}"):
            assert post(running, json.dumps(QUESTION), Host=host).status_code == 200
        same = post(running, json.dumps(QUESTION), Origin=f"http://127.0.0.1:{port}")
        assert same.status_code == 200
        listed = post(running, json.dumps(QUESTION), Origin="http://localhost:3000")
        assert listed.status_code == 200
        assert listed.headers["access-control-allow-origin"] == "http://localhost:3000"
        preflight = httpx.options(
            f"{running.url}/chat/completions",
            headers={
                "Origin": "http://localhost:3000",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        )
        assert preflight.status_code == 200
        refused(
            post(running, json.dumps(QUESTION), Origin="http://localhost:3001"),
            403,
            "origin_not_allowed",
        )


def test_json_nested_too_deeply_is_a_400(served: Serving) -> None:
    deep = "[" * 30_000 + "]" * 30_000  # within the body limit
    refused(post(served, deep), 400, "invalid_json")
    refused(post(served, b"\xff\xfe not utf-8"), 400, "invalid_json")
    still_answers(served)


def test_a_lone_surrogate_is_refused_before_any_model_runs(served: Serving) -> None:
    body = '{"model": "moa/default", "messages": [{"role": "user", "content": "a\\ud800b"}]}'
    error = refused(post(served, body), 400, "invalid_text")
    assert error["param"] == "messages[0].content"
    assert fake(served).requests == []


def test_a_bad_field_names_it_in_param(served: Serving) -> None:
    body = {**QUESTION, "messages": [{"role": "robot", "content": "x"}]}
    error = refused(post(served, json.dumps(body)), 400, "invalid_request")
    assert error["param"] == "messages[0].role"


def test_a_non_ascii_authorization_header_is_a_401() -> None:
    with serving(fake_config(), 3 << 30, api_key="s3cret") as running:
        for value in ("Bearer sécret".encode(), b"Bearer \xff\xfe", "Bearer s3cret€".encode()):
            response = httpx.post(
                f"{running.url}/chat/completions",
                content=json.dumps(QUESTION),
                headers=[(b"Content-Type", b"application/json"), (b"Authorization", value)],
            )
            refused(response, 401, "invalid_api_key")
        assert (
            httpx.get(
                f"{running.url}/models", headers={"Authorization": "Bearer s3cret"}
            ).status_code
            == 200
        )


def test_unknown_routes_and_methods_answer_in_openai_shape(served: Serving) -> None:
    refused(httpx.get(f"{served.url}/nothing-here"), 404, "not_found")
    refused(httpx.get(f"{served.url}/chat/completions"), 405, "method_not_allowed")


def test_a_bug_is_a_500_in_openai_shape(served: Serving, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(served.server, "_ensemble", broken)
    refused(post(served, json.dumps(QUESTION)), 500, "internal_error")
