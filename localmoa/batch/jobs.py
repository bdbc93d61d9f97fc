"""A batch's input (prompts, one JSON line each) and its output (answers, one JSON line each).

**Input.** Each line of IN is ``{"id": ..., "prompt": "..."}`` or ``{"id": ..., "messages":
[...]}``; blank lines are skipped. :func:`read_jobs` reads the whole file before anything loads
and reports every bad line at once (the first :data:`MAX_PROBLEMS`, then how many more), each by
its line number, so a user fixes the file in one pass instead of one model load per mistake.

- ``prompt`` is one user message; ``messages`` is a conversation in the OpenAI chat shape that
  ends with the user turn the ensemble answers. A line gives one or the other, never both.
- An id is a string or an integer; an integer is kept as its decimal digits (``7`` is ``"7"``),
  because ids are strings in OUT and in the run log. So ``7`` and ``"7"`` on two lines are a
  duplicate. An empty id, ``true`` or ``1.5`` is refused.
- Unknown keys are refused rather than ignored, on a line and in a message: a key we dropped
  silently (``"system"``, ``"name"``) would change what the user asked without a word.
- Lines are split on ``\\n`` only (``\\r\\n`` works too): JSON strings may hold U+2028 and other
  characters that Python's ``str.splitlines`` would treat as line ends.

**Output.** :class:`Results` is OUT: one :class:`BatchResult` line per prompt, appended as each
chunk of prompts finishes. Running the same batch again skips the ids already in OUT
(:meth:`Results.done_ids`, :func:`pending`) — failed ones too, since their line is there: to
retry failures, delete their lines (``grep -v '"ok":false' OUT``) and run again. Two guarantees:

1. *Never a partial line that a later run keeps, never an id twice.* A chunk's lines are encoded
   whole and appended with one ``os.write`` (looped only if the kernel writes short), then
   fsynced. A crash (SIGKILL, power loss) can therefore cut only the *end* of the file, inside
   the chunk being written: what it leaves is complete lines of that chunk plus at most one torn
   line with no newline. Opening OUT checks exactly that: a last line without its newline, or
   one that is not JSON, is cut away (logged in one line), and its prompt runs again; a bad line
   anywhere else is not ours to touch and is refused. An exception inside the write itself
   (Ctrl-C, disk full) truncates the file back to where the chunk began before it propagates,
   so the repair on open is needed only when the process could not run any code at all.

   Why not a temporary file renamed into place, the usual atomic write? POSIX renames replace a
   whole file; there is no atomic *append*. Renaming would mean copying all of OUT for every
   chunk (quadratic in the batch), and the copy itself could be interrupted. One append of
   complete lines plus a check on open gives the same guarantee at the cost of one write.
2. *Ctrl-C between chunks loses nothing; within a chunk, at most that chunk.* Each chunk is
   fsynced before the next starts, so what the progress bar counted as written survives even a
   power loss, not just a killed process.

Only one process writes an OUT at a time: :class:`Results` holds an exclusive ``flock`` on it for
as long as it is open (released by the kernel if the process dies), so two runs of one batch
cannot both answer a prompt.

OUT is created 0600 — owner read/write only — in whatever folder the user chose, because it holds
the answers, which quote and summarize the prompts (often private documents). An OUT that
already exists keeps its mode: the user made it, and may have shared it on purpose.
"""

from __future__ import annotations

import codecs
import contextlib
import fcntl
import json
import logging
import os
import stat
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final, NoReturn

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from localmoa.backends.base import ChatMessage
from localmoa.errors import UserError

__all__ = [
    "MAX_PROBLEMS",
    "BatchResult",
    "BatchSummary",
    "Job",
    "Results",
    "chunks",
    "pending",
    "read_jobs",
]

log = logging.getLogger(__name__)

MAX_PROBLEMS: Final = 20
"""Bad input lines named one by one in the error; beyond these, only their count."""

_LINE_SHAPE = '{"id": ..., "prompt": "..."} or {"id": ..., "messages": [...]}'
_ROLES = ("system", "user", "assistant")
_ROLE_NAMES = '"system", "user" or "assistant"'


