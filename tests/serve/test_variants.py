"""The variants behind `localmoa serve`: a judge's selection and an early stop per request, a
selected answer streamed whole, Self-MoA samples sharing one loaded model."""

from __future__ import annotations

import json
from typing import Any

import openai
from servers import serving

from localmoa.backends import FakeBackend
from localmoa.config import Config, parse_config

GiB = 1 << 30


def config(ensemble: dict[str, Any]) -> Config:
    models: dict[str, Any] = {
        name: {"backend": "fake", "memory": "1GiB", "reply": f"answer of {name}"}
        for name in ("p1", "p2", "late")
    }
    verdict = {"selected": [2], "stop": True, "reason": "agree"}
    models["judge"] = {"backend": "fake", "memory": "1GiB", "reply": json.dumps(verdict)}
    models["solo"] = {"backend": "fake", "memory": "1GiB", "reply": "s{seed}", "parallel": 2}
    return parse_config({"models": models, "ensembles": {"default": ensemble}})


def test_a_request_is_judged_stopped_early_and_never_loads_the_skipped_model() -> None:
    ensemble = {
        "layers": [["p1", "p2"], ["late", "p1"]],
        "aggregator": "p1",
        "judge": {"model": "judge", "top_k": 1, "early_stop": True},
    }
    with serving(config(ensemble), 2 * GiB) as served:
        client = openai.OpenAI(base_url=served.url, api_key="unused")
        for _ in range(2):
            answer = client.chat.completions.create(
                model="moa/default", messages=[{"role": "user", "content": "q"}]
            )
            assert answer.choices[0].message.content == "answer of p1"
        fake = served.server.backends["fake"]
        assert isinstance(fake, FakeBackend)
        assert ("load", "late") not in fake.events
        aggregated = [r for name, r in fake.requests if name == "p1"][-1]
        assert "1. answer of p2" in aggregated.messages[0].content


def test_a_selected_answer_is_streamed_whole() -> None:
    ensemble = {"layers": [["p1", "p2"]], "aggregator": "judge", "final": "select"}
    with serving(config(ensemble), 2 * GiB) as served:
        client = openai.OpenAI(base_url=served.url, api_key="unused")
        stream = client.chat.completions.create(
            model="moa/default", messages=[{"role": "user", "content": "q"}], stream=True
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert text == "answer of p2"


def test_samples_share_one_loaded_model_within_its_slots() -> None:
    ensemble = {"layers": [[{"model": "solo", "samples": 4, "seed": 1}]], "aggregator": "solo"}
    with serving(config(ensemble), GiB) as served:
        client = openai.OpenAI(base_url=served.url, api_key="unused")
        client.chat.completions.create(
            model="moa/default", messages=[{"role": "user", "content": "q"}]
        )
        fake = served.server.backends["fake"]
        assert isinstance(fake, FakeBackend)
        assert fake.max_in_flight["solo"] == 2
        assert sorted(r.seed for name, r in fake.requests[:4]) == [1, 2, 3, 4]
        final = fake.requests[-1][1].messages[0].content
        assert all(f"s{seed}" in final for seed in (1, 2, 3, 4))
