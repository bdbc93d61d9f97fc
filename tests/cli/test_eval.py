"""``localmoa eval`` as a user runs it: the table, ``--json``'s contract, the mistakes refused
before anything loads, every answer and judgement in the run log, and one evaluation on real
llama.cpp (the tiny random-weight models) that checks the machinery, not the scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_config

from localmoa.evaluation.report import EvalReport

from .invoke import interrupt_when, localmoa

CONFIG = """
[models.wrong]
backend = "fake"
memory = "1GiB"
reply = "{prompt} Answer: 999 (E) no"
[models.right]
backend = "fake"
memory = "1GiB"
reply = "{prompt}"
[models.judge]
backend = "fake"
memory = "1GiB"
reply = "Fair enough. Rating: [[7]] And of the two: [[A]]"
[ensembles.default]
layers = [["wrong", "right"], ["wrong", "right"]]
aggregator = "right"
[ensembles.bad]
layers = [["wrong", "right"]]
aggregator = "wrong"
"""
"""A model that answers right (it echoes the prompt, which ends with the answer), one that never
does, an ensemble aggregated by each, and a judge that rates 7 and always prefers the answer it
is shown first."""

EXACT = [
    {"id": "n1", "prompt": "Repeat this. Answer: 42", "answer": "42", "kind": "exact"},
    {"id": "c1", "prompt": "Repeat this. Answer: (B)", "answer": "B", "kind": "exact"},
    {"id": "y1", "prompt": "Repeat this. Answer: yes", "answer": "yes", "kind": "exact"},
]
JUDGED = [{"id": "j1", "prompt": "Name a colour.", "answer": "Red.", "kind": "judged"}]
STARTER = Path(__file__).parents[2] / "localmoa" / "evaluation" / "starter.jsonl"
CONTRACT = {"name", "score", "n", "ci_low", "ci_high", "seconds", "tokens", "loads"}


def write_set(tmp_path: Path, questions: list[dict[str, str]]) -> Path:
    path = tmp_path / "set.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in questions))
    return path


@pytest.fixture(autouse=True)
def wide(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tables as wide as they need: rich obeys a COLUMNS the test process may carry."""
    monkeypatch.setenv("COLUMNS", "200")


def test_the_table_shows_every_system_against_the_best_member(tmp_path: Path) -> None:
    write_config(tmp_path, CONFIG)
    done = localmoa("eval", str(write_set(tmp_path, EXACT)), "--system", "moa/bad")
    assert done.returncode == 0, done.stderr
    rows = {line.split()[1]: line for line in done.stdout.splitlines() if "│ mo" in line}
    assert list(rows) == ["moa/default", "model/wrong", "model/right", "moa/bad"]
    assert "1.00" in rows["moa/default"] and "0/3/0" in rows["moa/default"]
    assert "0.00" in rows["model/wrong"] and "0/0/3" in rows["model/wrong"]
    assert "best" in rows["model/right"]
    assert "best member, model/right" in done.stdout
    assert "answering" in done.stderr and "loads" in done.stderr  # progress, then the account


