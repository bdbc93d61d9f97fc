"""A batch's files: reading IN (every bad line by number, at once), and OUT (resume, a torn last
line cut away, a Ctrl-C or a killed process never leaving a partial or duplicate line, 0600)."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from localmoa.backends.base import ChatMessage
from localmoa.batch.jobs import (
    MAX_PROBLEMS,
    BatchResult,
    BatchSummary,
    Job,
    Results,
    chunks,
    pending,
    read_jobs,
)
from localmoa.errors import UserError


def write_in(tmp_path: Path, *lines: str | bytes, name: str = "in.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(
        b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines)
    )
    return path


def user(text: str) -> ChatMessage:
    return ChatMessage(role="user", content=text)


def answered(job_id: str, answer: str = "yes") -> BatchResult:
    return BatchResult(id=job_id, answer=answer, ok=True, error=None, seconds=1.5, run_id="R1")


def out_lines(path: Path) -> list[dict[str, object]]:
    """OUT's lines, each checked to be one whole JSON line."""
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), "OUT ends inside a line"
    return [json.loads(line) for line in data.decode().split("\n") if line.strip()]


# --- reading IN --------------------------------------------------------------------------------


def test_a_prompt_is_one_user_message_and_messages_are_kept_as_given(tmp_path: Path) -> None:
    conversation = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?"},
    ]
    path = write_in(
        tmp_path,
        json.dumps({"id": "a", "prompt": "why is the sky blue"}),
        "",
        "   ",
        json.dumps({"id": "b", "messages": conversation}),
    )
    assert read_jobs(path) == [
        Job(id="a", messages=[user("why is the sky blue")]),
        Job(id="b", messages=[ChatMessage.model_validate(m) for m in conversation]),
    ]


def test_an_integer_id_is_kept_as_its_digits(tmp_path: Path) -> None:
    path = write_in(tmp_path, '{"id": 7, "prompt": "a"}', '{"id": -12, "prompt": "b"}')
    assert [job.id for job in read_jobs(path)] == ["7", "-12"]


def test_lines_split_on_newline_only_with_crlf_and_a_byte_order_mark(tmp_path: Path) -> None:
    # U+2028 and U+0085 are line ends to str.splitlines, but legal inside a JSON string.
    prompt = "first\u2028second\x85third"
    path = tmp_path / "in.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf"
        + json.dumps({"id": "a", "prompt": prompt}, ensure_ascii=False).encode()
        + b"\r\n"
        + b'{"id": "b", "prompt": "x"}'  # the last line without its newline is still a line
    )
    assert read_jobs(path) == [
        Job(id="a", messages=[user(prompt)]),
        Job(id="b", messages=[user("x")]),
    ]


