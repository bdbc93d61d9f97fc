"""Generated roles: the prompt, reading what a model writes, one system message, the cache."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import platformdirs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from localmoa.runtime.roles import (
    ROLES_FORMAT,
    RolesCache,
    default_roles_dir,
    parse_roles,
    roles_format,
    roles_prompt,
    with_role,
)

TASK = 'Answer questions about {"json"} and Python packaging'
ROLES = [
    "You are a release engineer who has shipped wheels for a decade; answer tersely.",
    "You are a teacher of beginners; explain step by step with one example.",
    "You are a security reviewer; point out the risks before anything else.",
]

# -- the call ----------------------------------------------------------------------------------


def test_prompt_is_one_system_and_one_user_message_with_the_task_verbatim() -> None:
    messages = roles_prompt(TASK, 3)
    assert [m.role for m in messages] == ["system", "user"]
    user = messages[1].content
    assert TASK in user and "3 role descriptions" in user and "exactly 3" in user
    for asked in ("occupation", "viewpoint", "style", "JSON"):
        assert asked in user


def test_format_fixes_the_count() -> None:
    fmt = roles_format(4)
    assert fmt.type == "json_schema" and fmt.json_schema is not None
    assert fmt.json_schema.name == "roles"
    roles = fmt.json_schema.schema_["properties"]["roles"]
    assert roles["minItems"] == roles["maxItems"] == 4
    assert fmt.json_schema.schema_["required"] == ["roles"]
    assert ROLES_FORMAT.json_schema is not None
    assert "maxItems" not in ROLES_FORMAT.json_schema.schema_["properties"]["roles"]


def test_format_compiles_to_a_llama_cpp_grammar() -> None:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    fmt = roles_format(2)
    assert fmt.json_schema is not None
    assert "roles" in json_schema_to_gbnf(json.dumps(fmt.json_schema.schema_))


# -- reading what models write -----------------------------------------------------------------


def test_json_object_as_a_grammar_produces_it() -> None:
    assert parse_roles(json.dumps({"roles": ROLES}), 3) == ROLES


def test_json_object_in_a_fence_after_prose() -> None:
    text = "Here are three roles:\n```json\n" + json.dumps({"roles": ROLES}, indent=2) + "\n```"
    assert parse_roles(text, 3) == ROLES


def test_a_bare_json_list() -> None:
    assert parse_roles("Sure!\n" + json.dumps(ROLES), 3) == ROLES


def test_roles_as_objects() -> None:
    text = json.dumps(
        {
            "roles": [
                {"name": "Engineer", "description": ROLES[0]},
                {"occupation": "Teacher", "viewpoint": "beginners first", "style": "patient"},
            ]
        }
    )
    assert parse_roles(text, 2) == [
        ROLES[0],
        "occupation: Teacher. viewpoint: beginners first. style: patient",
    ]


def test_smoa_generated_role_description_markers() -> None:
    text = (
        "[Generated Role Description]\nYou are a release engineer who has shipped wheels\n"
        "for a decade; answer tersely.\n\n"
        "[Generated Role Description]\nYou are a teacher of beginners; explain step by step "
        "with one example.\n"
    )
    assert parse_roles(text, 2) == ROLES[:2]


@pytest.mark.parametrize(
    "text",
    [
        "1. {0}\n2. {1}\n3. {2}",
        "Here you go:\n\n**Role 1:** {0}\n\n**Role 2:** {1}\n\n**Role 3:** {2}\n",
        "[Role 1]\n{0}\n[Role 2]\n{1}\n[Role 3]\n{2}",
        "1) {0}\n\n2) {1}\n\n3) {2}",
    ],
)
def test_numbered_text(text: str) -> None:
    assert parse_roles(text.format(*ROLES), 3) == ROLES


def test_more_than_asked_keeps_the_first() -> None:
    assert parse_roles(json.dumps({"roles": ROLES}), 2) == ROLES[:2]


def test_too_few_distinct_or_empty_ones_is_none() -> None:
    assert parse_roles(json.dumps({"roles": ROLES[:2]}), 3) is None
    same = [ROLES[0], ROLES[0].upper(), "  " + ROLES[0] + "  "]
    assert parse_roles(json.dumps({"roles": same}), 2) is None
    assert parse_roles(json.dumps({"roles": ["", "  ", ROLES[0]]}), 2) is None
    assert parse_roles("I cannot help with that.", 1) is None
    assert parse_roles("", 1) is None


def test_whitespace_in_a_role_is_collapsed() -> None:
    assert parse_roles('{"roles": ["You are\\n  a   judge.", "b"]}', 2) == ["You are a judge.", "b"]


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=300), count=st.integers(min_value=1, max_value=6))
def test_parse_never_raises_and_gives_exactly_count_or_none(text: str, count: int) -> None:
    roles = parse_roles(text, count)
    if roles is not None:
        assert len(roles) == count and all(r.strip() for r in roles)
        assert len({r.casefold() for r in roles}) == count


# -- one system message ------------------------------------------------------------------------


def test_role_then_the_agents_own_system_prompt() -> None:
    assert (
        with_role("Answer in French.", " You are a chef. ")
        == "You are a chef.\n\nAnswer in French."
    )
    assert with_role(None, "You are a chef.") == "You are a chef."
    assert with_role("  ", "You are a chef.") == "You are a chef."


# -- the cache ---------------------------------------------------------------------------------


def test_default_directory_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("LOCALMOA_CACHE", str(tmp_path / "c"))
    assert default_roles_dir() == tmp_path / "c" / "roles"
    assert RolesCache().directory == tmp_path / "c" / "roles"
    monkeypatch.delenv("LOCALMOA_CACHE")
    monkeypatch.setenv("LOCALMOA_HOME", str(tmp_path / "h"))
    assert default_roles_dir() == tmp_path / "h" / "cache" / "roles"
    monkeypatch.delenv("LOCALMOA_HOME")
    assert default_roles_dir() == Path(platformdirs.user_cache_dir("localmoa")) / "roles"


def test_put_then_get_and_the_file_says_what_it_is(tmp_path: Path) -> None:
    cache = RolesCache(tmp_path / "roles")
    assert cache.get(TASK, "qwen", 3) is None
    path = cache.put(TASK, "qwen", 3, ROLES)
    assert path == cache.path(TASK, "qwen", 3) and path.parent == tmp_path / "roles"
    assert cache.get(TASK, "qwen", 3) == ROLES
    record = json.loads(path.read_text(encoding="utf-8"))
    assert (record["task"], record["model"], record["count"], record["roles"]) == (
        TASK,
        "qwen",
        3,
        ROLES,
    )
    assert record["written"].endswith("+00:00")
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_keyed_by_the_sha256_of_task_model_and_count(tmp_path: Path) -> None:
    cache = RolesCache(tmp_path)
    key = json.dumps([TASK, "qwen", 3], ensure_ascii=False, separators=(",", ":"))
    assert cache.path(TASK, "qwen", 3).name == hashlib.sha256(key.encode()).hexdigest() + ".json"
    others = {cache.path(TASK, "llama", 3), cache.path(TASK, "qwen", 4), cache.path("x", "qwen", 3)}
    assert cache.path(TASK, "qwen", 3) not in others and len(others) == 3


def test_a_hand_edited_file_for_the_same_key_is_used(tmp_path: Path) -> None:
    cache = RolesCache(tmp_path)
    record = {"task": TASK, "model": "qwen", "count": 2, "roles": ["You are A.", "You are B."]}
    cache.path(TASK, "qwen", 2).write_text(json.dumps(record), encoding="utf-8")
    assert cache.get(TASK, "qwen", 2) == ["You are A.", "You are B."]


def test_a_later_put_replaces(tmp_path: Path) -> None:
    cache = RolesCache(tmp_path)
    cache.put(TASK, "qwen", 3, ROLES)
    cache.put(TASK, "qwen", 3, list(reversed(ROLES)))
    assert cache.get(TASK, "qwen", 3) == list(reversed(ROLES))


def test_a_file_for_another_key_is_a_miss(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = RolesCache(tmp_path)
    path = cache.put(TASK, "qwen", 3, ROLES)
    for field, value in (("task", "something else"), ("model", "llama"), ("count", 2)):
        record = json.loads(path.read_text(encoding="utf-8"))
        record[field] = value
        path.write_text(json.dumps(record), encoding="utf-8")
        with caplog.at_level(logging.DEBUG, logger="localmoa.runtime.roles"):
            assert cache.get(TASK, "qwen", 3) is None
        assert "another task, model or count" in caplog.text
        cache.put(TASK, "qwen", 3, ROLES)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{not json",
        b'{"task": "t"}',
        b"\xff\xfe\x00",
        b"[]",
    ],
)
def test_a_corrupt_file_is_a_miss(tmp_path: Path, content: bytes) -> None:
    cache = RolesCache(tmp_path)
    cache.path(TASK, "qwen", 3).write_bytes(content)
    assert cache.get(TASK, "qwen", 3) is None


def test_a_file_with_wrong_roles_is_a_miss(tmp_path: Path) -> None:
    cache = RolesCache(tmp_path)
    path = cache.put(TASK, "qwen", 3, ROLES)
    for roles in (ROLES[:2], [ROLES[0], ROLES[0], ROLES[1]], ["", ROLES[0], ROLES[1]]):
        record = json.loads(path.read_text(encoding="utf-8"))
        record["roles"] = roles
        path.write_text(json.dumps(record), encoding="utf-8")
        assert cache.get(TASK, "qwen", 3) is None


def test_an_unreadable_entry_is_a_miss(tmp_path: Path) -> None:
    cache = RolesCache(tmp_path)
    cache.path(TASK, "qwen", 3).mkdir()  # a folder where the file should be
    assert cache.get(TASK, "qwen", 3) is None


def test_an_unwritable_cache_warns_and_the_run_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be", encoding="utf-8")
    cache = RolesCache(blocker / "roles")
    with caplog.at_level(logging.WARNING, logger="localmoa.runtime.roles"):
        path = cache.put(TASK, "qwen", 3, ROLES)
    assert path == cache.path(TASK, "qwen", 3)
    assert "goes on without caching" in caplog.text
    assert cache.get(TASK, "qwen", 3) is None


def test_a_failed_replace_leaves_no_temporary_file(tmp_path: Path) -> None:
    cache = RolesCache(tmp_path / "roles")
    cache.directory.mkdir()
    cache.path(TASK, "qwen", 3).mkdir()  # os.replace of a file onto a folder fails
    cache.put(TASK, "qwen", 3, ROLES)
    assert [p.name for p in cache.directory.iterdir()] == [cache.path(TASK, "qwen", 3).name]


def test_put_refuses_a_count_that_does_not_match() -> None:
    with pytest.raises(ValueError, match="2 roles given for a count of 3"):
        RolesCache(Path("unused")).put(TASK, "qwen", 3, ROLES[:2])
