"""The devices benchmark (scripts/bench_devices.py): the scheduler suite planned on 1 × 24 GiB,
2 × 24 GiB and 1 × 48 GiB, and timed with one bandwidth per device."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from localmoa.planning.profiles import PROFILES

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def load_bench() -> ModuleType:
    sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location("bench_devices", SCRIPTS / "bench_devices.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_devices"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def run(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *args: str
) -> tuple[ModuleType, str]:
    bench = load_bench()
    monkeypatch.setattr(sys, "argv", ["bench_devices.py", *args])
    bench.main()
    return bench, capsys.readouterr().out


def test_a_second_card_never_loads_more_and_one_card_of_both_never_loads_more_still(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bench, out = run(capsys, monkeypatch, "--json", "--per-profile", "2", "--plan-for", "loads")
    doc = json.loads(out)
    assert len(doc["instances"]) == 2 * len(PROFILES)
    sizes = bench.SIZES
    budget = bench.MACHINES["1x24"][0].memory
    for instance, case in zip(bench.suite(per_profile=2), doc["instances"], strict=True):
        m = case["machines"]
        assert set(m) == {"1x24", "2x24", "1x48"}
        # Only a model larger than one 24 GiB card keeps an ensemble off it.
        too_big = any(sizes[c.model] > budget for s in instance.calls for c in s)
        assert (m["1x24"] is None) == too_big
        assert m["2x24"] is not None and m["1x48"] is not None
        assert m["2x24"]["split"] == too_big
        # What fits one card fits two, what two hold fits one of both: fewest loads ordered so.
        if m["1x24"] is not None:
            assert m["2x24"]["loads"] <= m["1x24"]["loads"]
        assert m["1x48"]["loads"] <= m["2x24"]["loads"]
    runs = sum(m["machines"]["1x24"] is not None for m in doc["instances"])
    assert doc["summary"]["2x24_loads_le_1x24"] == f"{runs}/{runs}"


def test_two_cards_beat_one_where_one_swaps_models(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, out = run(capsys, monkeypatch, "--json", "--per-profile", "2", "--plan-for", "loads")
    cases = [i["machines"] for i in json.loads(out)["instances"]]
    fewer = [m for m in cases if m["1x24"] and m["2x24"]["loads"] < m["1x24"]["loads"]]
    assert fewer
    assert all(m["2x24"]["makespan_s"] < m["1x24"]["makespan_s"] for m in fewer)


def test_the_bench_prints_a_table_and_a_json_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, out = run(capsys, monkeypatch, "--per-profile", "1", "--plan-for", "loads")
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["instance", "1x24", "2x24", "1x48"]
    assert any(line.startswith("server-80g/00") for line in lines)
    summary = json.loads(lines[-1])
    assert summary["runs"] == len(PROFILES)
    assert set(summary["ratios"]) >= {"2x24/1x24", "2x24/1x48", "1x48/1x24"}
    assert set(summary["loads"]) == {"1x24", "2x24", "1x48"}
