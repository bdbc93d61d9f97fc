"""README's ``--json`` key lists, written from the report models so they cannot drift.

    python scripts/readme_keys.py            # print the block
    python scripts/readme_keys.py --write    # put it into README.md, between its markers
    python scripts/readme_keys.py --check    # exit 1, with a diff, when README.md differs

The block sits between the two marker comments in README.md; everything else there is prose and
is left alone. tests/cli/test_readme_keys.py runs ``--check``, so a field added to a report
(localmoa/cli/reports.py) or to an embedded model (a call record, the plan) fails the tests until
README is regenerated.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import textwrap
from pathlib import Path

from pydantic import BaseModel

from localmoa.batch.jobs import BatchSummary
from localmoa.cli.reports import (
    PLAN,
    BatchPlanReport,
    InitReport,
    ModelsReport,
    PlanReport,
    RunReport,
    key_list,
)
from localmoa.evaluation.report import EvalReport
from localmoa.planning.fewest_loads import Plan
from localmoa.records.models import LoggedRun, RunDetail

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN = "<!-- json-keys: written by scripts/readme_keys.py from localmoa/cli/reports.py -->"
END = "<!-- /json-keys -->"
REPORTS: list[tuple[str, type[BaseModel]]] = [
    ("run --json", RunReport),
    ("plan --json", PlanReport),
    ("models --json", ModelsReport),
    ("init --json", InitReport),
    ("logs --json", LoggedRun),
    ("logs show --json", RunDetail),
    ("batch --json", BatchSummary),
    ("batch --plan --json", BatchPlanReport),
    ("eval --json", EvalReport),
    (PLAN, Plan),
]
LISTS = {"logs --json"}
"""Commands that print a list of the model's objects."""
WIDTH = 100


def block() -> str:
    """The lines between the markers: a fenced block, one wrapped key list per command."""
    indent = max(len(label) for label, _ in REPORTS) + 2
    lists = [
        textwrap.fill(
            f"[{key_list(model)}]" if label in LISTS else key_list(model),
            width=WIDTH,
            initial_indent=label.ljust(indent),
            subsequent_indent=" " * indent,
            break_long_words=False,
            break_on_hyphens=False,
        )
        for label, model in REPORTS
    ]
    return "\n".join(["```text", *lists, "```"])


def split(readme: str) -> tuple[str, str, str]:
    """README as (before the block, the block, after it); ValueError without both markers."""
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README.md has no {BEGIN} ... {END} markers around the key lists")
    head = readme[: start + len(BEGIN)] + "\n"
    return head, readme[len(head) : end].rstrip("\n"), "\n" + readme[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help="update README.md in place")
    action.add_argument("--check", action="store_true", help="exit 1 when README.md differs")
    parser.add_argument("--readme", type=Path, default=README, help="README to read or write")
    args = parser.parse_args(argv)
    want = block()
    if not (args.write or args.check):
        print(want)
        return 0
    text = args.readme.read_text(encoding="utf-8")
    head, have, tail = split(text)
    if args.write:
        args.readme.write_text(head + want + tail, encoding="utf-8")
        return 0
    if have == want:
        return 0
    diff = difflib.unified_diff(
        have.splitlines(), want.splitlines(), "README.md", "the report models", lineterm=""
    )
    print(
        f"{args.readme}: the --json key lists differ from the report models; run "
        "python scripts/readme_keys.py --write\n" + "\n".join(diff),
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