def test_json_has_the_contract_fields_and_every_run_is_recorded(tmp_path: Path) -> None:
    write_config(tmp_path, CONFIG)
    source = write_set(tmp_path, EXACT + JUDGED)
    done = localmoa("eval", str(source), "--judge", "judge", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    report = EvalReport.model_validate(doc)
    assert {"systems", "best_member", "judge", "questions", "loads", "seconds"} <= set(doc)
    assert all(set(system) >= CONTRACT for system in doc["systems"])
    assert (report.questions, report.judge, report.best_member) == (4, "judge", "model/right")
    scores = {s.name: s.score for s in report.systems}
    judged = 6 / 9  # the judge rates every answer 7
    assert scores["model/right"] == pytest.approx(round((3 + judged) / 4, 4))
    assert scores["model/wrong"] == pytest.approx(round(judged / 4, 4))
    wrong = next(s for s in report.systems if s.name == "model/wrong")
    # three exact losses; on the judged one the judge prefers whichever answer comes first, in
    # both orders: a tie
    assert (wrong.wins, wrong.ties, wrong.losses) == (0, 1, 3)
    assert report.grading is not None
    assert (report.grading.ratings, report.grading.comparisons) == (3, 2)
    # every answer (4 questions x 3 systems) and every judgement (3 ratings, 2 comparisons)
    logged = localmoa("logs", "--json", "-n", "100")
    runs = json.loads(logged.stdout)
    assert sum(1 for r in runs if r["source"] == "batch") == 4 * 3 + 3 + 2
    assert sum(1 for r in runs if r["ensemble"] == "judge/judge") == 3 + 2
    assert {r.run_id for r in report.results} <= {r["id"] for r in runs}
    assert all(r.run_id for r in report.results)


def test_judged_questions_without_a_judge_are_refused_before_anything_loads(
    tmp_path: Path,
) -> None:
    write_config(tmp_path, CONFIG)
    done = localmoa("eval")  # the starter set has judged questions
    assert done.returncode == 2
    assert "21 of the 51 questions are judged" in done.stderr
    assert "--judge MODEL" in done.stderr and "Traceback" not in done.stderr
    assert json.loads(localmoa("logs", "--json").stdout) == []  # nothing ran
    unknown = localmoa("eval", "--judge", "gpt-9")
    assert unknown.returncode == 2 and 'no model "gpt-9"' in unknown.stderr


def test_an_unknown_system_is_refused_naming_what_exists(tmp_path: Path) -> None:
    write_config(tmp_path, CONFIG)
    done = localmoa("eval", str(write_set(tmp_path, EXACT)), "--system", "moa/good")
    assert done.returncode == 2
    assert "--system moa/good" in done.stderr
    assert "moa/bad, moa/default" in done.stderr and "model/right" in done.stderr
    assert json.loads(localmoa("logs", "--json").stdout) == []


def test_a_bad_line_is_refused_naming_it(tmp_path: Path) -> None:
    write_config(tmp_path, CONFIG)
    source = tmp_path / "set.jsonl"
    source.write_text(json.dumps(EXACT[0]) + '\n{"id": "x", "prompt": "?", "kind": "exact"}\n')
    done = localmoa("eval", str(source))
    assert done.returncode == 2
    assert "line 2" in done.stderr and '"exact" question needs an "answer"' in done.stderr
    missing = localmoa("eval", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2 and "no such file" in missing.stderr


def test_help_says_the_starter_set_is_the_default() -> None:
    done = localmoa("eval", "--help")
    assert done.returncode == 0
    assert "Without SET, the" in done.stdout and "starter set" in done.stdout
    for option in ("--judge", "--system", "--json", "--memory-budget", "--ensemble"):
        assert option in done.stdout


def test_on_llama_cpp_every_system_answers_and_the_loads_are_counted(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    """The tiny random models answer nonsense, so only the machinery is checked: each answer
    comes back, the whole evaluation is one plan (each model loads once for the answers), and
    the judge loads once per grading phase. The judge is a fake: a random model asked for a
    JSON rating fills its grammar's string to the last token, which takes minutes."""
    models = "\n".join(
        f'[models.{name}]\nbackend = "llamacpp"\npath = "{path}"\nn_ctx = 2048\nseed = 7\n'
        for name, path in tiny_models.items()
    )
    config = write_config(
        tmp_path,
        models
        + """
[models.judge]
backend = "fake"
memory = "1MiB"
reply = "Rating: [[5]] [[B]]"
[ensembles.default]
layers = [["tiny-a", "tiny-b"], ["tiny-c", "tiny-b"]]
aggregator = "tiny-a"
max_tokens = 16
""",
    )
    starter = [json.loads(line) for line in STARTER.read_text().splitlines()]
    chosen = [q for q in starter if q["id"] in {"arith-decimals", "logic-prime-91", "fact-gold"}]
    source = write_set(tmp_path, chosen)
    done = localmoa("eval", str(source), "--config", str(config), "--judge", "judge", "--json")
    assert done.returncode == 0, done.stderr
    report = EvalReport.model_validate_json(done.stdout)
    assert [s.name for s in report.systems] == [
        "moa/default",
        "model/tiny-a",
        "model/tiny-b",
        "model/tiny-c",
    ]
    # A random model may end its answer at once: an empty answer fails that call, and is the
    # only failure expected.
    assert all(r.error is None or "empty answer" in r.error for r in report.results)
    assert sum(s.failed for s in report.systems) < len(report.results)
    assert all(s.tokens > 0 and s.seconds > 0 for s in report.systems)
    assert report.answer_loads == 3  # every model once, for every answer of every system
    assert sum(s.loads for s in report.systems) * 3 == pytest.approx(3, abs=1e-3)
    assert report.grading is not None and report.grading.loads == 2  # once per grading phase
    assert report.grading.ratings == 4  # the one judged question, four systems
    assert report.loads == 3 + 2
    assert all(s.n == 3 for s in report.systems)  # a failed answer scores 0, still counted
    logged = json.loads(localmoa("logs", "--json", "-n", "100").stdout)
    assert {r.run_id for r in report.results} <= {r["id"] for r in logged}


def test_ctrl_c_stops_the_evaluation_and_unloads(tmp_path: Path) -> None:
    slow = CONFIG.replace('reply = "{prompt}"', 'reply = "{prompt}"\nseconds_per_token = 0.5')
    write_config(tmp_path, slow)
    code, err = interrupt_when("loaded right", "eval", str(write_set(tmp_path, EXACT)))
    assert code == 130, err
    assert "interrupted; unloaded" in err and "right" in err.split("unloaded")[-1]
    assert "Traceback" not in err
    runs = json.loads(localmoa("logs", "--json", "-n", "100").stdout)
    assert runs and {r["status"] for r in runs} == {"interrupted"}
