"""The console's HTTP side: its page and assets, the chat event stream, past runs, and the same
key and origin checks as the API (real uvicorn on loopback, the fake backend)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from servers import Serving, serving

from localmoa.backends import FakeBackend
from localmoa.config import Config, parse_config

GiB = 1 << 30


def three(seconds_per_token: float = 0.0, words: int = 3, extra: str = "") -> Config:
    """Three fake models, two layers of all three, ``a`` aggregating; each writes its name."""
    models = {
        name: {
            "backend": "fake",
            "memory": "1GiB",
            "reply": f"{{model}} says {' '.join(['word'] * words)}{extra}",
            "seconds_per_token": seconds_per_token,
        }
        for name in ("a", "b", "c")
    }
    return parse_config(
        {
            "models": models,
            "ensembles": {
                "default": {"layers": [["a", "b", "c"], ["a", "b", "c"]], "aggregator": "a"},
                "solo": {"layers": [["b"]], "aggregator": "c"},
            },
        }
    )


def base(served: Serving) -> str:
    return served.url.removesuffix("/v1")


def chat_events(
    served: Serving, body: dict[str, Any], headers: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    events = []
    with httpx.stream(
        "POST", f"{base(served)}/console/chat", json=body, headers=headers, timeout=60
    ) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line.removeprefix("data: ")))
    return events


@pytest.fixture
def served() -> Iterator[Serving]:
    with serving(three(), 3 * GiB) as running:
        yield running


def test_the_page_and_its_assets_come_from_the_package_and_nothing_else(served: Serving) -> None:
    page = httpx.get(base(served) + "/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy
    for hook in ('data-testid="prompt"', 'data-testid="send"'):
        assert hook in page.text
    kinds = {"console.js": "text/javascript", "console.css": "text/css"}
    for name, kind in kinds.items():
        asset = httpx.get(f"{base(served)}/console/static/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
        assert f"/console/static/{name}" in page.text
    for name in ("app.py", "..%2Fapp.py", "..%2F..%2Fpyproject.toml", "%2Fetc%2Fpasswd", ".."):
        refused = httpx.get(f"{base(served)}/console/static/{name}")
        assert refused.status_code == 404, name
        assert "def " not in refused.text and "root:" not in refused.text
    assert httpx.get(f"{base(served)}/console/static/../app.py").status_code == 404


def test_a_chat_streams_the_plan_every_agent_memory_and_the_answer(served: Serving) -> None:
    events = chat_events(
        served, {"ensemble": "default", "messages": [{"role": "user", "content": "why?"}]}
    )
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["plan", "memory"] and kinds[-2:] == ["end", "memory"]
    plan = events[0]
    assert plan["ensemble"] == "default" and plan["budget_bytes"] == 3 * GiB
    assert [s["label"] for s in plan["stages"]] == ["layer 1", "layer 2", "aggregator"]
    assert [[c["model"] for c in s["calls"]] for s in plan["stages"]] == [
        ["a", "b", "c"],
        ["a", "b", "c"],
        ["a"],
    ]
    agents = [e for e in events if e["type"] == "agent"]
    assert sorted((e["layer"], e["index"], e["model"], e["final"]) for e in agents) == [
        (1, 0, "a", False),
        (1, 1, "b", False),
        (1, 2, "c", False),
        (2, 0, "a", False),
        (2, 1, "b", False),
        (2, 2, "c", False),
        (3, 0, "a", True),
    ]
    for layer in (1, 2):
        for index, model in enumerate("abc"):
            text = "".join(
                e["text"]
                for e in events
                if e["type"] == "piece" and (e["layer"], e["index"]) == (layer, index)
            )
            assert text == f"{model} says word word word"
    done = [e for e in events if e["type"] == "done"]
    assert len(done) == 7 and all(d["ok"] and d["tokens"] > 0 for d in done)
    end = events[-2]
    answer = "".join(e["text"] for e in events if e["type"] == "answer")
    assert answer == end["answer"] == "a says word word word" and end["error"] is None
    assert (end["calls"], end["loads"]) == (7, 3)
    memory = [e for e in events if e["type"] == "memory"]
    assert memory[0]["bytes"] == 0 and memory[-1]["bytes"] == 3 * GiB
    assert all(m["bytes"] <= m["budget_bytes"] == 3 * GiB for m in memory)
    assert [m["cause"].split()[0] for m in memory[1:-1]] == ["loaded"] * 3
    waves = [e for e in events if e["type"] == "wave"]
    assert waves and waves[0]["label"] == "layer 1" and sorted(waves[0]["load"]) == ["a", "b", "c"]
    served.wait_idle()


def test_the_whole_conversation_reaches_every_first_layer_agent(served: Serving) -> None:
    conversation = [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "second question"},
    ]
    events = chat_events(served, {"ensemble": "solo", "messages": conversation})
    assert events[-2]["answer"] == "c says word word word"
    fake = served.server.backends["fake"]
    assert isinstance(fake, FakeBackend)
    proposer = [r for name, r in fake.requests if name == "b"]
    assert [m.model_dump() for m in proposer[0].messages] == conversation


def test_a_console_chat_is_checked_like_an_api_request(served: Serving) -> None:
    url = f"{base(served)}/console/chat"
    question = [{"role": "user", "content": "q"}]
    cases: list[tuple[Any, int, str]] = [
        ({"ensemble": "nope", "messages": question}, 404, "model_not_found"),
        ({"ensemble": "default"}, 400, "invalid_request"),
        ({"ensemble": "default", "messages": []}, 400, "invalid_request"),
        ({"ensemble": "default", "messages": question, "model": "x"}, 400, "invalid_request"),
        (
            {"ensemble": "default", "messages": [{"role": "tool", "content": "x"}]},
            400,
            "invalid_request",
        ),
    ]
    for body, status, code in cases:
        response = httpx.post(url, json=body)
        assert response.status_code == status, body
        assert response.json()["error"]["code"] == code
    assert "default, solo" in httpx.post(url, json=cases[0][0]).json()["error"]["message"]
    not_json = httpx.post(url, content=b"{", headers={"Content-Type": "application/json"})
    assert not_json.status_code == 400
    plain = httpx.post(url, content=b"{}", headers={"Content-Type": "text/plain"})
    assert plain.status_code == 415  # the guard's check: no cross-site simple POST
    foreign = httpx.post(url, json=cases[1][0], headers={"Origin": "http://evil.example"})
    assert foreign.status_code == 403
    rebound = httpx.get(f"{base(served)}/console/runs", headers={"Host": "evil.example"})
    assert rebound.status_code == 403
    assert served.server.admitted == 0


def test_the_api_key_guards_every_console_endpoint_but_not_the_page() -> None:
    with serving(three(), 3 * GiB, api_key="s3cret") as served:
        root = base(served)
        body = {"ensemble": "solo", "messages": [{"role": "user", "content": "hi"}]}
        for wrong in ({}, {"Authorization": "Bearer nope"}):
            for response in (
                httpx.post(f"{root}/console/chat", json=body, headers=wrong),
                httpx.get(f"{root}/console/runs", headers=wrong),
                httpx.get(f"{root}/console/runs/01ABC", headers=wrong),
            ):
                assert response.status_code == 401
                assert response.json()["error"]["code"] == "invalid_api_key"
        for path in ("/", "/console/static/console.js", "/console/static/console.css"):
            assert httpx.get(root + path).status_code == 200
        events = chat_events(served, body, headers={"Authorization": "Bearer s3cret"})
        assert events[-2]["answer"] == "c says word word word"
        runs = httpx.get(f"{root}/console/runs", headers={"Authorization": "Bearer s3cret"})
        assert runs.status_code == 200


def test_a_client_that_goes_away_cancels_its_console_run() -> None:
    slow = three(seconds_per_token=0.05, words=200)  # a whole run would take about a minute
    with serving(slow, 3 * GiB) as served:
        body = {"ensemble": "default", "messages": [{"role": "user", "content": "q"}]}
        with httpx.stream("POST", f"{base(served)}/console/chat", json=body, timeout=30) as r:
            lines = r.iter_lines()
            for line in lines:  # until the first agent writes: the run is under way
                if line.startswith("data: ") and json.loads(line[6:])["type"] == "piece":
                    break
            assert served.server.admitted == 1
        served.wait_idle()
        pool = served.server.pool
        assert pool is not None and not pool.pins
        fake = served.server.backends["fake"]
        assert isinstance(fake, FakeBackend)
        assert len(fake.requests) < 7  # the aggregator never ran
        [run] = httpx.get(f"{base(served)}/console/runs").json()["runs"]
        assert run["status"] == "interrupted" and run["answer"] is None


def test_a_failed_run_ends_with_its_error() -> None:
    models = {
        "a": {"backend": "fake", "memory": "1GiB", "reply": "ok"},
        "bad": {"backend": "fake", "memory": "1GiB", "fail": "the model broke"},
    }
    failing = parse_config(
        {"models": models, "ensembles": {"default": {"layers": [["bad"]], "aggregator": "a"}}}
    )
    with serving(failing, 3 * GiB) as served:
        events = chat_events(
            served, {"ensemble": "default", "messages": [{"role": "user", "content": "q"}]}
        )
        end = events[-2]
        assert end["type"] == "end" and end["answer"] is None
        assert "layer 1" in end["error"]
        done = [e for e in events if e["type"] == "done"]
        assert [d["ok"] for d in done] == [False] and "the model broke" in done[0]["error"]


def test_runs_say_recording_is_off_without_a_run_log(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCALMOA_RECORD", "off")
    with serving(three(), 3 * GiB) as served:
        chat_events(served, {"ensemble": "solo", "messages": [{"role": "user", "content": "q"}]})
        page = httpx.get(f"{base(served)}/console/runs").json()
        assert page["recording"] is False and page["runs"] == []
        assert page["message"].startswith("recording is off")
        assert 'record = "off"' in page["message"]
        missing = httpx.get(f"{base(served)}/console/runs/01ABC")
        assert missing.status_code == 404
        assert missing.json()["error"]["message"].startswith("recording is off")


def test_a_console_chat_is_recorded_and_shown_in_past_runs(served: Serving) -> None:
    events = chat_events(
        served, {"ensemble": "default", "messages": [{"role": "user", "content": "why?"}]}
    )
    end = events[-2]
    page = httpx.get(f"{base(served)}/console/runs").json()
    assert page["recording"] is True and page["message"] is None
    [run] = page["runs"]
    assert (run["ensemble"], run["status"], run["source"]) == ("default", "ok", "serve")
    assert (run["calls"], run["loads"], run["prompt"]) == (7, 3, "why?")
    assert run["answer"] == end["answer"] == "a says word word word"
    shown = httpx.get(f"{base(served)}/console/runs/{run['id']}")
    assert shown.status_code == 200
    detail = shown.json()
    assert [(c["layer"], c["model"]) for c in detail["calls"]] == [
        (1, "a"),
        (1, "b"),
        (1, "c"),
        (2, "a"),
        (2, "b"),
        (2, "c"),
        (3, "a"),
    ]
    assert all(c["text"] == f"{c['model']} says word word word" for c in detail["calls"])
    assert sorted(load["model"] for load in detail["loads"]) == ["a", "b", "c"]
    missing = httpx.get(f"{base(served)}/console/runs/01ZZZZZZZZ")
    assert missing.status_code == 404 and "01ZZZZZZZZ" in missing.json()["error"]["message"]
