"""The web console in a real headless browser: playwright driving Debian's chromium
(scripts/setup.sh installs it; nothing is downloaded), against real uvicorn on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from servers import Serving, serving

from localmoa.backends import FakeBackend
from localmoa.config import Config, parse_config
from localmoa.tinymodels import ensemble_config

CHROMIUM = Path("/usr/bin/chromium")
GiB = 1 << 30
WAIT_MS = 30_000

AN_AGENT_MID_ANSWER = """() => [...document.querySelectorAll('[data-testid="agent"].writing .text')]
    .some((text) => text.textContent.length > 0)"""


def three(seconds_per_token: float = 0.04, words: int = 6) -> Config:
    """Three fake models that write slowly enough to watch: two layers of all three, ``a``
    aggregating; each answer names its model and the question it was asked."""
    reply = "{model} heard: {prompt} " + " ".join(["word"] * words)
    models = {
        name: {
            "backend": "fake",
            "memory": "1GiB",
            "reply": reply,
            "seconds_per_token": seconds_per_token,
        }
        for name in ("a", "b", "c")
    }
    return parse_config(
        {
            "models": models,
            "ensembles": {
                "default": {"layers": [["a", "b", "c"], ["a", "b", "c"]], "aggregator": "a"},
            },
        }
    )


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/setup.sh (it installs Debian's chromium)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield launched
        launched.close()


class Console:
    """The console page of one server, and every URL the page asked for."""

    def __init__(self, browser: Browser, served: Serving) -> None:
        self.root = served.url.removesuffix("/v1")
        self.context = browser.new_context(viewport={"width": 1200, "height": 800})
        self.page: Page = self.context.new_page()
        self.requested: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda request: self.requested.append(request.url))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.goto(self.root + "/")

    def ask(self, text: str) -> None:
        self.page.get_by_test_id("prompt").fill(text)
        self.page.get_by_test_id("send").click()

    def answered(self) -> None:
        expect(self.page.get_by_role("status")).to_contain_text("Answered", timeout=WAIT_MS)

    def agents(self) -> list[tuple[str | None, str | None, str]]:
        panes = self.page.get_by_test_id("agent")
        return [
            (
                pane.get_attribute("data-layer"),
                pane.get_attribute("data-model"),
                pane.locator(".text").inner_text(),
            )
            for pane in panes.all()
        ]

    def close(self) -> None:
        self.context.close()
        foreign = [url for url in self.requested if not url.startswith(self.root + "/")]
        assert not foreign, f"the page asked another origin for {foreign}"
        assert not self.errors, f"the page's script failed: {self.errors}"


@pytest.fixture
def console(browser: Browser) -> Iterator[tuple[Console, Serving]]:
    with serving(three(), 3 * GiB) as served:
        page = Console(browser, served)
        yield page, served
        page.close()


def test_agents_stream_side_by_side_and_a_second_turn_carries_the_first(
    console: tuple[Console, Serving],
) -> None:
    page, served = console
    expect(page.page.locator("#ensemble option")).to_have_text(["default"])
    page.ask("why is the sky blue?")
    page.page.wait_for_function(AN_AGENT_MID_ANSWER, timeout=WAIT_MS)  # text before the end
    answer = page.page.get_by_test_id("answer")
    expect(answer).to_have_text("a heard: why is the sky blue? word word word word word word")
    page.answered()
    expect(page.page.get_by_test_id("agent")).to_have_count(6)
    assert page.agents() == [
        (str(layer), model, f"{model} heard: why is the sky blue? word word word word word word")
        for layer in (1, 2)
        for model in "abc"
    ]
    expect(page.page.locator(".agent.ok")).to_have_count(6)
    expect(page.page.locator("#memory-text")).to_contain_text("3.0 GiB of 3.0 GiB")
    expect(page.page.locator("#waves li").first).to_contain_text("load")

    page.ask("and at sunset?")
    expect(page.page.get_by_test_id("answer")).to_have_text(
        "a heard: and at sunset? word word word word word word", timeout=WAIT_MS
    )
    page.answered()
    expect(page.page.get_by_test_id("answer")).to_have_count(1)
    expect(page.page.locator("#transcript > li")).to_have_count(4)
    expect(page.page.get_by_test_id("agent")).to_have_count(6)  # this turn's agents
    fake = served.server.backends["fake"]
    assert isinstance(fake, FakeBackend)
    second = fake.requests[7]  # the second turn's first call, a layer-1 agent
    assert [(m.role, m.content) for m in second[1].messages] == [
        ("user", "why is the sky blue?"),
        ("assistant", "a heard: why is the sky blue? word word word word word word"),
        ("user", "and at sunset?"),
    ]

    page.page.get_by_text("Past runs").click()
    runs = page.page.locator("#runs-list button")
    expect(runs).to_have_count(2)
    expect(runs.first).to_contain_text("and at sunset?")  # newest first
    runs.first.click()
    detail = page.page.locator("#run-detail")
    expect(detail.get_by_role("heading", name="layer 2")).to_be_visible()
    expect(detail.locator("details")).to_have_count(7)
    expect(detail.locator(":scope > .text")).to_have_text(
        "a heard: and at sunset? word word word word word word"
    )


def test_stop_cancels_the_run_on_the_server(browser: Browser) -> None:
    with serving(three(seconds_per_token=0.05, words=200), 3 * GiB) as served:
        page = Console(browser, served)
        page.ask("a long one")
        page.page.wait_for_function(AN_AGENT_MID_ANSWER, timeout=WAIT_MS)
        page.page.get_by_role("button", name="Stop").click()
        expect(page.page.get_by_role("status")).to_contain_text("Stopped", timeout=WAIT_MS)
        served.wait_idle()  # the run ended: cancelled, not finished
        fake = served.server.backends["fake"]
        assert isinstance(fake, FakeBackend)
        assert len(fake.requests) < 7  # the aggregator never ran
        expect(page.page.get_by_test_id("prompt")).to_have_value("a long one")  # to retry
        page.close()


def test_with_an_api_key_the_page_asks_for_it_and_works_once_given(browser: Browser) -> None:
    with serving(three(seconds_per_token=0.0), 3 * GiB, api_key="s3cret") as served:
        page = Console(browser, served)
        form = page.page.locator("#key-form")
        expect(form).to_be_visible()
        expect(page.page.get_by_role("alert")).to_contain_text("missing or wrong API key")
        expect(page.page.locator("#ensemble option")).to_have_count(0)
        page.ask("without a key")
        expect(page.page.get_by_role("status")).to_contain_text("No ensemble to ask")
        fake = served.server.backends["fake"]
        assert isinstance(fake, FakeBackend) and not fake.requests

        page.page.get_by_label("API key (the one").fill("wrong")
        page.page.get_by_role("button", name="Use key").click()
        expect(form).to_be_visible()  # refused again: asked again
        expect(page.page.locator("#ensemble option")).to_have_count(0)

        page.page.get_by_label("API key (the one").fill("s3cret")
        page.page.get_by_role("button", name="Use key").click()
        expect(form).to_be_hidden()
        expect(page.page.locator("#ensemble option")).to_have_text(["default"])
        page.ask("with the key")
        expect(page.page.get_by_test_id("answer")).to_have_text(
            "a heard: with the key word word word word word word", timeout=WAIT_MS
        )
        page.answered()
        assert len(fake.requests) == 7
        page.close()


def test_a_tiny_llama_cpp_ensemble_runs_through_the_page(
    browser: Browser, tiny_models: dict[str, Path]
) -> None:
    config = parse_config(ensemble_config(tiny_models, max_tokens=8))
    with serving(config, 4 * GiB) as served:
        page = Console(browser, served)
        page.ask("Why is the sky blue?")
        page.answered()
        expect(page.page.get_by_test_id("agent")).to_have_count(6)
        assert [(layer, model) for layer, model, _ in page.agents()] == [
            (str(layer), model) for layer in (1, 2) for model in tiny_models
        ]
        expect(page.page.locator(".agent.ok")).to_have_count(6)
        expect(page.page.locator(".agent .state").first).to_contain_text("tokens")
        page.close()