BAD_LINES = [
    ('{"id": "a", "prompt": "x"', "not valid JSON (Expecting ',' delimiter at column 26)"),
    ("not json", "not valid JSON (Expecting value at column 1)"),
    ('["a", "x"]', 'is an array, not an object like {"id": ..., "prompt": "..."}'),
    ('"just a prompt"', "is a string, not an object"),
    ('{"id": "a"}', 'has no "prompt" (or "messages")'),
    ('{"prompt": "x"}', 'has no "id"'),
    ('{"id": "a", "prompt": "x", "model": "m"}', 'unknown key "model"; a line has "id" and'),
    ('{"id": "a", "prompt": "x", "b": 1, "a": 2}', 'unknown keys "a", "b"'),
    ('{"id": "a", "prompt": "  \\n"}', "the prompt is empty"),
    ('{"id": "a", "prompt": 5}', 'the "prompt" must be a string, not the number 5'),
    ('{"id": "a", "prompt": "x", "prompt": "y"}', 'the key "prompt" appears twice'),
    ('{"id": true, "prompt": "x"}', 'the "id" must be a string or an integer, not true'),
    ('{"id": 1.5, "prompt": "x"}', 'the "id" must be a string or an integer, not the number 1.5'),
    ('{"id": null, "prompt": "x"}', 'the "id" must be a string or an integer, not null'),
    ('{"id": " ", "prompt": "x"}', 'the "id" is empty'),
    (
        '{"id": "a", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}',
        'has both "prompt" and "messages"; give one',
    ),
    ('{"id": "a", "messages": []}', '"messages" is empty'),
    ('{"id": "a", "messages": "hi"}', '"messages" must be an array of'),
    ('{"id": "a", "messages": ["hi"]}', "messages[0] is a string, not an object"),
    (
        '{"id": "a", "messages": [{"role": "user", "content": "x", "name": "n"}]}',
        'messages[0] has unknown "name"; a message has "role" and "content"',
    ),
    ('{"id": "a", "messages": [{"role": "user"}]}', 'messages[0] has no "content"'),
    (
        '{"id": "a", "messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}]}',
        'messages[1].role is "tool"; a role is "system", "user" or "assistant"',
    ),
    (
        '{"id": "a", "messages": [{"role": "user", "content": ["x"]}]}',
        "messages[0].content must be a string, not an array",
    ),
    (
        '{"id": "a", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}',
        'the last message is the assistant\'s; "messages" must end with a user turn',
    ),
    (
        '{"id": "a", "messages": [{"role": "system", "content": "x"}, {"role": "user", "content": ""}]}',
        "the last user message is empty",
    ),
    ("[" * 100_000, "not valid JSON here (nested too deeply)"),
]


@pytest.mark.parametrize(("line", "problem"), BAD_LINES, ids=[p for _, p in BAD_LINES])
def test_a_bad_line_is_named_by_file_and_line_number(
    tmp_path: Path, line: str, problem: str
) -> None:
    path = write_in(tmp_path, '{"id": "ok", "prompt": "fine"}', "", line)
    with pytest.raises(UserError) as caught:
        read_jobs(path)
    message = str(caught.value)
    assert message.startswith(f"{path} line 3: ")
    assert problem in message
    assert "\n" not in message  # one problem: one line


def test_a_duplicate_id_names_both_lines(tmp_path: Path) -> None:
    path = write_in(
        tmp_path,
        '{"id": "a", "prompt": "x"}',
        '{"id": "b", "prompt": "y"}',
        '{"id": "a", "prompt": "z"}',
    )
    with pytest.raises(UserError, match=r'in\.jsonl line 3: the id "a" is already on line 1; ids '):
        read_jobs(path)


def test_an_integer_id_and_its_digits_are_the_same_id(tmp_path: Path) -> None:
    path = write_in(tmp_path, '{"id": 7, "prompt": "x"}', '{"id": "7", "prompt": "y"}')
    with pytest.raises(UserError) as caught:
        read_jobs(path)
    assert str(caught.value) == (
        f'{path} line 2: the id "7" is already on line 1 (an integer id is read as its '
        "digits); ids must be unique"
    )


def test_bytes_that_are_not_utf8_are_named_by_line_and_file_offset(tmp_path: Path) -> None:
    path = write_in(tmp_path, '{"id": "a", "prompt": "x"}', b'{"id": "b", "prompt": "caf\xe9"}')
    offset = len(b'{"id": "a", "prompt": "x"}\n') + len(b'{"id": "b", "prompt": "caf')
    with pytest.raises(UserError) as caught:
        read_jobs(path)
    assert str(caught.value) == (
        f"{path} line 2: not UTF-8 (byte 0xe9 at offset {offset}); convert the file first, "
        "e.g. iconv -f latin1 -t utf-8"
    )


def test_every_bad_line_is_reported_at_once(tmp_path: Path) -> None:
    path = write_in(
        tmp_path,
        '{"id": "a", "prompt": "x"}',
        "{oops",
        '{"id": "b"}',
        "",
        '{"id": "a", "prompt": "y"}',
        b'{"id": "c", "prompt": "\xff"}',
        '{"id": "d", "prompt": "fine"}',
    )
    bad_byte = path.read_bytes().index(b"\xff")
    with pytest.raises(UserError) as caught:
        read_jobs(path)
    assert str(caught.value).splitlines() == [
        f"{path} has 4 bad lines; nothing was run:",
        "  line 2: not valid JSON (Expecting property name enclosed in double quotes at column 2)",
        '  line 3: has no "prompt" (or "messages"); a line is {"id": ..., "prompt": "..."} or '
        '{"id": ..., "messages": [...]}',
        '  line 5: the id "a" is already on line 1; ids must be unique',
        f"  line 6: not UTF-8 (byte 0xff at offset {bad_byte})",
        "fix them and run again; convert the file first, e.g. iconv -f latin1 -t utf-8",
    ]


