"""The variants on real llama.cpp (tiny random-weight models), as a user runs them: the judge's
JSON asked for with a grammar and read back, an early stop, roles written and cached, references
cut to fit a small context, and every bad setting refused with its key path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conftest import write_config

from .invoke import localmoa


def models(tiny_models: dict[str, Path], **n_ctx: int) -> str:
    return "\n".join(
        f'[models.{name.replace("-", "_")}]\nbackend = "llamacpp"\npath = "{path}"\n'
        f"n_ctx = {n_ctx.get(name.replace('-', '_'), 2048)}\nseed = 7\n"
        for name, path in tiny_models.items()
    )


def run_json(*args: str) -> dict[str, Any]:
    out = localmoa("run", "Why is the sky blue?", "--json", "--memory-budget", "1GiB", *args)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    doc: dict[str, Any] = json.loads(out.stdout)
    doc["stderr"] = out.stderr
    return doc


def test_a_judge_selects_and_the_next_calls_read_exactly_its_selection(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    write_config(
        tmp_path,
        models(tiny_models)
        + """
[ensembles.default]
layers = [["tiny_a", "tiny_b", "tiny_c"], ["tiny_a", "tiny_b", "tiny_c"]]
aggregator = "tiny_a"
judge = { model = "tiny_b", top_k = 2 }
max_tokens = 16
""",
    )
    doc = run_json()
    calls = doc["calls"]
    assert [(c["layer"], c["role"]) for c in calls] == [
        *[(1, "proposer")] * 3,
        (1, "judge"),
        *[(2, "proposer")] * 3,
        (2, "judge"),
        (3, "aggregator"),
    ]
    for judge, readers in ((calls[3], calls[4:7]), (calls[7], calls[8:])):
        assert judge["references"] == [[judge["layer"], i] for i in range(3)]
        assert isinstance(judge["parsed"], bool) and judge["stop"] is False
        chosen = [judge["references"][n - 1] for n in judge["selected"]]
        assert 1 <= len(chosen) <= (2 if judge["parsed"] else 3)
        assert all(reader["references"] == chosen for reader in readers)
    assert "judge 1" in doc["stderr"]


def test_an_early_stop_on_real_llama_cpp_skips_the_layer_and_its_model(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    """The verdict comes from a random-weight model writing JSON under the schema's grammar;
    whatever it decides, the run must be consistent with it (the fake-backend tests script
    both outcomes)."""
    write_config(
        tmp_path,
        models(tiny_models)
        + """
[ensembles.default]
layers = [["tiny_a", "tiny_b"], ["tiny_c", "tiny_c"]]
aggregator = "tiny_a"
judge = { model = "tiny_b", top_k = 1, early_stop = true }
max_tokens = 16
""",
    )
    doc = run_json()
    judge = next(c for c in doc["calls"] if c["role"] == "judge")
    used = {c["model"] for c in doc["calls"]}
    if judge["stop"]:
        assert doc["skipped_layers"] == [2] and "tiny_c" not in used
        assert "early stop" in doc["stderr"]
    else:
        assert doc["skipped_layers"] == [] and "tiny_c" in used


def test_roles_are_written_by_a_real_model_under_a_grammar_and_cached(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    write_config(
        tmp_path,
        models(tiny_models)
        + """
[ensembles.default]
layers = [["tiny_a", "tiny_b"]]
aggregator = "tiny_a"
roles = "auto"
task = "Explain physics to students."
max_tokens = 8
""",
    )
    first = run_json()
    roles = first["calls"][0]
    assert roles["role"] == "roles" and roles["model"] == "tiny_a"
    plan = localmoa("plan", "--json", "--memory-budget", "1GiB")
    assert plan.returncode == 0, plan.stderr
    cached = json.loads(plan.stdout)["roles"]
    if roles["parsed"]:  # random weights under the grammar: two strings, usually distinct
        assert cached is not None and len(cached) == 2
        again = run_json()
        assert [c["role"] for c in again["calls"]] == ["proposer", "proposer", "aggregator"]
    else:
        assert cached is None


def test_references_too_long_for_the_aggregator_are_cut_and_the_call_succeeds(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    write_config(
        tmp_path,
        models(tiny_models, tiny_a=640)
        + """
