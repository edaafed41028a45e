"""docs/analysts.md: every worked query runs as `hps_analyst` on the example database and
returns exactly the result the document shows.

After changing the example data or a query on purpose, rewrite the documented results with
`UPDATE_ANALYST_DOCS=1 pytest tests/test_analysts_docs.py` and read the diff.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import asyncpg
import pytest

from tests.seed import seed

DOC = Path(__file__).resolve().parents[1] / "docs" / "analysts.md"
# A query block and the result block after it.
EXAMPLE = re.compile(r"```sql\n(?P<sql>.*?)```\n\n```text\n(?P<result>.*?)```", re.S)


def format_table(records: list[asyncpg.Record], columns: list[str]) -> str:
    """Rows as an aligned text table (empty cells for NULL)."""
    cells = [[("" if v is None else str(v)) for v in record.values()] for record in records]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]

    def line(values: list[str]) -> str:
        return " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([line(columns), rule, *(line(row) for row in cells)]) + "\n"


async def _results(pool: asyncpg.Pool, queries: list[str]) -> list[str]:
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL ROLE hps_analyst")
        results = []
        for sql in queries:
            statement = await conn.prepare(sql)
            columns = [a.name for a in statement.get_attributes()]
            results.append(format_table(await statement.fetch(), columns))
        return results


async def test_every_worked_query_returns_the_documented_result(pool) -> None:  # type: ignore[no-untyped-def]
    await seed(pool)
    text = DOC.read_text()
    examples = list(EXAMPLE.finditer(text))
    assert len(examples) == 10
    actual = await _results(pool, [m["sql"] for m in examples])
    if os.environ.get("UPDATE_ANALYST_DOCS"):
        for match, result in reversed(list(zip(examples, actual, strict=True))):
            text = text[: match.start("result")] + result + text[match.end("result") :]
        DOC.write_text(text)
        pytest.skip("docs/analysts.md rewritten")
    for match, result in zip(examples, actual, strict=True):
        assert result == match["result"], f"query:\n{match['sql']}"


async def test_the_analyst_role_cannot_read_discord_ids(pool) -> None:  # type: ignore[no-untyped-def]
    await seed(pool)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL ROLE hps_analyst")
        assert await conn.fetchval("SELECT count(*) FROM users WHERE pseudonym LIKE 'user-%'")
        for sql in (
            "SELECT discord_id FROM users",
            "SELECT ban_reason FROM users",
            "SELECT channel_id FROM rounds",
            "SELECT * FROM rounds",
            "SELECT interaction_id FROM choices",
            "SELECT interaction_id FROM choice_events",
            "SELECT * FROM choice_events",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                async with conn.transaction():
                    await conn.fetch(sql)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with conn.transaction():
                await conn.execute("UPDATE choices SET verdict = 'tie'")


READABLE_COLUMNS_SQL = """
SELECT c.table_name, c.column_name
FROM information_schema.columns c
WHERE c.table_schema = 'public'
  AND has_column_privilege('hps_analyst', format('%I', c.table_name), c.column_name, 'SELECT')
ORDER BY c.table_name, c.ordinal_position
"""


# Every Discord id the example stored (as the owner reads them).
DISCORD_IDS_SQL = """
SELECT discord_id AS id FROM users
UNION SELECT unnest(ARRAY[guild_id, channel_id, message_id]) FROM rounds
UNION SELECT interaction_id FROM choices
UNION SELECT interaction_id FROM choice_events
"""


async def test_nothing_the_analyst_role_reads_holds_a_discord_id(pool) -> None:  # type: ignore[no-untyped-def]
    """Every column hps_analyst may read, in every table and view, as text: none of the
    Discord ids the example stored (users', guild, channel, messages, every click's
    interaction, a mention in a ban reason), no `discord:<id>` attribution (the
    maintainer's, the users'), no /score prompt."""
    from tests.seed import MAINTAINER, snowflake

    await seed(pool)
    ids = {str(r["id"]) for r in await pool.fetch(DISCORD_IDS_SQL) if r["id"] is not None}
    ids.add(MAINTAINER.removeprefix("discord:"))
    assert len(ids) >= 40 and all(len(i) >= 18 for i in ids)  # realistic snowflakes
    assert str(snowflake(104)) in await pool.fetchval(
        "SELECT string_agg(ban_reason, '') FROM users"
    )
    columns = await pool.fetch(READABLE_COLUMNS_SQL)
    assert {"choices_flat", "users", "jobs", "model_events"} <= {c["table_name"] for c in columns}
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL ROLE hps_analyst")
        for table, column in columns:
            text = await conn.fetchval(f'SELECT string_agg("{column}"::text, \' \') FROM "{table}"')
            text = text or ""
            assert "discord:" not in text, (table, column)
            assert "my secret idea" not in text, (table, column)
            leaked = [i for i in ids if i in text]
            assert not leaked, (table, column, leaked)


# The hidden-columns table: | `table` | `column`, `column` | why |
HIDDEN_ROW = re.compile(r"^\| `(?P<table>\w+)` \| (?P<columns>(?:`\w+`(?:, )?)+) \|", re.M)

PRIVILEGES_SQL = """
SELECT c.table_name, c.column_name,
       has_column_privilege('hps_analyst', format('%I', c.table_name), c.column_name,
                            'SELECT') AS readable
FROM information_schema.columns c JOIN information_schema.tables t USING (table_schema, table_name)
WHERE c.table_schema = 'public' AND t.table_type = 'BASE TABLE'
  AND c.table_name <> 'alembic_version'
"""


async def test_the_hidden_columns_table_is_what_the_grants_hide(pool) -> None:  # type: ignore[no-untyped-def]
    """Every column the document lists as hidden is hidden, every hidden column of a table
    analysts read is listed, and every table they cannot read at all is named."""
    text = DOC.read_text()
    listed = {
        (m["table"], column.strip("` "))
        for m in HIDDEN_ROW.finditer(text)
        for column in m["columns"].split(",")
    }
    readable: dict[str, dict[str, bool]] = {}
    for r in await pool.fetch(PRIVILEGES_SQL):
        readable.setdefault(r["table_name"], {})[r["column_name"]] = r["readable"]
    hidden = {
        (table, column)
        for table, columns in readable.items()
        if any(columns.values())
        for column, ok in columns.items()
        if not ok
    }
    assert listed == hidden
    unreadable = sorted(t for t, columns in readable.items() if not any(columns.values()))
    assert unreadable == ["image_deletions", "message_deletions", "retired_pseudonyms"]
    said = text[text.index("Not readable at all:") :].split("\n\n", 1)[0]
    for table in unreadable:
        assert f"`{table}`" in said
