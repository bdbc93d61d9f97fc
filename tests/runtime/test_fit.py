"""References always fit: cut to the receiving model's context, lowest-ranked first or in
proportion, re-counted until the request fits."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from localmoa.backends.base import ChatMessage, estimate_tokens
from localmoa.runtime.fit import (
    CUT_MARKER,
    MAX_SHRINK_ROUNDS,
    MIN_REFERENCE_TOKENS,
    Count,
    Fitted,
    fit_references,
)

QUESTION = [ChatMessage(role="user", content="Which is the tallest mountain in Europe?")]


def build(texts: list[str]) -> list[ChatMessage]:
    """An aggregator's request as localmoa.runtime.moa shapes it: instruction and numbered
    references in one system message, then the conversation."""
    numbered = "\n\n".join(f"{i}. {t.strip()}" for i, t in enumerate(texts, 1))
    system = "Synthesize these responses into one answer.\n\nResponses:\n\n" + numbered
    return [ChatMessage(role="system", content=system), *QUESTION]


class Counter:
    """A counter that records how often it was asked."""

    def __init__(self, tokens: Count) -> None:
        self.tokens = tokens
        self.calls = 0

    async def __call__(self, messages: list[ChatMessage]) -> int:
        self.calls += 1
        return await self.tokens(messages)


async def words(messages: list[ChatMessage]) -> int:
    """An exact counter for the tests: a token per word, plus 4 per message."""
    return sum(len(m.content.split()) + 4 for m in messages)


async def estimate(messages: list[ChatMessage]) -> int:
    return estimate_tokens(messages)


def answer(n_words: int, seed: int = 0) -> str:
    return " ".join(f"w{seed}x{i}" for i in range(n_words))


def fit(
    references: Sequence[str],
    n_ctx: int | None,
    *,
    max_tokens: int = 20,
    ranked: bool = False,
    counter: Count = words,
) -> Fitted:
    return asyncio.run(
        fit_references(
            build, references, n_ctx=n_ctx, max_tokens=max_tokens, count=counter, ranked=ranked
        )
    )


def sent(fitted: Fitted, counter: Count = words) -> int:
    async def tokens() -> int:
        return await counter(build(list(fitted.texts)))

    return asyncio.run(tokens())


def test_nothing_is_cut_when_it_fits_and_two_counts_suffice() -> None:
    refs = [answer(50, 1), answer(30, 2), answer(40, 3)]
    counter = Counter(words)
    fitted = fit(refs, n_ctx=4096, counter=counter)
    assert fitted == Fitted((0, 1, 2), tuple(refs), fitted.reference_tokens, truncated=False)
    base = asyncio.run(words(build([])))
    assert fitted.reference_tokens == sent(fitted) - base
    assert counter.calls == 2


def test_no_n_ctx_never_cuts_but_still_counts_the_references() -> None:
    refs = [answer(5000, 1), answer(3000, 2)]
    fitted = fit(refs, n_ctx=None)
    assert fitted.kept == (0, 1) and fitted.texts == tuple(refs) and not fitted.truncated
    assert fitted.reference_tokens >= 8000


def test_exactly_full_context_is_not_cut() -> None:
    refs = [answer(100, 1), answer(100, 2)]
    needed = sent(Fitted((0, 1), tuple(refs), 0, False)) + 20
    assert not fit(refs, n_ctx=needed).truncated
    assert fit(refs, n_ctx=needed - 1).truncated


def test_ranked_cuts_the_lowest_ranked_first() -> None:
    refs = [answer(100, 1), answer(100, 2), answer(100, 3)]
    full = sent(Fitted((0, 1, 2), tuple(refs), 0, False))
    fitted = fit(refs, n_ctx=full + 20 - 60, ranked=True)  # 60 tokens too many
    assert fitted.truncated and fitted.kept == (0, 1, 2)
    assert fitted.texts[:2] == tuple(refs[:2])  # the best two whole
    assert fitted.texts[2].endswith(CUT_MARKER) and refs[2].startswith(
        fitted.texts[2].removesuffix(CUT_MARKER)
    )
    assert sent(fitted) + 20 <= full + 20 - 60


def test_ranked_drops_the_lowest_when_too_little_would_be_left() -> None:
    refs = [answer(100, 1), answer(100, 2), answer(100, 3)]
    full = sent(Fitted((0, 1, 2), tuple(refs), 0, False))
    fitted = fit(refs, n_ctx=full + 20 - 95, ranked=True)  # room for 5 words of the third
    assert fitted.kept == (0, 1) and fitted.texts == tuple(refs[:2]) and fitted.truncated


def test_ranked_cuts_even_the_best_when_it_alone_is_too_long() -> None:
    refs = [answer(400, 1), answer(10, 2)]
    base = asyncio.run(words(build([])))
    fitted = fit(refs, n_ctx=base + 20 + 100, ranked=True)
    assert fitted.kept == (0,) and fitted.texts[0].endswith(CUT_MARKER)
    assert sent(fitted) + 20 <= base + 120


def test_proportional_keeps_each_share() -> None:
    refs = [answer(400, 1), answer(200, 2), answer(100, 3)]
    base = asyncio.run(words(build([])))
    fitted = fit(refs, n_ctx=base + 20 + 350)  # half of 700 words
    assert fitted.kept == (0, 1, 2) and fitted.truncated
    assert sent(fitted) + 20 <= base + 370
    kept_words = [len(t.removesuffix(CUT_MARKER).split()) for t in fitted.texts]
    fractions = [k / n for k, n in zip(kept_words, (400, 200, 100), strict=True)]
    # about half each; numbering and the marker take a little of each share
    assert all(0.4 <= f <= 0.55 for f in fractions), fractions
    assert max(fractions) - min(fractions) <= 0.08, fractions


def test_proportional_keeps_short_answers_whole() -> None:
    refs = [answer(600, 1), "Mont Blanc.", answer(300, 2)]
    base = asyncio.run(words(build([])))
    fitted = fit(refs, n_ctx=base + 20 + 200)
    assert fitted.kept == (0, 1, 2) and fitted.texts[1] == "Mont Blanc."
    assert fitted.texts[0].endswith(CUT_MARKER) and fitted.texts[2].endswith(CUT_MARKER)


def test_proportional_drops_the_longest_when_minimums_do_not_fit() -> None:
    refs = [answer(30, 1), answer(900, 2), answer(30, 3)]
    base = asyncio.run(words(build([])))
    fitted = fit(refs, n_ctx=base + 20 + 2 * MIN_REFERENCE_TOKENS + 4)
    assert 1 not in fitted.kept and fitted.kept == (0, 2) and fitted.truncated


def test_no_room_at_all_drops_every_reference() -> None:
    refs = [answer(50, 1), answer(50, 2)]
    base = asyncio.run(words(build([])))
    for n_ctx in (base + 20 - 5, base + 20, base + 20 + MIN_REFERENCE_TOKENS - 1):
        for ranked in (False, True):
            assert fit(refs, n_ctx=n_ctx, ranked=ranked) == Fitted((), (), 0, True)


def test_no_references_is_not_a_truncation() -> None:
    assert fit([], n_ctx=10) == Fitted((), (), 0, False)


def test_cut_at_a_word_and_outside_a_combining_sequence() -> None:
    accented = "e\u0301" * 400  # é as e + combining acute, no spaces at all
    fitted = fit([accented], n_ctx=200, counter=estimate)
    (text,) = fitted.texts
    body = text.removesuffix(CUT_MARKER)
    assert text.endswith(CUT_MARKER) and body and body == "e\u0301" * (len(body) // 2)
    prose = " ".join(["mountain"] * 300)
    (cut,) = fit([prose], n_ctx=200, counter=estimate).texts
    assert set(cut.removesuffix(CUT_MARKER).split()) == {"mountain"}


def test_the_documented_estimate_fits_with_few_counts() -> None:
    refs = [answer(300, i) for i in range(4)]
    counter = Counter(estimate)
    fitted = fit(refs, n_ctx=2048, max_tokens=512, counter=counter)
    assert fitted.truncated and fitted.kept == (0, 1, 2, 3)
    assert sent(fitted, estimate) + 512 <= 2048
    assert counter.calls <= 2 + len(refs) + 2


class Lumpy:
    """A counter far from linear in characters: words with a digit 9 cost 6 tokens."""

    async def __call__(self, messages: list[ChatMessage]) -> int:
        return sum(sum(6 if "9" in w else 1 for w in m.content.split()) + 4 for m in messages)


def test_a_nonlinear_tokenizer_is_shrunk_again_until_it_fits() -> None:
    # expensive short words first, cheap long ones after: a cut by characters keeps far more
    # tokens than planned, so the first cut is still over and must be shrunk again
    refs = [" ".join(["99"] * 100) + " " + answer(200, 1)]
    counter = Counter(Lumpy())
    base = asyncio.run(Lumpy()(build([])))
    fitted = fit(refs, n_ctx=base + 20 + 150, counter=counter)
    assert fitted.kept == (0,) and fitted.truncated
    assert asyncio.run(Lumpy()(build(list(fitted.texts)))) + 20 <= base + 170
    assert 3 < counter.calls <= 2 + MAX_SHRINK_ROUNDS  # base, full, then the rounds


class Stubborn:
    """A counter on which cutting never helps: each reference costs 100 tokens, however long."""

    async def __call__(self, messages: list[ChatMessage]) -> int:
        lines = messages[0].content.splitlines()
        return 4 * len(messages) + 100 * sum(1 for line in lines if line[:1].isdigit())


def test_when_shrinking_does_not_help_references_are_dropped_whole() -> None:
    refs = [answer(100, 1), answer(300, 2), answer(200, 3)]
    counter = Counter(Stubborn())
    fitted = fit(refs, n_ctx=8 + 20 + 250, counter=counter)  # room for two of them
    assert fitted.kept == (0, 2) and fitted.truncated  # the longest went first
    assert asyncio.run(Stubborn()(build(list(fitted.texts)))) + 20 <= 278
    assert counter.calls == 2 + len(refs) + MAX_SHRINK_ROUNDS + 1
    ranked = Counter(Stubborn())
    assert fit(refs, n_ctx=8 + 20 + 150, ranked=True, counter=ranked).kept == (0,)


@settings(max_examples=150, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=0, max_value=400), min_size=0, max_size=6),
    n_ctx=st.integers(min_value=0, max_value=2500),
    max_tokens=st.integers(min_value=1, max_value=300),
    ranked=st.booleans(),
    counter_kind=st.sampled_from(["words", "estimate", "lumpy"]),
)
def test_the_result_always_fits_or_drops_everything(
    lengths: list[int], n_ctx: int, max_tokens: int, ranked: bool, counter_kind: str
) -> None:
    counters: dict[str, Count] = {"words": words, "estimate": estimate, "lumpy": Lumpy()}
    tokens = counters[counter_kind]
    refs = [
        answer(n, i) + (" 99" * (n % 7) if counter_kind == "lumpy" else "")
        for i, n in enumerate(lengths)
    ]
    counter = Counter(tokens)
    fitted = fit(refs, n_ctx=n_ctx, max_tokens=max_tokens, ranked=ranked, counter=counter)
    assert counter.calls <= 2 + 2 * len(refs) + MAX_SHRINK_ROUNDS
    assert len(fitted.kept) == len(fitted.texts)
    assert list(fitted.kept) == sorted(set(fitted.kept))
    if fitted.kept:
        assert sent(fitted, tokens) + max_tokens <= n_ctx
    for i, text in zip(fitted.kept, fitted.texts, strict=True):
        assert text == refs[i] or (
            text.endswith(CUT_MARKER) and refs[i].startswith(text.removesuffix(CUT_MARKER))
        )
    whole = all(t == refs[i] for i, t in zip(fitted.kept, fitted.texts, strict=True))
    assert fitted.truncated == (len(fitted.kept) < len(refs) or not whole)
    if ranked and fitted.kept:  # lowest-ranked go first: what is kept is a prefix
        assert fitted.kept == tuple(range(len(fitted.kept)))
        assert all(t == refs[i] for i, t in zip(fitted.kept[:-1], fitted.texts, strict=False))


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=0, max_value=300), min_size=1, max_size=5),
    max_tokens=st.integers(min_value=1, max_value=100),
    ranked=st.booleans(),
)
def test_nothing_is_cut_when_it_fits(lengths: list[int], max_tokens: int, ranked: bool) -> None:
    refs = [answer(n, i) for i, n in enumerate(lengths)]
    needed = asyncio.run(words(build(refs))) + max_tokens
    for n_ctx in (needed, needed + 1000):
        fitted = fit(refs, n_ctx=n_ctx, max_tokens=max_tokens, ranked=ranked)
        assert fitted.kept == tuple(range(len(refs))) and fitted.texts == tuple(refs)
        assert not fitted.truncated
    assert math.isfinite(fitted.reference_tokens)