class Job(BaseModel):
    """One prompt of a batch: an id and the conversation to answer."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, description="unique within the input; an integer id as digits")
    messages: list[ChatMessage] = Field(
        min_length=1,
        description='the conversation; "prompt" is one user message; it ends with a user turn',
    )

    @model_validator(mode="after")
    def _ends_with_a_user_turn(self) -> Job:
        problem = _conversation_problem(self.messages)
        if problem is not None:
            raise ValueError(problem)
        return self


class BatchResult(BaseModel):
    """One line of OUT: the answer to one prompt, or why there is none."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="the prompt's id, as a string")
    answer: str | None = Field(description="the ensemble's answer; null when it failed")
    ok: bool = Field(description="true when answered")
    error: str | None = Field(description="why it failed; null when ok")
    seconds: float = Field(ge=0, description="wall-clock seconds this prompt's answer took")
    run_id: str | None = Field(description="its run in the run log; null when not recorded")

    @model_validator(mode="after")
    def _answer_or_error(self) -> BatchResult:
        if self.ok and (self.answer is None or self.error is not None):
            raise ValueError("an ok result has an answer and no error")
        if not self.ok and (self.answer is not None or self.error is None):
            raise ValueError("a failed result has an error and no answer")
        return self


class BatchSummary(BaseModel):
    """``localmoa batch --json``: what the run did. ``prompts`` − ``skipped`` − ``answered`` −
    ``failed`` prompts were not reached (the run was stopped)."""

    model_config = ConfigDict(extra="forbid")

    prompts: int = Field(description="prompts in the input file")
    answered: int = Field(description="answered by this run")
    skipped: int = Field(description="already in the output file (a resumed run), not run again")
    failed: int = Field(description="failed in this run (their lines in OUT say why)")
    loads: int = Field(description="model loads this run made")
    seconds: float = Field(description="wall-clock seconds of this run")


# --- input -----------------------------------------------------------------------------------


def read_jobs(path: Path | str) -> list[Job]:
    """The prompts of JSONL file ``path``, in file order.

    Raises one UserError naming the file and every bad line by number (see the module
    docstring), so it is called before anything loads.
    """
    path = Path(path)
    jobs: list[Job] = []
    first_line: dict[str, tuple[int, bool]] = {}  # id: its line, and whether it was an int
    problems = _Problems(path)
    offset = 0  # of the current line in the file, for the byte offset of bad UTF-8
    try:
        with path.open("rb") as file:
            for number, raw in enumerate(file, start=1):
                start, offset = offset, offset + len(raw)
                if number == 1 and raw.startswith(codecs.BOM_UTF8):  # Windows editors add one
                    raw, start = raw[len(codecs.BOM_UTF8) :], start + len(codecs.BOM_UTF8)
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    problems.add(
                        number,
                        f"not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {start + exc.start})",
                        hint="convert the file first, e.g. iconv -f latin1 -t utf-8",
                    )
                    continue
                if not text.strip():
                    continue
                try:
                    job, id_was_int = _job(text.rstrip())  # a column past the line's end
                except _LineProblem as problem:
                    problems.add(number, str(problem))
                    continue
                if job.id in first_line:
                    first, first_was_int = first_line[job.id]
                    digits = (
                        " (an integer id is read as its digits)"
                        if id_was_int or first_was_int
                        else ""
                    )
                    problems.add(
                        number,
                        f'the id "{job.id}" is already on line {first}{digits}; ids must be unique',
                    )
                    continue
                first_line[job.id] = number, id_was_int
                jobs.append(job)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    problems.raise_if_any()
    if not jobs:
        raise UserError(
            f"{path} has no prompts (it is empty, or only blank lines); each line is {_LINE_SHAPE}"
        )
    return jobs


class _LineProblem(Exception):
    """What is wrong with one line, said without its line number."""


