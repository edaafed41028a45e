"""The SQL of the views and functions the migrations create, one version per migration.

`db/sql/<object>/` holds `<object>` as each migration made it: the first version whole
(`<revision>.sql`: a view's query, which the migration puts after `CREATE [OR REPLACE] VIEW
<object> AS`, or a function's whole `CREATE FUNCTION` statement), and every later version as
a unified diff against the one before (`<revision>.diff`). A migration loads its version by
name (`load("record_choice/0006")`) and its downgrade loads the previous one. So a change is
a diff, reviewed as one, and never a second copy of a 90-line function; a file never changes
once its migration is released, since databases already migrated hold it.

To change an object: write its new text (`python -m db.sql show record_choice > new.sql`,
then edit), and `python -m db.sql diff record_choice <revision> new.sql` writes the diff.
"""

from __future__ import annotations

import difflib
import re
import sys
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


class SQLVersionError(Exception):
    """A version that does not exist, or a diff that does not apply to the one before."""


def _versions(obj: str) -> list[Traversable]:
    folder = files(__name__).joinpath(obj)
    if not folder.is_dir():
        raise SQLVersionError(f"no SQL object {obj!r} in db/sql")
    found = sorted(
        (f for f in folder.iterdir() if f.name.endswith((".sql", ".diff"))), key=lambda f: f.name
    )
    if (
        not found
        or not found[0].name.endswith(".sql")
        or len([f for f in found if f.name.endswith(".sql")]) != 1
    ):
        raise SQLVersionError(f"db/sql/{obj} needs exactly one whole version (.sql), the first")
    return found


def load(name: str) -> str:
    """The SQL of `name`, "<object>/<revision>" (e.g. "record_choice/0006"): the first
    version with every diff up to `<revision>` applied."""
    obj, _, revision = name.partition("/")
    text = ""
    for version in _versions(obj):
        stem, _, kind = version.name.rpartition(".")
        if stem > revision:
            break
        content = version.read_text(encoding="utf-8")
        text = content if kind == "sql" else apply_diff(text, content, f"{obj}/{version.name}")
        if stem == revision:
            return text
    raise SQLVersionError(f"no version {revision!r} of {obj!r} in db/sql/{obj}")


def newest(obj: str) -> str:
    """The newest version of `obj`, whole."""
    return load(f"{obj}/{_versions(obj)[-1].name.rpartition('.')[0]}")


def make_diff(old: str, new: str, obj: str, revision: str) -> str:
    """The unified diff that `load` applies to go from `old` to `new`."""
    return "".join(
        difflib.unified_diff(
            old.splitlines(keepends=True),
            new.splitlines(keepends=True),
            f"{obj}/previous",
            f"{obj}/{revision}",
        )
    )


def apply_diff(text: str, diff: str, where: str) -> str:
    """`text` with the unified `diff` applied; every context and removed line must match."""
    old = text.splitlines(keepends=True)
    out: list[str] = []
    at = 0  # lines of `old` consumed
    lines = diff.splitlines(keepends=True)
    i = 0
    while i < len(lines):
        match = _HUNK.match(lines[i])
        i += 1
        if not match:
            continue  # the ---/+++ header
        start = int(match.group(1)) - (0 if match.group(2) == "0" else 1)
        if start < at:
            raise SQLVersionError(f"{where}: hunks out of order")
        out.extend(old[at:start])
        at = start
        while i < len(lines) and not lines[i].startswith("@@"):
            tag, line = lines[i][:1], lines[i][1:]
            i += 1
            if tag == "+":
                out.append(line)
                continue
            if at >= len(old) or old[at] != line:
                raise SQLVersionError(f"{where} does not apply at line {at + 1}")
            if tag == " ":
                out.append(line)
            at += 1
    out.extend(old[at:])
    return "".join(out)


def main(argv: list[str]) -> int:
    """`python -m db.sql show OBJECT [REVISION]` prints a version whole;
    `python -m db.sql diff OBJECT REVISION FILE` writes FILE as the next version's diff."""
    if len(argv) >= 2 and argv[0] == "show":
        sys.stdout.write(load(f"{argv[1]}/{argv[2]}") if len(argv) > 2 else newest(argv[1]))
        return 0
    if len(argv) == 4 and argv[0] == "diff":
        obj, revision, new_file = argv[1:]
        diff = make_diff(newest(obj), Path(new_file).read_text(encoding="utf-8"), obj, revision)
        target = Path(__file__).parent / obj / f"{revision}.diff"
        target.write_text(diff, encoding="utf-8")
        print(f"wrote {target}")
        return 0
    print(main.__doc__, file=sys.stderr)
    return 2