def test_beyond_the_first_problems_only_their_count_is_given(tmp_path: Path) -> None:
    path = write_in(tmp_path, *(["nope"] * (MAX_PROBLEMS + 7)))
    with pytest.raises(UserError) as caught:
        read_jobs(path)
    lines = str(caught.value).splitlines()
    assert lines[0] == f"{path} has {MAX_PROBLEMS + 7} bad lines; nothing was run:"
    assert lines[1].startswith("  line 1: ") and lines[MAX_PROBLEMS].startswith(
        f"  line {MAX_PROBLEMS}: "
    )
    assert lines[MAX_PROBLEMS + 1 :] == ["  and 7 more", "fix them and run again"]


@pytest.mark.parametrize("content", [b"", b"\n  \n\r\n"], ids=["empty", "blank lines"])
def test_a_file_with_no_prompts_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError, match=r"in\.jsonl has no prompts \(it is empty, or only blank"):
        read_jobs(path)


def test_a_missing_input_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"cannot read .*nowhere\.jsonl: No such file"):
        read_jobs(tmp_path / "nowhere.jsonl")


def test_a_job_made_in_code_must_end_with_a_user_turn() -> None:
    with pytest.raises(ValidationError, match="must end with a user turn"):
        Job(id="a", messages=[ChatMessage(role="assistant", content="x")])
    with pytest.raises(ValidationError):
        Job(id="", messages=[user("x")])


# --- pending and chunks ------------------------------------------------------------------------


def some_jobs(n: int) -> list[Job]:
    return [Job(id=str(i), messages=[user(f"q{i}")]) for i in range(n)]


def test_pending_keeps_input_order_and_skips_done_ids() -> None:
    assert [job.id for job in pending(some_jobs(6), {"1", "4", "not in the input"})] == [
        "0",
        "2",
        "3",
        "5",
    ]


def test_chunks_cut_in_order_with_a_shorter_last() -> None:
    cut = chunks(some_jobs(7), 3)
    assert [[job.id for job in chunk] for chunk in cut] == [["0", "1", "2"], ["3", "4", "5"], ["6"]]
    assert chunks([], 3) == []
    with pytest.raises(ValueError, match="at least one prompt"):
        chunks(some_jobs(2), 0)


# --- OUT -------------------------------------------------------------------------------------