class _Problems:
    """Collects the bad lines of one file into one error."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[tuple[int, str]] = []
        self.hints: dict[str, None] = {}  # ordered, without repeats

    def add(self, number: int, text: str, hint: str | None = None) -> None:
        self.lines.append((number, text))
        if hint is not None:
            self.hints[hint] = None

    def raise_if_any(self) -> None:
        if not self.lines:
            return
        hints = "".join(f"; {hint}" for hint in self.hints)
        if len(self.lines) == 1:
            ((number, text),) = self.lines
            raise UserError(f"{self.path} line {number}: {text}{hints}")
        shown = [f"  line {number}: {text}" for number, text in self.lines[:MAX_PROBLEMS]]
        if len(self.lines) > MAX_PROBLEMS:
            shown.append(f"  and {len(self.lines) - MAX_PROBLEMS} more")
        raise UserError(
            f"{self.path} has {len(self.lines)} bad lines; nothing was run:\n"
            + "\n".join(shown)
            + f"\nfix them and run again{hints}"
        )


def _job(text: str) -> tuple[Job, bool]:
    """The job on one non-blank line, and whether its id was an integer; _LineProblem if bad."""
    try:
        value = json.loads(text, object_pairs_hook=_no_repeated_keys)
    except json.JSONDecodeError as exc:
        raise _LineProblem(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise _LineProblem("not valid JSON here (nested too deeply)") from None
    if not isinstance(value, dict):
        raise _LineProblem(f"is {_json_type(value)}, not an object like {_LINE_SHAPE}")
    unknown = sorted(set(value) - {"id", "prompt", "messages"})
    if unknown:
        keys = ", ".join(f'"{key}"' for key in unknown)
        raise _LineProblem(
            f"unknown key{'s' if len(unknown) > 1 else ''} {keys}; a line has "
            '"id" and either "prompt" or "messages"'
        )
    if "id" not in value:
        raise _LineProblem('has no "id"')
    job_id, id_was_int = _id(value["id"])
    if "prompt" in value and "messages" in value:
        raise _LineProblem('has both "prompt" and "messages"; give one')
    if "prompt" in value:
        messages = [_prompt(value["prompt"])]
    elif "messages" in value:
        messages = _messages(value["messages"])
    else:
        raise _LineProblem(f'has no "prompt" (or "messages"); a line is {_LINE_SHAPE}')
    return Job(id=job_id, messages=messages), id_was_int


def _no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads keeps the last of two equal keys; a line saying "prompt" twice is refused."""
    value: dict[str, Any] = {}
    for key, item in pairs:
        if key in value:
            raise _LineProblem(f'the key "{key}" appears twice')
        value[key] = item
    return value


def _id(value: Any) -> tuple[str, bool]:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _LineProblem(f'the "id" must be a string or an integer, not {_json_type(value)}')
    if isinstance(value, int):
        return str(value), True
    if not value.strip():
        raise _LineProblem('the "id" is empty')
    return value, False


def _prompt(value: Any) -> ChatMessage:
    if not isinstance(value, str):
        raise _LineProblem(f'the "prompt" must be a string, not {_json_type(value)}')
    if not value.strip():
        raise _LineProblem("the prompt is empty")
    return ChatMessage(role="user", content=value)


def _messages(value: Any) -> list[ChatMessage]:
    if not isinstance(value, list):
        raise _LineProblem(
            '"messages" must be an array of {"role": ..., "content": ...} objects, '
            f"not {_json_type(value)}"
        )
    messages = []
    for i, item in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(item, dict):
            raise _LineProblem(f"{where} is {_json_type(item)}, not an object")
        unknown = sorted(set(item) - {"role", "content"})
        if unknown:
            keys = ", ".join(f'"{key}"' for key in unknown)
            raise _LineProblem(f'{where} has unknown {keys}; a message has "role" and "content"')
        for key in ("role", "content"):
            if key not in item:
                raise _LineProblem(f'{where} has no "{key}"')
        role, content = item["role"], item["content"]
        if role not in _ROLES:
            shown = f'"{role}"' if isinstance(role, str) else _json_type(role)
            raise _LineProblem(
                f'{where}.role is {shown}; a role is "system", "user" or "assistant"'
            )
        if not isinstance(content, str):
            raise _LineProblem(f"{where}.content must be a string, not {_json_type(content)}")
        messages.append(ChatMessage(role=role, content=content))
    problem = _conversation_problem(messages)
    if problem is not None:
        raise _LineProblem(problem)
    return messages


def _conversation_problem(messages: Sequence[ChatMessage]) -> str | None:
    """Why ``messages`` cannot be answered, or None: the ensemble answers the last user turn."""
    if not messages:
        return '"messages" is empty'
    last = messages[-1]
    if last.role != "user":
        return f'the last message is the {last.role}\'s; "messages" must end with a user turn'
    if not last.content.strip():
        return "the last user message is empty"
    return None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


# --- planning the work ----------------------------------------------------------------------


def pending(jobs: Iterable[Job], done_ids: Collection[str]) -> list[Job]:
    """The jobs still to answer, in input order: those whose id is not in ``done_ids``."""
    return [job for job in jobs if job.id not in done_ids]


def chunks(jobs: Sequence[Job], size: int) -> list[list[Job]]:
    """``jobs`` cut into runs of ``size`` (the last may be shorter), in order. A chunk is
    planned together and written to OUT when it finishes, so it is also what a crash can lose."""
    if size < 1:
        raise ValueError(f"a chunk holds at least one prompt, not {size}")
    return [list(jobs[i : i + size]) for i in range(0, len(jobs), size)]


# --- output ----------------------------------------------------------------------------------


