"""The versions of the views and functions in db/sql: the first whole, each later one a diff
that applies exactly to the one before (`db.sql`)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from db import sql

SQL_DIR = Path(sql.__file__).parent


def test_every_version_loads_and_each_diff_changes_its_predecessor() -> None:
    objects = sorted(p.name for p in SQL_DIR.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert "record_choice" in objects
    for obj in objects:
        revisions = sorted(
            p.stem for p in (SQL_DIR / obj).iterdir() if p.suffix in {".sql", ".diff"}
        )
        texts = [sql.load(f"{obj}/{revision}") for revision in revisions]
        assert all(texts)
        assert all(a != b for a, b in itertools.pairwise(texts)), obj
        assert sql.newest(obj) == texts[-1]


def test_record_choice_0006_is_0002_with_the_expiry_and_the_interaction_order() -> None:
    v2, v6 = sql.load("record_choice/0002"), sql.load("record_choice/0006")
    assert "p_open_for interval" not in v2 and "p_open_for interval" in v6
    assert v6.startswith("-- As 0002's, with a round's expiry")


def test_a_diff_that_does_not_apply_is_refused() -> None:
    base = "a\nb\nc\n"
    diff = sql.make_diff(base, "a\nB\nc\n", "x", "0002")
    assert sql.apply_diff(base, diff, "x/0002.diff") == "a\nB\nc\n"
    with pytest.raises(sql.SQLVersionError, match=r"x/0002.diff does not apply at line 2"):
        sql.apply_diff("a\nz\nc\n", diff, "x/0002.diff")
    with pytest.raises(sql.SQLVersionError, match="no version '0099'"):
        sql.load("record_choice/0099")
    with pytest.raises(sql.SQLVersionError, match="no SQL object"):
        sql.load("nothing/0001")


def test_insertions_at_the_start_and_the_end_apply() -> None:
    base = "one\ntwo\n"
    for new in ("zero\none\ntwo\n", "one\ntwo\nthree\n", "", "x\n"):
        assert sql.apply_diff(base, sql.make_diff(base, new, "x", "1"), "x") == new
