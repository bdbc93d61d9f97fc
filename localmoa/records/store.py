"""The run log's file: one SQLite database, ``logs.db``, read by ``localmoa logs``.

Where: ``$LOCALMOA_HOME/logs.db`` when LOCALMOA_HOME is set, else the platform's user data
directory (platformdirs: ``~/.local/share/localmoa`` on Linux, ``~/Library/Application
Support/localmoa`` on macOS). ``localmoa logs path`` prints it.

**Why the standard library's sqlite3.** It adds no dependency, and the SQLite it links has what
the log needs built in: WAL (a ``localmoa logs`` or a second ``localmoa run`` reads while a run
writes), a busy timeout (two processes that write at once take turns), and FTS5 (``logs -q``).
sqlite-utils, which simonw/llm uses, would add a dependency for conveniences (upserts, table
introspection) this handful of fixed statements does not need.

**Why the schema is shaped so.** A run is one row of ``runs`` (one ``localmoa run``, one
``serve`` request, one ``chat`` turn); what it was asked with (the ensemble's config, the plan,
the budget, a snapshot of the device and the versions) is kept as JSON beside it, because those
shapes change with localmoa and are read whole, never queried by field. What is queried is a
column: status, ensemble, the start time, a call's model. Each call of the run is one row of
``calls`` and each model load one row of ``loads``, each written when it ends: a crash loses at
most the call in flight, and ``logs show`` of a run that is still going shows what is done. The
texts (``prompt``, ``answer``, ``conversation_json``, a call's ``messages_json`` and ``text``) are
columns of their own so that ``record = "metadata"`` simply leaves them NULL: no prompt, message
or answer text is then anywhere in the file (the FTS index included, which only ever indexes
those columns).

Where a call or a load ran is two columns of its row: ``device`` (the plan's name for it,
"gpu1" or "nodeA/gpu0") and ``node`` (the Ray node; NULL on this machine). Columns, not JSON,
because they are queried: a run in the list gathers its distinct ones as ``devices`` and
``nodes``. Both are NULL where the plan placed nothing (a backend that places models itself,
like Ollama) and in rows written before migration 3.

- **Ids** are ULIDs (26 characters of Crockford base32: 48 bits of milliseconds, then 80 random
  bits, see :func:`new_id`): sortable by time as text, unique across processes without a counter
  in the file, and a unique prefix of one is enough for ``logs show``. Within one process, ids
  of the same millisecond still increase (the random part is incremented), so the order of
  ``logs`` is the order runs started.
- **Times** are unix seconds (``started_at``, a call's ``queued_at`` … ``ended_at``, a load's
  ``started_at`` and ``unloaded_at``), which a timeline subtracts, plus the run's ``started`` as
  ISO 8601 UTC for people.
- **Migrations** are numbered (:data:`MIGRATIONS`), each applied once, in order, in a transaction
  of its own, and noted in ``_migrations(id, name, applied_at)``: the simonw/llm pattern
  (llm/migrations.py). Opening a database that is up to date only reads. A migration that cannot
  apply on this SQLite (FTS5 left out of its build) is left for a later open; meanwhile ``-q``
  falls back to ``LIKE`` over the same two columns (substrings instead of words).
- **The search index** ``runs_fts`` is an FTS5 table over ``runs.prompt`` and ``runs.answer``
  with ``runs`` as its external content, so the texts are stored once. The store's own writes
  keep it in step (a run's row is indexed when it starts and again when its answer comes); no
  trigger is needed, as nothing else writes the file.

**Durability and speed.** WAL with ``synchronous = NORMAL``: a commit is on disk for every other
process at once and survives a crash of localmoa; only a power cut may lose the last commits
(SQLite's documented trade for WAL/NORMAL), and no commit waits for an fsync. Each write is its
own short transaction. A write then takes about a tenth of a millisecond (see the recorder's
docstring for the measurement), so the recorder writes synchronously, from the thread that runs
the engine. ``busy_timeout`` is :data:`BUSY_SECONDS`: long enough for other localmoa processes'
writes, which last microseconds; a lock held longer than that is a fault (the recorder's to
report).

**Permissions.** The directory is created 0700 and the file 0600 (SQLite gives the ``-wal`` and
``-shm`` files the database's own mode). A file found with a looser mode is tightened to 0600,
as only localmoa writes it and a looser mode is an accident (a copy made under a permissive
umask). An existing directory is left as it is: LOCALMOA_HOME may be any folder a user chose,
and also holds models.toml and the caches; the file's own mode is what keeps others out.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import platformdirs
from pydantic import BaseModel

from localmoa.backends.base import ChatMessage
from localmoa.errors import StoreError, UserError
from localmoa.records.models import LoggedCall, LoggedLoad, LoggedRun, RunDetail

__all__ = [
    "BUSY_SECONDS",
    "MIGRATIONS",
    "Migration",
    "Store",
    "StoreError",
    "iso_utc",
    "log_path",
    "new_id",
]

log = logging.getLogger(__name__)

FILE_NAME = "logs.db"
BUSY_SECONDS = 1.0
"""How long a write waits for another connection's lock before it is a fault."""

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_ID_LENGTH = 26


