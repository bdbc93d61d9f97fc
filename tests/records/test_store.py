"""The run log's file: migrations, ids, permissions, filters and search, another process."""

from __future__ import annotations

import sqlite3
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from localmoa.backends.base import ChatMessage
from localmoa.errors import UserError
from localmoa.records import store as store_module
from localmoa.records.models import LoggedCall, LoggedLoad, RunDetail
from localmoa.records.store import MIGRATIONS, Store, iso_utc, log_path, new_id

T0 = 1_750_000_000.0  # a fixed moment, so that --since filters are exact


def make_run(
    *,
    started: float = T0,
    ensemble: str = "default",
    prompt: str | None = "why is the sky blue",
    source: str = "run",
    run_id: str | None = None,
) -> RunDetail:
    conversation = None if prompt is None else [ChatMessage(role="user", content=prompt)]
    return RunDetail(
        id=run_id or new_id(started),
        status="running",
        source=source,  # type: ignore[arg-type]
        chat_id=None,
        ensemble=ensemble,
        started=iso_utc(started),
        seconds=None,
        error=None,
        config={"layers": [["a"]]},
        plan=None,
        budget_bytes=1 << 30,
        budget_source="flag",
        device=None,
        versions={"localmoa": "0"},
        conversation=conversation,
        answer=None,
        calls=[],
        loads=[],
    )


def make_call(
    model: str = "a", layer: int = 1, index: int = 0, text: str | None = "x"
) -> LoggedCall:
    return LoggedCall(
        layer=layer,
        index=index,
        role="proposer",
        model=model,
        backend="fake",
        ok=True,
        error=None,
        tokens_in=10,
        tokens_out=3,
        ttft_s=0.25,
        prefill_tok_s=40.0,
        decode_tok_s=12.5,
        seconds=0.5,
        queued_at=T0,
        started_at=T0 + 0.1,
        first_token_at=T0 + 0.35,
        ended_at=T0 + 0.6,
        references=[(1, 0), (1, 2)],
        truncated=True,
        selected=[2, 1],
        stop=False,
        parsed=True,
        messages=None if text is None else [ChatMessage(role="user", content="hi")],
        text=text,
    )


def opened(path: Path | None = None) -> Store:
    store = Store.open(path or log_path())
    assert store is not None
    return store


def test_migrations_apply_once_in_order_and_a_second_open_changes_nothing() -> None:
    store = opened()
    store.close()
    db = sqlite3.connect(log_path())
    first = db.execute("SELECT id, name, applied_at FROM _migrations ORDER BY id").fetchall()
    assert [row[0] for row in first] == [m.id for m in MIGRATIONS] == [1, 2, 3]
    db.close()
    opened().close()
    db = sqlite3.connect(log_path())
    assert (
        db.execute("SELECT id, name, applied_at FROM _migrations ORDER BY id").fetchall() == first
    )
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"runs", "calls", "loads", "runs_fts", "_migrations"} <= tables


def test_a_log_made_before_the_search_index_is_indexed_when_it_arrives() -> None:
    store = opened()
    store.add_run(make_run(prompt="an older question about penguins"))
    store.close()
    db = sqlite3.connect(log_path())  # as a log written before migration 2 existed
    db.execute("DROP TABLE runs_fts")
    db.execute("DELETE FROM _migrations WHERE id = 2")
    db.commit()
    db.close()
    store = opened()
    assert store.fts
    assert [r.prompt for r in store.list_runs(query="penguins")] == [
        "an older question about penguins"
    ]


def test_a_log_of_the_previous_schema_gains_device_and_node_and_keeps_its_rows() -> None:
    """A log written by the release before migration 3 (its own migrations, its own columns)
    opens, upgrades once, reads its old rows (placed nowhere) and takes placed ones."""
    db = sqlite3.connect(log_path())
    for migration in MIGRATIONS[:2]:
        assert migration.apply(db)
    db.execute("CREATE TABLE _migrations (id INTEGER PRIMARY KEY, name TEXT NOT NULL, "
               "applied_at TEXT NOT NULL)")  # fmt: skip
    db.executemany(
        "INSERT INTO _migrations VALUES (?, ?, ?)",
        [(m.id, m.name, iso_utc(T0)) for m in MIGRATIONS[:2]],
    )
    old = new_id(T0)
    db.execute(
        "INSERT INTO runs (id, source, ensemble, config_json, versions_json, prompt, status, "
        "started, started_at) VALUES (?, 'run', 'default', '{}', '{}', 'old news', 'ok', ?, ?)",
        (old, iso_utc(T0), T0),
    )
    db.execute(
        'INSERT INTO calls (run_id, layer, "index", role, model, backend, ok, tokens_in, '
        "tokens_out, seconds, references_json, truncated, text) "
        "VALUES (?, 1, 0, 'proposer', 'a', 'fake', 1, 5, 2, 0.5, '[]', 0, 'hi')",
        (old,),
    )
    db.execute(
        "INSERT INTO loads (run_id, model, started_at, seconds) VALUES (?, 'a', ?, 1.0)",
        (old, T0),
    )
    db.commit()
    db.close()

    store = opened()
    (before,) = store.list_runs()
    assert (before.id, before.calls, before.loads, before.prompt) == (old, 1, 1, "old news")
    assert (before.devices, before.nodes) == ([], [])
    detail = store.run(old)
    assert [(c.model, c.text, c.device, c.node) for c in detail.calls] == [("a", "hi", None, None)]
    assert [(load.model, load.device, load.node) for load in detail.loads] == [("a", None, None)]
    store.add_call(old, make_call("b", index=1).model_copy(update={"device": "gpu1"}))
    assert [c.device for c in store.run(old).calls] == [None, "gpu1"]
    assert store.list_runs()[0].devices == ["gpu1"]
    store.close()
    db = sqlite3.connect(log_path())
    applied = [row[0] for row in db.execute("SELECT id FROM _migrations ORDER BY id")]
    assert applied == [1, 2, 3]
    for table in ("calls", "loads"):
        columns = [row[1] for row in db.execute(f"PRAGMA table_info({table})")]
        assert columns[-2:] == ["device", "node"], table