@pytest.fixture
def open_umask() -> Iterator[None]:
    """A umask that masks nothing, so a file's mode is exactly what localmoa asked for."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_out_is_created_0600_and_an_existing_one_keeps_its_mode(
    tmp_path: Path, open_umask: None
) -> None:
    new = tmp_path / "out.jsonl"
    with Results(new) as results:
        assert mode(new) == 0o600
        results.write(answered("a"))
    assert mode(new) == 0o600
    shared = tmp_path / "shared.jsonl"
    shared.touch(mode=0o644)
    Results(shared).close()
    assert mode(shared) == 0o644


def test_lines_are_the_result_models_in_order(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    failed = BatchResult(id="b", answer=None, ok=False, error="boom", seconds=0.25, run_id=None)
    with Results(path) as results:
        assert results.done_ids() == frozenset()
        results.write_chunk([answered("a", "é\n\u2028"), failed])
    assert path.read_text().split("\n") == [
        '{"id":"a","answer":"é\\n\u2028","ok":true,"error":null,"seconds":1.5,"run_id":"R1"}',
        '{"id":"b","answer":null,"ok":false,"error":"boom","seconds":0.25,"run_id":null}',
        "",
    ]
    with Results(path) as results:
        assert results.done_ids() == {"a", "b"}  # a failed one too: its line is there


def test_a_result_is_an_answer_or_an_error() -> None:
    with pytest.raises(ValidationError, match="an ok result has an answer"):
        BatchResult(id="a", answer=None, ok=True, error=None, seconds=1, run_id=None)
    with pytest.raises(ValidationError, match="a failed result has an error"):
        BatchResult(id="a", answer="x", ok=False, error="e", seconds=1, run_id=None)


def test_a_resumed_batch_skips_the_ids_already_answered(tmp_path: Path) -> None:
    source = write_in(tmp_path, *(json.dumps({"id": i, "prompt": f"q{i}"}) for i in range(5)))
    out = tmp_path / "out.jsonl"
    with Results(out) as results:
        first = chunks(pending(read_jobs(source), results.done_ids()), 2)[0]
        results.write_chunk([answered(job.id) for job in first])
    # stopped here; the same command again:
    with Results(out) as results:
        todo = pending(read_jobs(source), results.done_ids())
        assert [job.id for job in todo] == ["2", "3", "4"]
        for chunk in chunks(todo, 2):
            results.write_chunk([answered(job.id) for job in chunk])
    assert [line["id"] for line in out_lines(out)] == ["0", "1", "2", "3", "4"]


def test_writing_an_id_twice_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    with Results(path) as results:
        results.write(answered("a"))
        before = path.read_bytes()
        with pytest.raises(ValueError, match=r"would hold these ids twice: \['a'\]"):
            results.write_chunk([answered("b"), answered("a")])
        with pytest.raises(ValueError, match=r"\['c'\]"):
            results.write_chunk([answered("c"), answered("c")])
        assert path.read_bytes() == before


@pytest.mark.parametrize(
    "tail",
    [
        b'{"id":"c","answer":"half an ans',  # a write cut short
        '{"id":"c","answer":"caf\u00e9"'.encode()[:-2],  # cut inside a UTF-8 character
        b"\x00" * 300,  # a power loss: the size grew, the data never came
        b"\x00" * 40 + b"\n",  # the same, over a newline: a complete line that is not JSON
        answered("c").model_dump_json().encode(),  # whole, but without its newline
    ],
    ids=["half a line", "half a character", "zeros", "zeros and a newline", "no newline"],
)
def test_a_torn_last_line_is_cut_away_on_open_and_the_next_write_is_clean(
    tmp_path: Path, tail: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "out.jsonl"
    with Results(path) as results:
        results.write_chunk([answered("a"), answered("b")])
    whole = path.read_bytes()
    with path.open("ab") as file:
        file.write(tail)
    with caplog.at_level(logging.WARNING, logger="localmoa.batch.jobs"):
        results = Results(path)
    with results:
        assert results.truncated_bytes == len(tail)
        assert path.read_bytes() == whole
        assert results.done_ids() == {"a", "b"}  # "c" runs again
        results.write(answered("c"))
    assert [line["id"] for line in out_lines(path)] == ["a", "b", "c"]
    (record,) = caplog.records
    assert record.getMessage() == (
        f"{path}: removed its last line, cut short when a run stopped mid-write "
        f"({len(tail)} bytes); that prompt runs again"
    )


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b'{"id":"x","answer":"y"\n{"id":"a"}\n', "line 1 is not valid JSON"),
        (b"\x00\x00\n\n", "line 1 is not valid JSON"),
        (
            b'{"id":"a","answer":"y","ok":true,"error":null,"seconds":1,"run_id":null}\n[1, 2]\n',
            "line 2 is not a batch result",
        ),
        # OUT pointed at the input by mistake (its last line even lacks a newline):
        (b'{"id": 1, "prompt": "x"}\n{"id": 2, "prompt": "y"}', "line 1 is not a batch result"),
        (b'{"id": 2, "prompt": "y"}', "line 1 is not a batch result"),
    ],
    ids=[
        "torn line in the middle",
        "not JSON, then more",
        "not a result",
        "an input",
        "no newline",
    ],
)
def test_a_file_that_is_not_a_batch_output_is_refused_and_left_alone(
    tmp_path: Path, content: bytes, problem: str
) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError) as caught:
        Results(path)
    assert str(caught.value).startswith(f"{path} {problem}")
    assert "is not the output of localmoa batch, or was edited; give another -o" in str(
        caught.value
    )
    assert path.read_bytes() == content


def write_half_then(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> list[bytes]:
    """Make the next os.write write half its bytes and then raise ``exc``."""
    real = os.write
    written: list[bytes] = []

    def half(fd: int, data: bytes | memoryview) -> int:
        piece = bytes(data[: len(data) // 2])
        real(fd, piece)
        written.append(piece)
        raise exc

    monkeypatch.setattr(os, "write", half)  # the os module jobs.py writes with
    return written


def test_ctrl_c_inside_a_write_leaves_no_line_of_that_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "out.jsonl"
    with Results(path) as results:
        results.write(answered("a"))
        before = path.read_bytes()
        written = write_half_then(monkeypatch, KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            results.write_chunk([answered("b"), answered("c", "x" * 1000)])
        assert written and written[0].count(b"\n") == 1  # it did write a line and a half
        assert path.read_bytes() == before
        monkeypatch.undo()
        results.write_chunk([answered("b"), answered("c")])  # the chunk runs again, whole
    assert [line["id"] for line in out_lines(path)] == ["a", "b", "c"]


def test_a_full_disk_is_a_user_error_and_leaves_no_line_of_that_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "out.jsonl"
    with Results(path) as results:
        results.write(answered("a"))
        before = path.read_bytes()
        write_half_then(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        with pytest.raises(UserError, match=r"out\.jsonl cannot be written: No space left"):
            results.write(answered("b"))
        monkeypatch.undo()
        assert path.read_bytes() == before
        assert results.done_ids() == {"a"}


def test_one_output_file_has_one_writer_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    with (
        Results(path),
        pytest.raises(UserError, match="is being written by another localmoa batch; wait"),
    ):
        Results(path)
    Results(path).close()  # released on close


def test_an_output_in_a_missing_folder_or_not_a_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"the folder .*nowhere does not exist"):
        Results(tmp_path / "nowhere" / "out.jsonl")
    with pytest.raises(UserError, match=r"cannot be opened: Is a directory"):
        Results(tmp_path)
    os.mkfifo(fifo := tmp_path / "fifo")
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so opening it to write does not block
    try:
        with pytest.raises(UserError, match="is not a regular file"):
            Results(fifo)
    finally:
        os.close(reader)


def test_the_summary_has_the_documented_keys() -> None:
    summary = BatchSummary(prompts=5, answered=2, skipped=2, failed=1, loads=3, seconds=9.5)
    assert list(summary.model_dump()) == [
        "prompts",
        "answered",
        "skipped",
        "failed",
        "loads",
        "seconds",
    ]


# --- a writer killed mid-way ------------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from localmoa.backends.base import ChatMessage
    from localmoa.batch.jobs import BatchResult, Job, Results, chunks, pending

    path, prompts, size, answer_bytes, tear = sys.argv[1:]
    if tear == "tear":  # the second write stops halfway, as if the process died inside it
        real, calls = os.write, []
        def torn(fd, data):
            calls.append(1)
            if len(calls) < 2:
                return real(fd, data)
            real(fd, bytes(data[: len(data) // 2]))
            os.kill(os.getpid(), signal.SIGKILL)
        os.write = torn
    jobs = [Job(id=str(i), messages=[ChatMessage(role="user", content="q")]) for i in range(int(prompts))]
    with Results(path) as results:
        for chunk in chunks(pending(jobs, results.done_ids()), int(size)):
            results.write_chunk([
                BatchResult(id=job.id, answer=job.id + ":" + "x" * int(answer_bytes), ok=True,
                            error=None, seconds=0.0, run_id=None)
                for job in chunk
            ])
            print(chunk[-1].id, flush=True)
    """
)