[ensembles.default]
layers = [["tiny_b", "tiny_c", "tiny_b"]]
aggregator = { model = "tiny_a", max_tokens = 16 }
max_tokens = 200
""",
    )
    doc = run_json()
    final = doc["calls"][-1]
    assert final["role"] == "aggregator" and final["ok"], final["error"]
    proposed = sum(c["tokens"] for c in doc["calls"][:-1])
    # The instruction alone takes ~400 of the tiny vocabulary's tokens: the answers cannot fit.
    assert final["truncated"] is True and 0 < final["reference_tokens"] < proposed
    assert final["prompt_tokens"] + 16 <= 640


def test_bad_variant_settings_are_refused_with_their_key_paths(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    write_config(
        tmp_path,
        models(tiny_models)
        + """
[ensembles.default]
layers = [["tiny_a", "tiny_b"]]
aggregator = "tiny_a"
judge = { model = "nope", top_k = 2 }
roles = "auto"
cycles = 0
aggregate_prompt = "merge these"
[ensembles.other]
layers = [[{ model = "tiny_a", samples = 0 }]]
aggregator = "tiny_a"
judge = { top_k = 0 }
""",
    )
    out = localmoa("plan")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    for line in (
        'ensembles.default.judge.model: unknown model "nope"',
        "ensembles.default.judge.top_k: 2 keeps every answer of layers[0]",
        'ensembles.default.roles: "auto" needs ensembles.default.task',
        "ensembles.default.cycles: Input should be greater than 0",
        "ensembles.default.aggregate_prompt: must contain {responses}",
        "ensembles.other.layers[0][0].samples: Input should be greater than or equal to 1",
        "ensembles.other.judge.top_k: Input should be greater than 0",
    ):
        assert line in out.stderr, out.stderr


def test_self_moa_samples_are_four_calls_whose_kv_cache_the_plan_counts(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    ensemble = """
[ensembles.default]
layers = [[{ model = "tiny_a", samples = SAMPLES, seed = 3 }]]
aggregator = "tiny_a"
max_tokens = 12
"""
    write_config(tmp_path, models(tiny_models) + ensemble.replace("SAMPLES", "1"))
    one = json.loads(localmoa("plan", "--json", "--memory-budget", "1GiB").stdout)
    write_config(tmp_path, models(tiny_models) + ensemble.replace("SAMPLES", "4"))
    four = json.loads(localmoa("plan", "--json", "--memory-budget", "1GiB").stdout)
    kv = one["footprints"]["tiny_a"]["kv_cache"]
    assert kv > 0 and four["footprints"]["tiny_a"]["kv_cache"] >= 4 * kv
    doc = run_json()
    samples = [c for c in doc["calls"] if c["role"] == "proposer"]
    assert [(c["layer"], c["index"]) for c in samples] == [(1, 0), (1, 1), (1, 2), (1, 3)]
    assert all(c["ok"] and c["tokens"] > 0 for c in samples)
    assert len({c["text"] for c in samples}) > 1  # distinct seeds, distinct answers
    assert doc["calls"][-1]["references"] == [[1, i] for i in range(4)]
    assert doc["loads"] == 1


def test_select_mode_and_a_sliding_window_on_real_llama_cpp(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    """``final = "select"``: the answer is one proposer's text, chosen by a real judge under its
    grammar. Self-MoA-Seq: samples too long for the aggregator's context read in steps."""
    write_config(
        tmp_path,
        models(tiny_models)
        + """
[ensembles.default]
layers = [["tiny_a", "tiny_b", "tiny_c"]]
aggregator = "tiny_b"
final = "select"
max_tokens = 12
""",
    )
    doc = run_json()
    judge = doc["calls"][-1]
    assert judge["role"] == "judge"
    assert len(judge["selected"]) == 1 or not judge["parsed"]
    chosen = judge["references"][judge["selected"][0] - 1]
    assert doc["answer"] == doc["calls"][chosen[1]]["text"]
    write_config(
        tmp_path,
        models(tiny_models, tiny_a=700)
        + """
[ensembles.default]
layers = [[{ model = "tiny_a", samples = 5, seed = 1 }]]
aggregator = { model = "tiny_a", max_tokens = 16 }
max_tokens = 150
""",
    )
    plan = json.loads(localmoa("plan", "--json", "--memory-budget", "1GiB").stdout)
    steps = [s for s in plan["stages"] if s["role"] == "aggregator"]
    assert len(steps) >= 2 and steps[0]["label"] == "aggregator step 1"
    doc = run_json()
    made = [c for c in doc["calls"] if c["role"] == "aggregator"]
    assert len(made) == len(steps) and all(c["ok"] for c in made)
    assert [r for c in made for r in c["references"] if r[0] == 1] == [[1, i] for i in range(5)]