def test_where_calls_and_loads_ran_reads_back_and_each_run_lists_its_places(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(store_module, "_PLACES_AT_ONCE", 2)  # several queries for 5 runs
    store = opened()
    runs = [make_run(started=T0 + i) for i in range(5)]
    for run in runs:
        store.add_run(run)
    here = make_call("a").model_copy(update={"device": "gpu1"})
    there = make_call("b", index=1).model_copy(update={"device": "nodeB/gpu0", "node": "nodeB"})
    store.add_call(runs[0].id, here)
    store.add_call(runs[0].id, there)
    load = LoggedLoad(model="c", device="gpu0", node=None, started_at=T0, seconds=1,
                      bytes_estimated=None, bytes_measured=None, bytes_peak=None,
                      unloaded_at=None)  # fmt: skip
    store.add_load(runs[0].id, load)
    store.add_load(runs[3].id, load.model_copy(update={"device": None, "node": "nodeC"}))
    store.add_call(runs[4].id, make_call("a"))  # placed nowhere (Ollama)
    detail = store.run(runs[0].id)
    assert detail.calls == [here, there] and detail.loads == [load]
    places = {r.id: (r.devices, r.nodes) for r in store.list_runs()}
    assert places == {
        runs[0].id: (["gpu0", "gpu1", "nodeB/gpu0"], ["nodeB"]),
        runs[1].id: ([], []),
        runs[2].id: ([], []),
        runs[3].id: ([], ["nodeC"]),
        runs[4].id: ([], []),
    }


def test_the_folder_is_made_0700_and_the_file_0600_wal_and_shm_alike(tmp_path: Path) -> None:
    path = tmp_path / "new" / "home" / "logs.db"
    store = opened(path)
    store.add_run(make_run())  # the -wal and -shm files exist while the store is open
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    for name in ("logs.db", "logs.db-wal", "logs.db-shm"):
        assert stat.S_IMODE((path.parent / name).stat().st_mode) == 0o600, name
    store.close()


def test_a_looser_file_is_tightened_and_an_existing_folder_left_alone(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    path = folder / "logs.db"
    opened(path).close()
    path.chmod(0o644)
    opened(path).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755


def test_reading_never_creates_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "logs.db"
    assert Store.open(path, create=False) is None
    assert not path.parent.exists()


def test_log_path_follows_localmoa_home(isolated: Path) -> None:
    assert log_path() == isolated / "home" / "logs.db"


def test_ids_sort_by_time_and_increase_within_one_millisecond() -> None:
    same = [new_id(T0) for _ in range(50)]
    assert same == sorted(same) and len(set(same)) == 50
    assert all(len(i) == 26 and i[:10] == same[0][:10] for i in same)
    assert new_id(T0 - 1) < new_id(T0) < new_id(T0 + 0.002) < new_id(T0 + 86400)


def test_a_run_reads_back_as_written_with_its_calls_and_loads() -> None:
    store = opened()
    run = make_run()
    store.add_run(run)
    store.add_call(run.id, make_call("b", layer=1, index=1))
    store.add_call(run.id, make_call("a", layer=1, index=0))
    load = LoggedLoad(
        model="a",
        started_at=T0,
        seconds=1.5,
        bytes_estimated=100,
        bytes_measured=90,
        bytes_peak=120,
        unloaded_at=None,
    )
    load_id = store.add_load(run.id, load)
    store.set_unloaded(load_id, T0 + 9)
    store.finish_run(run.id, status="ok", answer="because", error=None, seconds=2.5)
    detail = store.run(run.id)
    assert detail.status == "ok" and detail.answer == "because" and detail.seconds == 2.5
    assert detail.conversation == run.conversation
    assert [c.model for c in detail.calls] == ["a", "b"]  # by layer, then index
    assert detail.calls[0] == make_call("a", layer=1, index=0)
    assert detail.loads == [load.model_copy(update={"unloaded_at": T0 + 9})]
    expected = {**run.model_dump(), "status": "ok", "answer": "because", "seconds": 2.5}
    assert detail.model_dump(exclude={"calls", "loads"}) == {
        k: v for k, v in expected.items() if k not in ("calls", "loads")
    }


def test_a_unique_prefix_finds_a_run_and_anything_else_is_one_clear_error() -> None:
    store = opened()
    first, second = new_id(T0), new_id(T0)  # the same millisecond: a long shared prefix
    store.add_run(make_run(run_id=first))
    store.add_run(make_run(run_id=second))
    shared = next(i for i in range(26) if first[i] != second[i])
    assert store.run(first[: shared + 1]).id == first
    assert store.run(second[: shared + 1].lower()).id == second
    with pytest.raises(UserError, match="matches more than one run") as ambiguous:
        store.run(first[:shared])
    assert first in str(ambiguous.value) and second in str(ambiguous.value)
    with pytest.raises(UserError, match=r'no run "ZZZZ" in .*logs\.db; localmoa logs lists'):
        store.run("ZZZZ")
    with pytest.raises(UserError, match="is not a run id"):
        store.run("01*")


def test_filters_combine_and_runs_come_newest_first() -> None:
    store = opened()
    old = make_run(started=T0, ensemble="big")
    new = make_run(started=T0 + 3600, ensemble="small")
    newest = make_run(started=T0 + 7200, ensemble="big")
    for run in (old, new, newest):
        store.add_run(run)
    store.add_call(old.id, make_call("qwen"))
    store.add_load(
        new.id, LoggedLoad(model="qwen", started_at=T0, seconds=1, bytes_estimated=None,
                           bytes_measured=None, bytes_peak=None, unloaded_at=None)
    )  # fmt: skip
    store.add_call(newest.id, make_call("llama"))
    store.finish_run(old.id, status="failed", answer=None, error="boom", seconds=1.0)
    store.finish_run(newest.id, status="ok", answer="fine", error=None, seconds=1.0)

    def ids(**filters: object) -> list[str]:
        return [r.id for r in store.list_runs(**filters)]  # type: ignore[arg-type]

    assert ids() == [newest.id, new.id, old.id]
    assert ids(n=2) == [newest.id, new.id]
    assert ids(ensemble="big") == [newest.id, old.id]
    assert ids(model="qwen") == [new.id, old.id]  # a call in one, a load in the other
    assert ids(status="failed") == [old.id]
    assert ids(status="running") == [new.id]
    assert ids(since=T0 + 3600) == [newest.id, new.id]
    assert ids(ensemble="big", status="ok", since=T0 + 1) == [newest.id]
    listed = store.list_runs(status="failed")[0]
    assert (listed.calls, listed.loads, listed.error) == (1, 0, "boom")


@pytest.mark.parametrize("fts", [True, False], ids=["fts5", "like-fallback"])
def test_query_finds_every_word_in_the_prompt_or_the_answer(fts: bool) -> None:
    store = opened()
    if not fts:  # as on a SQLite built without FTS5
        store.close()
        db = sqlite3.connect(log_path())
        db.execute("DROP TABLE runs_fts")
        db.commit()
        db.close()
        store = opened()
        assert not store.fts
    sky = make_run(started=T0, prompt="Why is the sky blue?")
    sea = make_run(started=T0 + 1, prompt="What colour is the sea?")
    private = make_run(started=T0 + 2, prompt=None)  # recorded with "metadata"
    for run in (sky, sea, private):
        store.add_run(run)
    store.finish_run(sea.id, status="ok", answer="Blue, mostly: it-reflects the sky.", error=None,
                     seconds=1.0)  # fmt: skip
    store.finish_run(private.id, status="ok", answer=None, error=None, seconds=1.0)

    def ids(query: str) -> list[str]:
        return [r.id for r in store.list_runs(query=query)]

    assert ids("sky") == [sea.id, sky.id]  # the answer of one, the prompt of the other
    assert ids("blue sky") == [sea.id, sky.id]  # every word, any order
    assert ids("sea colour") == [sea.id]
    assert ids("it-reflects") == [sea.id]  # a dash is text, not query syntax
    assert ids("sky OR") == []  # nor is an operator
    if fts:
        assert ids('sky"') == [sea.id, sky.id]  # nor a stray quote
    assert ids("nothing") == []
    store.finish_run(sea.id, status="ok", answer="Green.", error=None, seconds=1.0)
    assert ids("mostly") == []  # an answer replaced is no longer found
    assert ids("green") == [sea.id]


def test_another_process_sees_each_row_once_it_is_written() -> None:
    store = opened()
    run = make_run()
    store.add_run(run)
    store.add_call(run.id, make_call())  # still open here: no close, no checkpoint
    reader = textwrap.dedent(
        f"""
        from localmoa.records.store import Store
        store = Store.open(create=False)
        detail = store.run("{run.id[:20]}")
        print(detail.status, len(detail.calls), detail.calls[0].text)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", reader], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.split() == ["running", "1", "x"]
