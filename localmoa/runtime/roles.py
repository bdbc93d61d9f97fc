"""Roles for the proposers, written once per task by a model and kept on disk.

Sparse MoA (arXiv 2411.03284) gives each proposer a generated role description (occupation,
viewpoint, style) so that answers to the same question differ in useful ways; its code writes
them once per dataset and caches them in a JSON file. Here ``roles = "auto"`` with a ``task``
does the same: one call (:func:`roles_prompt`, our own wording) writes ``count`` roles, read
tolerantly by :func:`parse_roles`, and :class:`RolesCache` keeps them keyed by task, model and
count so later runs (and ``localmoa plan``) reuse them without the call.

**One system message.** SMoA sends the role as a second system message; many GGUF chat
templates reject that (or silently drop it), so :func:`with_role` merges the role and the
agent's own system prompt into one.

**The cache never fails a run.** A corrupt, unreadable or mismatching file is a miss (logged at
debug); a file whose task, model or count differ from the key asked for (a hash collision, a
hand-edited file) is a miss too, so wrong roles are never used, while a hand-edited file whose
task, model and count still match is used as it stands (a way to tune the roles). When the
cache cannot be written (no permission, disk full) :meth:`RolesCache.put` logs a warning and
the run goes on without caching: the roles are only a saving, and the next run writes them
again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import platformdirs
from pydantic import BaseModel, ConfigDict, ValidationError

from localmoa.backends.base import ChatMessage, JsonSchemaFormat, ResponseFormat
from localmoa.jsontext import json_values

__all__ = [
    "ROLES_FORMAT",
    "RolesCache",
    "default_roles_dir",
    "parse_roles",
    "roles_format",
    "roles_prompt",
    "with_role",
]

log = logging.getLogger(__name__)


def _schema(count: int | None) -> dict[str, Any]:
    roles: dict[str, Any] = {"type": "array", "items": {"type": "string", "minLength": 1}}
    if count is None:
        roles["minItems"] = 1
    else:
        roles["minItems"] = roles["maxItems"] = count
    return {
        "type": "object",
        "properties": {"roles": roles},
        "required": ["roles"],
        "additionalProperties": False,
    }


ROLES_FORMAT = ResponseFormat(
    type="json_schema", json_schema=JsonSchemaFormat(name="roles", schema=_schema(None))
)
"""``{"roles": [string, ...]}`` with any number of roles; :func:`roles_format` fixes it."""


def roles_format(count: int) -> ResponseFormat:
    """``{"roles": [...]}`` with exactly ``count`` non-empty strings, for a grammar."""
    return ResponseFormat(
        type="json_schema", json_schema=JsonSchemaFormat(name="roles", schema=_schema(count))
    )


def roles_prompt(task: str, count: int) -> list[ChatMessage]:
    """The roles call's messages: one system, one user; ``task`` goes in verbatim."""
    system = (
        "You design the members of a panel of AI assistants. Every member answers the same "
        "questions on its own, and a final writer combines their answers, so members that "
        "differ in expertise, viewpoint and style together cover more ground than copies of "
        "one assistant."
    )
    user = (
        f"The panel's task: {task.strip()}\n\n"
        f"Write {count} role descriptions, one per member, each different from the others. "
        'Each is one short paragraph addressed to the member ("You are ..."): an occupation '
        "or field of expertise suited to the task, the viewpoint it brings, and the style in "
        "which it answers. Do not answer any question yourself.\n\n"
        'Reply with one JSON object and nothing else: {"roles": ["...", ...]} with exactly '
        f"{count} strings."
    )
    return [ChatMessage(role="system", content=system), ChatMessage(role="user", content=user)]


# a role's marker at the start of a line: "[Role 2]", "[Generated Role Description]",
# "Role 2:", "**Persona 2.**", "2." or "2)"; markdown emphasis around it is part of it
_MARKER = re.compile(
    r"^[ \t>#*_]*(?:\[\s*(?:generated\s+)?role(?:\s+description)?(?:\s*\d+)?\s*\]"
    r"|(?:role|persona|member|agent)\s*\d+\s*[:.)\-–]?"
    r"|\d+\s*[.):])[ \t*_]*:?",
    re.IGNORECASE | re.MULTILINE,
)


def parse_roles(text: str, count: int) -> list[str] | None:
    """``count`` distinct roles read from a model's answer, or None when fewer can be read.

    Tried in turn, the first giving enough wins: a JSON object with ``"roles"``, a JSON list,
    then text split at role markers (``[Role N]``, ``Role N:``, ``N.``). A role given as an
    object is its ``"description"``, else its fields as ``key: value``. Roles are compared with
    whitespace collapsed and case ignored; past ``count``, the first ``count`` are kept.
    """
    if count < 1:
        return None
    for candidates in (_from_json_object(text), _from_json_list(text), _from_markers(text)):
        roles = _distinct(candidates)
        if len(roles) >= count:
            return roles[:count]
    return None