# 6 chunks of 12 MB: one os.write takes long enough that a SIGKILL sent while the file grows
# lands inside it (Linux ends a write early on a fatal signal), as a crash in a real batch could.
PROMPTS, CHUNK, ANSWER_BYTES = 36, 6, 2_000_000
CHUNK_BYTES = CHUNK * len(
    BatchResult(
        id="10", answer="x" * ANSWER_BYTES, ok=True, error=None, seconds=0.0, run_id=None
    ).model_dump_json()
)


def writer(tmp_path: Path, out: Path, tear: bool = False) -> subprocess.Popen[str]:
    """A process answering PROMPTS prompts into ``out`` (resuming it), printing the last id of
    each chunk once written; with ``tear``, it dies halfway through its second write."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    arguments = [str(out), str(PROMPTS), str(CHUNK), str(ANSWER_BYTES), "tear" if tear else "-"]
    return subprocess.Popen(
        [sys.executable, str(script), *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def whole_lines(data: bytes) -> list[str]:
    """The ids of OUT's complete lines (a torn tail left aside), each checked whole and right,
    and never twice."""
    complete = data[: data.rfind(b"\n") + 1].decode()
    lines = [json.loads(line) for line in complete.split("\n") if line]
    ids = [str(line["id"]) for line in lines]
    assert len(ids) == len(set(ids))
    for line in lines:
        assert line == {
            "id": line["id"],
            "answer": f"{line['id']}:" + "x" * ANSWER_BYTES,
            "ok": True,
            "error": None,
            "seconds": 0.0,
            "run_id": None,
        }
    return ids


def kill_while_growing(process: subprocess.Popen[str], out: Path, past: int) -> list[str]:
    """SIGKILL ``process`` as soon as ``out`` has grown past ``past`` bytes (mid-write), and
    return the ids it said it had written."""
    deadline = time.monotonic() + 60
    while not (out.exists() and out.stat().st_size > past):  # a bounded poll of the size
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "the writer never got that far"
    process.kill()  # SIGKILL: no handler, no finally, no flush
    reported, _ = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    return reported.split()


def test_a_writer_killed_mid_way_leaves_only_whole_lines_and_resumes_without_duplicates(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out.jsonl"
    out.touch()
    for _ in range(2):  # killed twice, each time partway into the first chunk it writes
        size = out.stat().st_size
        reported = kill_while_growing(writer(tmp_path, out), out, size + CHUNK_BYTES // 5)
        kept = whole_lines(out.read_bytes())
        with Results(out) as results:  # what the next run opens: a torn tail is cut here
            done = results.done_ids()
        assert whole_lines(out.read_bytes()) == kept  # only whole lines now, none lost
        assert out.read_bytes().endswith(b"\n")
        assert kept == [str(i) for i in range(len(kept))] and set(kept) == done
        assert set(reported) <= done  # every chunk it said it wrote is there
    finished = writer(tmp_path, out)
    _, err = finished.communicate(timeout=120)
    assert finished.returncode == 0, err
    assert sorted(whole_lines(out.read_bytes()), key=int) == [str(i) for i in range(PROMPTS)]


def test_a_process_killed_inside_a_write_leaves_a_torn_line_that_the_next_run_cuts(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out.jsonl"
    process = writer(tmp_path, out, tear=True)
    reported, _ = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert reported.split() == [str(CHUNK - 1)]
    torn = out.read_bytes()
    assert not torn.endswith(b"\n")  # the crash really left part of a line
    kept = whole_lines(torn)
    assert CHUNK <= len(kept) < 2 * CHUNK  # the first chunk, and part of the second
    with Results(out) as results:
        assert results.truncated_bytes == len(torn) - torn.rfind(b"\n") - 1
        assert results.done_ids() == set(kept)
    finished = writer(tmp_path, out)
    _, err = finished.communicate(timeout=120)
    assert finished.returncode == 0, err
    assert sorted(whole_lines(out.read_bytes()), key=int) == [str(i) for i in range(PROMPTS)]