class Results:
    """OUT, open for appending: the ids it holds, and the lines this run adds.

    Opening checks every line, cuts away a torn last line, and takes an exclusive lock (see the
    module docstring); use it as a context manager, or call :meth:`close`.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.truncated_bytes = 0
        """Bytes of a torn last line cut away on open (0 when OUT was whole)."""
        self._ids: set[str] = set()
        self._fd = _open_locked(self.path)
        try:
            end = self._read()
            size = os.fstat(self._fd).st_size
            if end < size:
                os.ftruncate(self._fd, end)
                os.fsync(self._fd)
                self.truncated_bytes = size - end
                log.warning(
                    "%s: removed its last line, cut short when a run stopped mid-write "
                    "(%d bytes); that prompt runs again",
                    self.path,
                    size - end,
                )
        except OSError as exc:  # the read or the cut failing (EIO, a read-only file system)
            self.close()
            raise _write_error(self.path, "cannot be read and repaired", exc) from None
        except BaseException:
            self.close()
            raise

    def done_ids(self) -> frozenset[str]:
        """The ids OUT holds a line for, answered or failed: a resumed run skips them."""
        return frozenset(self._ids)

    def write(self, result: BatchResult) -> None:
        """Append one prompt's line (durable when this returns)."""
        self.write_chunk([result])

    def write_chunk(self, results: Sequence[BatchResult]) -> None:
        """Append a chunk's lines in one write, fsynced: when this returns they survive a crash;
        if it raises (Ctrl-C, disk full), none of them is in OUT.

        An id already in OUT, or twice in ``results``, is a ValueError before anything is
        written: each id is in OUT at most once.
        """
        ids = [result.id for result in results]
        again = sorted({i for i, n in Counter(ids).items() if i in self._ids or n > 1})
        if again:
            raise ValueError(f"{self.path} would hold these ids twice: {again}")
        if not results:
            return
        data = "".join(result.model_dump_json() + "\n" for result in results).encode()
        start = os.fstat(self._fd).st_size  # ours alone: we hold the lock
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            os.fsync(self._fd)
        except BaseException as exc:
            # Leave OUT as it was before this chunk: no line of it, so none torn. If even
            # this fails, the repair on the next open cuts what was written.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, start)
            if isinstance(exc, OSError):
                raise _write_error(self.path, "cannot be written", exc) from None
            raise
        self._ids.update(ids)

    def close(self) -> None:
        """Release OUT (and its lock)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Results:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _read(self) -> int:
        """Read OUT's ids; return where its good part ends (its size, unless the last line is
        torn). A bad line that a crash cannot have made is a UserError; nothing is changed."""
        good_end = 0  # the offset after the last line kept
        torn: int | None = None  # line number of a bad complete line, kept only if it is last
        offset = 0
        with open(self._fd, "rb", closefd=False) as file:
            file.seek(0)
            for number, raw in enumerate(file, start=1):
                offset += len(raw)
                if torn is not None:  # a bad line with more after it: not a crash's doing
                    self._refuse(torn, "is not valid JSON")
                complete = raw.endswith(b"\n")
                if not raw.strip():
                    if complete:
                        good_end = offset
                    continue
                try:
                    value = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                    if complete:
                        torn = number
                    continue  # the file has no more lines when not complete
                try:
                    result = BatchResult.model_validate(value)
                except ValidationError as exc:
                    self._refuse(number, f"is not a batch result ({_first_error(exc)})")
                if complete:
                    self._ids.add(result.id)
                    good_end = offset
        return good_end

    def _refuse(self, number: int, problem: str) -> NoReturn:
        self.close()
        raise UserError(
            f"{self.path} line {number} {problem}: that file is not the output of localmoa "
            "batch, or was edited; give another -o, or fix or delete that line"
        )


def _open_locked(path: Path) -> int:
    """OUT's descriptor for appending, created 0600 if new, exclusively locked."""
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}: the folder {path.parent} does not exist")
    flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
    try:
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            fd = os.open(path, flags)
        else:  # a new name in the folder: make the name itself survive a power loss
            _fsync_folder(path.parent)
    except OSError as exc:
        raise _write_error(path, "cannot be opened", exc) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UserError(
                f"{path} is not a regular file; the output must be one, since a resumed batch "
                "reads it back"
            )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"{path} is being written by another localmoa batch; wait for it to end, "
                "or give another -o"
            ) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - a folder we may write but not open: durability only
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def _write_error(path: Path, what: str, exc: OSError) -> UserError:
    return UserError(f"{path} {what}: {exc.strerror or exc}")


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {error['msg']}" if where else str(error["msg"])