def log_path() -> Path:
    """Where the run log is: ``$LOCALMOA_HOME/logs.db``, else the user data dir's."""
    home = os.environ.get("LOCALMOA_HOME")
    folder = Path(home) if home else Path(platformdirs.user_data_dir("localmoa"))
    return folder / FILE_NAME


_last_id: list[int] = [0]
_id_lock = threading.Lock()


def new_id(now: float | None = None) -> str:
    """A ULID: 48 bits of unix milliseconds, then 80 random bits, in Crockford base32.

    Within one process ids increase strictly, even within one millisecond (the 128-bit value is
    then the last one plus 1), so they sort in the order they were made.

    >>> len(new_id()), new_id(0)[:10]
    (26, '0000000000')
    """
    millis = int((time.time() if now is None else now) * 1000) & ((1 << 48) - 1)
    with _id_lock:
        value = (millis << 80) | secrets.randbits(80)
        if value <= _last_id[0] and millis == _last_id[0] >> 80:
            value = _last_id[0] + 1
        _last_id[0] = value
    chars = []
    for _ in range(_ID_LENGTH):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def iso_utc(unix: float) -> str:
    """``unix`` as ISO 8601 UTC to the millisecond, e.g. ``2025-01-31T09:15:02.123Z``."""
    moment = datetime.fromtimestamp(unix, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- migrations ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    """One numbered step of the schema. ``apply`` returns False when it cannot apply on this
    SQLite (then it is not noted as applied, and is tried again at the next open)."""

    id: int
    name: str
    apply: Callable[[sqlite3.Connection], bool]


MIGRATIONS: list[Migration] = []
"""Every migration, in the order they apply; append new ones, never edit an old one."""


def _migration(number: int, name: str) -> Callable[[Callable[[sqlite3.Connection], bool]], None]:
    def register(apply: Callable[[sqlite3.Connection], bool]) -> None:
        assert number == len(MIGRATIONS) + 1, "migrations are numbered 1, 2, 3 … in order"
        MIGRATIONS.append(Migration(number, name, apply))

    return register


@_migration(1, "runs, calls and loads")
def _m001(db: sqlite3.Connection) -> bool:
    db.execute(
        """CREATE TABLE runs (
            id TEXT PRIMARY KEY, source TEXT NOT NULL, chat_id TEXT, ensemble TEXT NOT NULL,
            config_json TEXT NOT NULL, plan_json TEXT, budget_bytes INTEGER, budget_source TEXT,
            device_json TEXT, versions_json TEXT NOT NULL, conversation_json TEXT, prompt TEXT,
            answer TEXT, status TEXT NOT NULL, error TEXT, started TEXT NOT NULL,
            started_at REAL NOT NULL, seconds REAL
        )"""
    )
    db.execute(
        """CREATE TABLE calls (
            id INTEGER PRIMARY KEY, run_id TEXT NOT NULL REFERENCES runs (id),
            layer INTEGER NOT NULL, "index" INTEGER NOT NULL, role TEXT NOT NULL,
            model TEXT NOT NULL, backend TEXT NOT NULL, ok INTEGER NOT NULL, error TEXT,
            tokens_in INTEGER NOT NULL, tokens_out INTEGER NOT NULL, ttft_s REAL,
            prefill_tok_s REAL, decode_tok_s REAL, seconds REAL NOT NULL, queued_at REAL,
            started_at REAL, first_token_at REAL, ended_at REAL, references_json TEXT NOT NULL,
            truncated INTEGER NOT NULL, selected_json TEXT, stop INTEGER, parsed INTEGER,
            messages_json TEXT, text TEXT
        )"""
    )
    db.execute(
        """CREATE TABLE loads (
            id INTEGER PRIMARY KEY, run_id TEXT NOT NULL REFERENCES runs (id),
            model TEXT NOT NULL, started_at REAL NOT NULL, seconds REAL NOT NULL,
            bytes_estimated INTEGER, bytes_measured INTEGER, bytes_peak INTEGER, unloaded_at REAL
        )"""
    )
    for index in (
        "runs_started_at ON runs (started_at)",
        "runs_chat ON runs (chat_id)",
        "calls_run ON calls (run_id)",
        "calls_model ON calls (model)",
        "loads_run ON loads (run_id)",
        "loads_model ON loads (model)",
    ):
        db.execute(f"CREATE INDEX {index}")
    return True


@_migration(2, "full-text search over prompts and answers")
def _m002(db: sqlite3.Connection) -> bool:
    try:
        db.execute(
            "CREATE VIRTUAL TABLE runs_fts USING fts5 "
            "(prompt, answer, content='runs', content_rowid='rowid')"
        )
    except sqlite3.OperationalError as exc:
        if "fts5" not in str(exc):
            raise
        log.debug("this SQLite has no FTS5: logs -q uses LIKE (%s)", exc)
        return False
    db.execute("INSERT INTO runs_fts (runs_fts) VALUES ('rebuild')")  # runs logged before it
    return True


@_migration(3, "where calls and loads ran: device and node")
def _m003(db: sqlite3.Connection) -> bool:
    for table in ("calls", "loads"):
        for column in ("device", "node"):
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} TEXT")
    return True


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE … COMMIT: the write lock is taken at once, so a busy database waits (up
    to the busy timeout) at BEGIN rather than failing halfway."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _migrate(db: sqlite3.Connection) -> None:
    """Apply the migrations not applied yet; with none missing, this only reads."""
    exists = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_migrations'"
    ).fetchone()
    applied: set[int] = set()
    if exists:
        applied = {row[0] for row in db.execute("SELECT id FROM _migrations")}
    for migration in MIGRATIONS:
        if migration.id in applied:
            continue
        with _transaction(db):
            db.execute(
                "CREATE TABLE IF NOT EXISTS _migrations "
                "(id INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
            )
            done = db.execute("SELECT 1 FROM _migrations WHERE id = ?", (migration.id,))
            if done.fetchone():  # another process applied it while we looked
                continue
            if migration.apply(db):
                db.execute(
                    "INSERT INTO _migrations (id, name, applied_at) VALUES (?, ?, ?)",
                    (migration.id, migration.name, iso_utc(time.time())),
                )