def _from_json_object(text: str) -> list[str]:
    for value in json_values(text):
        if isinstance(value, dict):
            roles = next((v for k, v in value.items() if k.strip().lower() == "roles"), None)
            if isinstance(roles, list):
                return [_role_text(item) for item in roles]
    return []


def _from_json_list(text: str) -> list[str]:
    for value in json_values(text):
        if isinstance(value, list) and value and all(isinstance(v, str | dict) for v in value):
            return [_role_text(item) for item in value]
    return []


def _role_text(item: Any) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        description = item.get("description")
        if isinstance(description, str):
            return description
        return ". ".join(f"{k}: {v}" for k, v in item.items() if isinstance(v, str | int | float))
    return ""


def _from_markers(text: str) -> list[str]:
    starts = list(_MARKER.finditer(text))
    pieces = [
        text[m.end() : (starts[i + 1].start() if i + 1 < len(starts) else len(text))]
        for i, m in enumerate(starts)
    ]
    return [piece.strip().strip("*_").strip() for piece in pieces]


def _distinct(candidates: list[str]) -> list[str]:
    seen: set[str] = set()
    roles: list[str] = []
    for candidate in candidates:
        role = " ".join(candidate.split())
        key = role.casefold()
        if role and key not in seen:
            seen.add(key)
            roles.append(role)
    return roles


def with_role(system_prompt: str | None, role: str) -> str:
    """The one system message a proposer with ``role`` sends: its role, then its own system
    prompt if it has one (a second system message is what many chat templates reject)."""
    parts = [role.strip()]
    if system_prompt and system_prompt.strip():
        parts.append(system_prompt.strip())
    return "\n\n".join(parts)


def default_roles_dir() -> Path:
    """``$LOCALMOA_CACHE/roles`` if set, else ``$LOCALMOA_HOME/cache/roles`` (where the
    measurement cache lives, and what the tests point at a temporary folder), else the
    platform's user cache folder's ``roles``."""
    cache = os.environ.get("LOCALMOA_CACHE")
    if cache:
        return Path(cache) / "roles"
    home = os.environ.get("LOCALMOA_HOME")
    if home:
        return Path(home) / "cache" / "roles"
    return Path(platformdirs.user_cache_dir("localmoa")) / "roles"


class _RolesFile(BaseModel):
    model_config = ConfigDict(extra="ignore")

    task: str
    model: str
    count: int
    roles: list[str]
    written: str = ""
    """When the roles were written (ISO 8601, UTC); a hand-written file may leave it out."""


class RolesCache:
    """Roles on disk, one small JSON file per (task, model, count)."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory if directory is not None else default_roles_dir()

    def path(self, task: str, model: str, count: int) -> Path:
        """The file for this key: the sha256 of the canonical JSON ``[task, model, count]``."""
        key = json.dumps([task, model, count], ensure_ascii=False, separators=(",", ":"))
        return self.directory / f"{hashlib.sha256(key.encode('utf-8')).hexdigest()}.json"

    def get(self, task: str, model: str, count: int) -> list[str] | None:
        """The cached roles for this key, or None (a miss) when there are none usable."""
        path = self.path(task, model, count)
        try:
            data = _RolesFile.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, ValidationError) as exc:
            log.debug("ignoring unreadable roles cache %s: %s", path, exc)
            return None
        if (data.task, data.model, data.count) != (task, model, count):
            log.debug("ignoring roles cache %s: written for another task, model or count", path)
            return None
        roles = _distinct(data.roles)
        if len(roles) != count or len(data.roles) != count:
            log.debug("ignoring roles cache %s: not %d distinct roles", path, count)
            return None
        return list(data.roles)

    def put(self, task: str, model: str, count: int, roles: Sequence[str]) -> Path:
        """Keep ``roles`` for this key, atomically (a temporary file in the same folder, then
        :func:`os.replace`); returns the file's path, also when it could not be written."""
        if len(roles) != count:
            raise ValueError(f"{len(roles)} roles given for a count of {count}")
        path = self.path(task, model, count)
        record = _RolesFile(
            task=task,
            model=model,
            count=count,
            roles=list(roles),
            written=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        tmp: str | None = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(
                "w", dir=self.directory, delete=False, suffix=".tmp", encoding="utf-8"
            ) as file:
                tmp = file.name
                file.write(record.model_dump_json(indent=1))
            os.replace(tmp, path)
        except OSError as exc:
            log.warning(
                "could not keep the roles for later runs in %s (%s); this run goes on without "
                "caching them",
                path,
                exc,
            )
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        return path
