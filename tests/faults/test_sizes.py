"""Sizes that are infinite, NaN, overflowing or absurd: one line naming the key, exit 2.

TOML reads ``inf``, ``nan`` and ``1e400`` (which overflows to ``inf``) as floats; the command line
passes text. Every size goes through localmoa.sizes.parse_size, which accepts 1 byte to 1 PiB
and refuses anything else with a ValueError that config and budget turn into a user error.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_config
from hypothesis import given, settings
from hypothesis import strategies as st

from localmoa.config import load_config
from localmoa.errors import BudgetError, ConfigError
from localmoa.hardware import resolve_budget
from localmoa.sizes import MAX_SIZE, format_bytes, parse_size

EXAMPLE = 'write e.g. "512MiB" or "12GiB"'
PiB = 1 << 50

HOSTILE = [
    (float("inf"), "inf is infinite"),
    (float("-inf"), "-inf is infinite"),
    (float("nan"), "nan is not a number"),
    (1e30, "more than any machine's memory"),
    (10**30, "more than any machine's memory"),
    (PiB + 1, "more than any machine's memory"),
    ("9" * 40 + "GiB", "more than any machine's memory"),
    ("9" * 296 + "EiB", "not a size: '999"),  # a float overflows on the way
    ("inf", "not a size: 'inf'"),
    ("1e400", "not a size: '1e400'"),
    (True, "not a size: True"),
    (0.5, "not a size: 0.5"),
]


@pytest.mark.parametrize(("value", "expected"), HOSTILE)
def test_hostile_sizes_are_value_errors_with_an_example(value: object, expected: str) -> None:
    with pytest.raises(ValueError, match=None) as caught:
        parse_size(value)
    assert expected in str(caught.value) and EXAMPLE in str(caught.value)


def test_the_largest_size_is_one_pib() -> None:
    assert parse_size("1PiB") == parse_size(PiB) == parse_size(float(PiB)) == MAX_SIZE == PiB


@settings(max_examples=300, deadline=1000, database=None)
@given(
    st.one_of(
        st.floats(),
        st.integers(),
        st.text(max_size=40),
        st.from_regex(
            r"\s*[0-9]{0,400}(\.[0-9]{0,400})?\s*[kKmMgGtTpPeE]?i?[bB]\s*", fullmatch=True
        ),
        st.booleans(),
        st.none(),
    )
)
def test_any_value_is_a_size_or_a_value_error(value: object) -> None:
    try:
        size = parse_size(value)
    except ValueError as exc:
        assert EXAMPLE in str(exc)
    else:
        assert isinstance(size, int) and 1 <= size <= MAX_SIZE


def test_huge_byte_counts_still_print() -> None:
    assert format_bytes(10**400).endswith(" TiB")
    assert format_bytes(PiB) == "1024.0 TiB"


CONFIG = """
[settings]
memory_budget = {budget}
[models.a]
backend = "fake"
memory = {memory}
[models.b]
backend = "llamacpp"
path = "b.gguf"
n_ctx = {n_ctx}
[ensembles.default]
layers = [["a", "b"]]
aggregator = "a"
"""


@pytest.mark.parametrize(
    ("budget", "memory", "n_ctx", "expected"),
    [
        ("inf", '"1GiB"', "512", "settings.memory_budget: not a size: inf is infinite"),
        ("1e400", '"1GiB"', "512", "settings.memory_budget: not a size: inf is infinite"),
        ("nan", '"1GiB"', "512", "settings.memory_budget: not a size: nan is not a number"),
        ("-inf", '"1GiB"', "512", "settings.memory_budget: not a size: -inf"),
        ("1e30", '"1GiB"', "512", "settings.memory_budget: not a size: 1e+30 is more than any"),
        ('"4GiB"', "inf", "512", "models.a.memory: not a size: inf is infinite"),
        ('"4GiB"', "nan", "512", "models.a.memory: not a size: nan"),
        ('"4GiB"', str(10**40), "512", "models.a.memory: not a size: 1000000"),
        ('"4GiB"', '"1GiB"', "1e400", "models.b.n_ctx: Input should be a finite number"),
        ('"4GiB"', '"1GiB"', str(10**40), "models.b.n_ctx: Input should be less than or equal"),
    ],
)
def test_config_sizes_name_their_key(
    tmp_path: Path, budget: str, memory: str, n_ctx: str, expected: str
) -> None:
    path = write_config(tmp_path, CONFIG.format(budget=budget, memory=memory, n_ctx=n_ctx))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert expected in message, message
    assert "n_ctx" in expected or EXAMPLE in message


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        ("inf", "not a size: 'inf'"),
        ("nan", "not a size: 'nan'"),
        ("1e400", "not a size: '1e400'"),
        ("1e30", "not a size: '1e30'"),
        ("-inf", "not a size: '-inf'"),
        ("9" * 40 + "GiB", "more than any machine's memory"),
        ("2PiB", "more than any machine's memory"),
    ],
)
def test_budget_flags_name_the_flag(flag: str, expected: str) -> None:
    with pytest.raises(BudgetError) as caught:
        resolve_budget(flag, "auto")
    message = str(caught.value)
    assert message.startswith("--memory-budget: ") and expected in message and EXAMPLE in message


def test_a_budget_set_in_code_is_checked_too() -> None:
    with pytest.raises(BudgetError, match=r"settings\.memory_budget: not a size: .* more than"):
        resolve_budget(None, 2 * PiB)


FAKE = """
[settings]
memory_budget = {budget}
[models.a]
backend = "fake"
memory = {memory}
[ensembles.default]
layers = [["a"]]
aggregator = "a"
"""


@pytest.mark.parametrize(
    ("budget", "memory", "flags", "expected"),
    [
        ("inf", '"1GiB"', [], "settings.memory_budget: not a size: inf"),
        ("1e400", '"1GiB"', [], "settings.memory_budget: not a size: inf"),
        ("nan", '"1GiB"', [], "settings.memory_budget: not a size: nan"),
        ('"4GiB"', "inf", [], "models.a.memory: not a size: inf"),
        ('"4GiB"', '"1GiB"', ["--memory-budget", "inf"], "--memory-budget: not a size: 'inf'"),
        ('"4GiB"', '"1GiB"', ["--memory-budget", "nan"], "--memory-budget: not a size: 'nan'"),
        ('"4GiB"', '"1GiB"', ["--memory-budget", "1e400"], "--memory-budget: not a size"),
    ],
)
def test_plan_with_a_hostile_size_exits_2_naming_the_key(
    tmp_path: Path, budget: str, memory: str, flags: list[str], expected: str
) -> None:
    write_config(tmp_path, FAKE.format(budget=budget, memory=memory))
    out = subprocess.run(
        [sys.executable, "-m", "localmoa", "plan", *flags],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert any(expected in line and EXAMPLE in line for line in out.stderr.splitlines()), out.stderr