# --- the store -------------------------------------------------------------------------------

_RUN_JSON = frozenset({"config", "plan", "device", "versions", "conversation"})
_CALL_JSON = frozenset({"references", "selected", "messages"})
"""Fields of a run's and of a call's model kept as JSON text, in a column named FIELD_json
(a load has none). Per table, as a name may mean JSON in one and a plain column in another: a
run's ``device`` is its device snapshot, a call's is the name of the device it ran on."""


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False)


def _columns(
    model: BaseModel, as_json: frozenset[str] = frozenset(), exclude: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """A record model as its row's columns: every field, those in ``as_json`` as JSON text."""
    data = model.model_dump(mode="json", exclude=set(exclude))
    return {
        (f"{k}_json" if k in as_json else k): (_dumps(v) if k in as_json else v)
        for k, v in data.items()
    }


def _fields(row: sqlite3.Row, exclude: frozenset[str] = frozenset()) -> dict[str, Any]:
    """A row as the record model's fields (the inverse of :func:`_columns`)."""
    out = {}
    for key in row.keys():  # noqa: SIM118 (a Row iterates over its values)
        if key in exclude:
            continue
        if key.endswith("_json"):
            out[key.removesuffix("_json")] = None if row[key] is None else json.loads(row[key])
        else:
            out[key] = row[key]
    return out


def _insert(db: sqlite3.Connection, table: str, columns: dict[str, Any]) -> int:
    names = ", ".join(f'"{name}"' for name in columns)
    marks = ", ".join("?" for _ in columns)
    cursor = db.execute(f"INSERT INTO {table} ({names}) VALUES ({marks})", list(columns.values()))
    assert cursor.lastrowid is not None
    return cursor.lastrowid


def _last_user_message(conversation: Sequence[ChatMessage] | None) -> str | None:
    for message in reversed(conversation or []):
        if message.role == "user":
            return message.content
    return None


def _fts_query(text: str) -> str:
    """Each word of ``text`` as an FTS5 phrase, so that quotes, dashes and colons in what a
    user types are words, not query syntax; every word must occur (any order)."""
    return " ".join('"' + word.replace('"', '""') + '"' for word in text.split())


def _like(word: str) -> str:
    return "%" + word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


_RUN_LIST = """
    SELECT r.id, r.status, r.source, r.chat_id, r.ensemble, r.started, r.seconds,
        (SELECT COUNT(*) FROM calls c WHERE c.run_id = r.id) AS calls,
        (SELECT COUNT(*) FROM loads l WHERE l.run_id = r.id) AS loads,
        r.prompt, r.answer, r.error
    FROM runs r
"""
_PLACES = """
    SELECT run_id, device, node FROM calls
    WHERE run_id IN ({ids}) AND (device IS NOT NULL OR node IS NOT NULL)
    UNION
    SELECT run_id, device, node FROM loads
    WHERE run_id IN ({ids}) AND (device IS NOT NULL OR node IS NOT NULL)
"""
_PLACES_AT_ONCE = 400
"""Runs whose places one query reads (SQLite allows 32,766 parameters; each id is used twice)."""
_RUN_ONLY = frozenset({"prompt", "started_at"})
"""Columns of ``runs`` that RunDetail does not have (for lists and search, and the sort)."""
_ROW_IDS = frozenset({"id", "run_id"})


class Store:
    """The open run log. Safe to share between threads (one connection behind a lock); every
    write is its own transaction. Errors of SQLite and of the file system become
    :class:`StoreError`, naming the file."""

    def __init__(self, path: Path, db: sqlite3.Connection) -> None:
        self.path = path
        self._db = db
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        self.fts = bool(
            db.execute("SELECT 1 FROM sqlite_master WHERE name = 'runs_fts'").fetchone()
        )
        """True when ``runs_fts`` exists (this SQLite has FTS5); else ``-q`` uses LIKE."""

    @classmethod
    def open(cls, path: Path | None = None, *, create: bool = True) -> Store | None:
        """Open (creating with ``create``) the log at ``path`` (default :func:`log_path`) and
        bring its schema up to date; None when it does not exist and ``create`` is False."""
        path = path or log_path()
        try:
            if not path.exists():
                if not create:
                    return None
                _create(path)
            else:
                _tighten(path)
            db = sqlite3.connect(
                path, timeout=BUSY_SECONDS, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(_problem(path, "cannot be opened", exc)) from None
        try:
            db.execute(f"PRAGMA busy_timeout = {int(BUSY_SECONDS * 1000)}")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            _migrate(db)
            return cls(path, db)
        except sqlite3.Error as exc:
            db.close()
            raise StoreError(_problem(path, "cannot be opened", exc)) from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _using(self, what: str, *, write: bool) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                if write:
                    with _transaction(self._db):
                        yield self._db
                else:
                    yield self._db
            except sqlite3.Error as exc:
                raise StoreError(_problem(self.path, what, exc)) from None

    # --- writes (the recorder's) ---------------------------------------------------------------

    def add_run(self, run: RunDetail) -> None:
        """Write a run's row as it starts (its calls and loads come with their own writes)."""
        columns = _columns(run, _RUN_JSON, exclude=frozenset({"calls", "loads"}))
        prompt = columns["prompt"] = _last_user_message(run.conversation)
        columns["started_at"] = datetime.fromisoformat(run.started).timestamp()
        with self._using("cannot be written", write=True) as db:
            rowid = _insert(db, "runs", columns)
            if self.fts and (prompt is not None or run.answer is not None):
                db.execute(
                    "INSERT INTO runs_fts (rowid, prompt, answer) VALUES (?, ?, ?)",
                    (rowid, prompt, run.answer),
                )

    def add_call(self, run_id: str, call: LoggedCall) -> None:
        """Write one call of ``run_id`` as it ends."""
        with self._using("cannot be written", write=True) as db:
            _insert(db, "calls", {"run_id": run_id, **_columns(call, _CALL_JSON)})

    def add_load(self, run_id: str, load: LoggedLoad) -> int:
        """Write one load of ``run_id`` as it ends; returns its row's id (for the unload)."""
        with self._using("cannot be written", write=True) as db:
            return _insert(db, "loads", {"run_id": run_id, **_columns(load)})

    def set_unloaded(self, load_id: int, at: float) -> None:
        """The load ``load_id`` (from :meth:`add_load`) ended at ``at`` (unix seconds)."""
        with self._using("cannot be written", write=True) as db:
            db.execute("UPDATE loads SET unloaded_at = ? WHERE id = ?", (at, load_id))

    def finish_run(
        self,
        run_id: str,
        *,
        status: str,
        answer: str | None,
        error: str | None,
        seconds: float | None,
    ) -> None:
        """Close a run's row: its status, answer, error and wall-clock seconds."""
        with self._using("cannot be written", write=True) as db:
            row = db.execute(
                "SELECT rowid, prompt, answer FROM runs WHERE id = ?", (run_id,)
            ).fetchone()
            if row is None:
                return
            rowid, prompt, old_answer = row
            db.execute(
                "UPDATE runs SET status = ?, answer = ?, error = ?, seconds = ? WHERE id = ?",
                (status, answer, error, seconds, run_id),
            )
            if not self.fts:
                return
            if prompt is not None or old_answer is not None:  # un-index the old texts first
                db.execute(
                    "INSERT INTO runs_fts (runs_fts, rowid, prompt, answer) "
                    "VALUES ('delete', ?, ?, ?)",
                    (rowid, prompt, old_answer),
                )
            if prompt is not None or answer is not None:
                db.execute(
                    "INSERT INTO runs_fts (rowid, prompt, answer) VALUES (?, ?, ?)",
                    (rowid, prompt, answer),
                )

    # --- reads -----------------------------------------------------------------------------------

    def list_runs(
        self,
        n: int = 20,
        *,
        ensemble: str | None = None,
        model: str | None = None,
        status: str | None = None,
        since: float | None = None,
        query: str | None = None,
    ) -> list[LoggedRun]:
        """The latest ``n`` runs, newest first, that match every filter given: the ensemble,
        a model that one of its calls or loads used, the status, a start at or after ``since``
        (unix seconds), and every word of ``query`` in its prompt or answer."""
        where: list[str] = []
        args: list[Any] = []
        if ensemble is not None:
            where.append("r.ensemble = ?")
            args.append(ensemble)
        if model is not None:
            where.append(
                "(EXISTS (SELECT 1 FROM calls c WHERE c.run_id = r.id AND c.model = ?) "
                "OR EXISTS (SELECT 1 FROM loads l WHERE l.run_id = r.id AND l.model = ?))"
            )
            args += [model, model]
        if status is not None:
            where.append("r.status = ?")
            args.append(status)
        if since is not None:
            where.append("r.started_at >= ?")
            args.append(since)
        if query is not None and query.split():
            if self.fts:
                where.append("r.rowid IN (SELECT rowid FROM runs_fts WHERE runs_fts MATCH ?)")
                args.append(_fts_query(query))
            else:
                for word in query.split():
                    where.append("(r.prompt LIKE ? ESCAPE '\\' OR r.answer LIKE ? ESCAPE '\\')")
                    args += [_like(word), _like(word)]
        sql = _RUN_LIST + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY r.started_at DESC, r.id DESC LIMIT ?"
        with self._using("cannot be read", write=False) as db:
            rows = db.execute(sql, [*args, n]).fetchall()
            places = _places(db, [str(row["id"]) for row in rows])
        return [
            LoggedRun.model_validate({**_fields(row), **places.get(row["id"], {})}) for row in rows
        ]

    def resolve(self, prefix: str) -> str:
        """The id of the one run whose id starts with ``prefix`` (any case)."""
        wanted = prefix.strip().upper()
        if not wanted or any(ch not in _CROCKFORD for ch in wanted):
            raise UserError(
                f'"{prefix}" is not a run id (ids are 26 digits and capital letters, like '
                "01J9ZQ4M7X0V6Y9E3T5R2K8H1W); localmoa logs lists the recorded runs"
            )
        with self._using("cannot be read", write=False) as db:
            found = [
                str(row[0])
                for row in db.execute(
                    "SELECT id FROM runs WHERE id GLOB ? ORDER BY id LIMIT 6", (wanted + "*",)
                )
            ]
        if not found:
            raise UserError(
                f'no run "{prefix}" in {self.path}; localmoa logs lists the recorded runs'
            )
        if len(found) > 1:
            shown = ", ".join(found[:5]) + (", …" if len(found) > 5 else "")
            raise UserError(
                f'run id "{prefix}" matches more than one run ({shown}); give more of its '
                "characters"
            )
        return found[0]

    def run(self, run_id: str) -> RunDetail:
        """Everything recorded of one run, by its id or a unique prefix of it."""
        full = self.resolve(run_id)
        with self._using("cannot be read", write=False) as db:
            row = db.execute("SELECT * FROM runs WHERE id = ?", (full,)).fetchone()
            calls = db.execute(
                "SELECT * FROM calls WHERE run_id = ? ORDER BY layer, "
                "CASE role WHEN 'roles' THEN 0 WHEN 'proposer' THEN 1 WHEN 'judge' THEN 2 "
                'ELSE 3 END, "index", id',
                (full,),
            ).fetchall()
            loads = db.execute(
                "SELECT * FROM loads WHERE run_id = ? ORDER BY started_at, id", (full,)
            ).fetchall()
        return RunDetail.model_validate(
            {
                **_fields(row, exclude=_RUN_ONLY),
                "calls": [_fields(call, exclude=_ROW_IDS) for call in calls],
                "loads": [_fields(load, exclude=_ROW_IDS) for load in loads],
            }
        )


def _places(db: sqlite3.Connection, run_ids: Sequence[str]) -> dict[str, dict[str, list[str]]]:
    """Each run's ``devices`` and ``nodes`` (distinct, sorted), from its calls and loads; runs
    that ran on no named place are left out."""
    found: dict[str, tuple[set[str], set[str]]] = {}
    for start in range(0, len(run_ids), _PLACES_AT_ONCE):
        chunk = run_ids[start : start + _PLACES_AT_ONCE]
        marks = ", ".join("?" for _ in chunk)
        for run_id, device, node in db.execute(_PLACES.format(ids=marks), [*chunk, *chunk]):
            devices, nodes = found.setdefault(run_id, (set(), set()))
            if device is not None:
                devices.add(device)
            if node is not None:
                nodes.add(node)
    return {
        run_id: {"devices": sorted(devices), "nodes": sorted(nodes)}
        for run_id, (devices, nodes) in found.items()
    }


def _create(path: Path) -> None:
    """The directory (0700 when made here) and an empty file, 0600 from its first moment."""
    if not path.parent.is_dir():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:  # another process made it just now
        _tighten(path)


def _tighten(path: Path) -> None:
    """A log file readable by others is made 0600 (see the module docstring)."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        try:
            path.chmod(0o600)
        except OSError as exc:  # not ours to change: say so, and go on
            log.warning(
                "the run log %s is readable by others and cannot be made 0600: %s", path, exc
            )


def _problem(path: Path, what: str, exc: BaseException) -> str:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return f"the run log {path} {what}: {reason}"
