"""Migrations: they apply and revert cleanly, and match what the code expects."""

from __future__ import annotations

import asyncio
import importlib
import pkgutil
import re

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import pool
from sqlalchemy.ext.asyncio import create_async_engine

import db
from db import migrate
from db.connect import connect
from db.schema import metadata
from tests.factories import ready_round

TABLES = {
    "users",
    "prompts",
    "rounds",
    "images",
    "choices",
    "choice_events",
    "model_versions",
    "model_events",
    "jobs",
    "workers",
    "retired_pseudonyms",
    "services",
    "round_messages",
    "message_deletions",
    "scorer_agreement",
    "image_deletions",
}

TABLES_SQL = """
SELECT table_name FROM information_schema.tables
WHERE table_schema = 'public' AND table_type = 'BASE TABLE'
"""


async def _tables(url: str) -> set[str]:
    conn = await connect(url)
    try:
        return {r["table_name"] for r in await conn.fetch(TABLES_SQL)} - {"alembic_version"}
    finally:
        await conn.close()


async def test_upgrade_downgrade_upgrade_on_an_empty_database(empty_database_url: str) -> None:
    assert await _tables(empty_database_url) == set()
    await asyncio.to_thread(migrate.upgrade, empty_database_url)
    assert await _tables(empty_database_url) == TABLES
    await asyncio.to_thread(migrate.downgrade, empty_database_url, "base")
    assert await _tables(empty_database_url) == set()
    await asyncio.to_thread(migrate.upgrade, empty_database_url)
    assert await _tables(empty_database_url) == TABLES
    conn = await connect(empty_database_url)
    try:
        state = await migrate.status(conn)
    finally:
        await conn.close()
    assert state.up_to_date and state.current == migrate.head_revision()


async def test_status_reports_pending_migrations(empty_database_url: str) -> None:
    conn = await connect(empty_database_url)
    try:
        state = await migrate.status(conn)
    finally:
        await conn.close()
    assert state.current is None
    assert state.pending and state.pending[-1] == state.head
    assert not state.up_to_date


async def test_no_drift_between_migrations_and_declared_schema(database_url: str) -> None:
    engine = create_async_engine(
        database_url.replace("postgresql://", "postgresql+asyncpg://"), poolclass=pool.NullPool
    )

    def diff(sync_conn):  # type: ignore[no-untyped-def]
        context = MigrationContext.configure(sync_conn, opts={"compare_type": True})
        return compare_metadata(context, metadata)

    try:
        async with engine.connect() as conn:
            differences = await conn.run_sync(diff)
    finally:
        await engine.dispose()
    assert differences == []


def _all_statements() -> list[tuple[str, str]]:
    statements = []
    for info in pkgutil.iter_modules(db.__path__):
        module = importlib.import_module(f"db.{info.name}")
        for name, value in vars(module).items():
            if name.endswith("_SQL") and isinstance(value, str):
                statements.append((f"db.{info.name}.{name}", value))
    return statements


def test_the_data_layer_keeps_its_sql_in_named_statements() -> None:
    names = {name for name, _ in _all_statements()}
    assert "db.choices.RECORD_CHOICE_SQL" in names
    assert "db.jobs.CLAIM_SQL" in names
    assert len(names) > 60


# What would outlive a transaction on a pooled connection (pools may skip the session reset,
# `db.connect.create_pool`): session-level advisory locks, session settings.
SESSION_STATE = re.compile(
    r"pg_(try_)?advisory_(lock|unlock)|set_config\([^)]*,\s*false\s*\)|\A\s*SET\s+(?!LOCAL\b)",
    re.IGNORECASE,
)


def test_the_data_layer_leaves_no_session_state_on_pooled_connections() -> None:
    leaving = [name for name, sql in _all_statements() if SESSION_STATE.search(sql)]
    # The report's settings, for its own connections of a pool that resets (`hps report`).
    assert leaving == ["db.reports.TUNE_SQL"]
    assert SESSION_STATE.search("SELECT pg_advisory_lock(1)")
    assert SESSION_STATE.search("SELECT pg_advisory_unlock_all()")
    assert not SESSION_STATE.search("SELECT pg_try_advisory_xact_lock(1)")
    assert SESSION_STATE.search("SET statement_timeout = 0")
    assert not SESSION_STATE.search("UPDATE t\nSET a = 1")


async def test_every_statement_of_the_data_layer_prepares_against_head(pool) -> None:  # type: ignore[no-untyped-def]
    """Preparing checks every table, column, type and parameter a query names."""
    failures = []
    async with pool.acquire() as conn:
        for name, sql in _all_statements():
            try:
                await conn.prepare(sql)
            except asyncpg.PostgresError as exc:
                failures.append(f"{name}: {exc}")
    assert failures == []


async def test_choices_flat_has_one_row_per_choice(pool) -> None:  # type: ignore[no-untyped-def]
    from db.choices import record_choice

    round_id = await ready_round(pool, requester=1, k=4, nsfw_positions=(3,))
    await record_choice(pool, round_id=round_id, discord_user_id=1, verdict="pick", position=2)
    await record_choice(pool, round_id=round_id, discord_user_id=2, verdict="tie")
    rows = await pool.fetch("SELECT * FROM choices_flat ORDER BY choice_id")
    assert len(rows) == 2
    respelled = await ready_round(pool, requester=3, k=2, prompt="A Red  Cube")
    await record_choice(pool, round_id=respelled, discord_user_id=3, verdict="tie")
    prompts = await pool.fetch("SELECT DISTINCT prompt FROM choices_flat ORDER BY prompt")
    assert [r["prompt"] for r in prompts] == ["A Red  Cube", "a red cube"]  # as written
    first, second = rows
    assert first["prompt"] == "a red cube"
    assert first["is_requester"] and not second["is_requester"]
    assert first["verdict"] == "pick" and first["chosen_position"] == 2
    assert first["chosen_image_key"] == first["image_keys"][1]
    assert first["shown_count"] == 3 and first["shown_positions"] == [1, 2, 4]
    assert first["requester"] == first["chooser"] != second["chooser"]
    assert second["verdict"] == "tie" and second["chosen_image_key"] is None
    assert "discord_id" not in first


async def test_choice_events_are_append_only(pool) -> None:  # type: ignore[no-untyped-def]
    from db.choices import record_choice

    round_id = await ready_round(pool, requester=1)
    await record_choice(pool, round_id=round_id, discord_user_id=1, verdict="none")
    with pytest.raises(asyncpg.RaiseError, match="append-only"):
        await pool.execute("UPDATE choice_events SET verdict = 'tie'")


async def test_schema_checks_reject_impossible_rows(pool) -> None:  # type: ignore[no-untyped-def]
    round_id = await ready_round(pool, requester=1, k=2)
    user_id = await pool.fetchval("SELECT id FROM users")
    with pytest.raises(asyncpg.CheckViolationError):
        await pool.execute("UPDATE rounds SET status = 'exploded' WHERE id = $1", round_id)
    with pytest.raises(asyncpg.CheckViolationError):  # a pick without a position
        await pool.execute(
            "INSERT INTO choices (round_id, user_id, verdict, is_requester)"
            " VALUES ($1, $2, 'pick', true)",
            round_id,
            user_id,
        )
    with pytest.raises(asyncpg.ForeignKeyViolationError):  # a position that was not shown
        await pool.execute(
            "INSERT INTO choices (round_id, user_id, verdict, chosen_position, is_requester)"
            " VALUES ($1, $2, 'pick', 7, true)",
            round_id,
            user_id,
        )
    with pytest.raises(asyncpg.UniqueViolationError):  # two serving versions of a kind
        await pool.execute(
            "INSERT INTO model_versions (kind, name, artifact, status) VALUES"
            " ('classifier', 'a', 'x', 'serving'), ('classifier', 'b', 'y', 'serving')"
        )


CATALOG_SQL = {
    "columns": """
        SELECT table_name || '.' || column_name || ' ' || data_type || ' '
               || CASE WHEN is_nullable = 'YES' THEN 'null' ELSE 'not null' END || ' '
               || coalesce(column_default, '-')
        FROM information_schema.columns WHERE table_schema = 'public'
          AND table_name IN (SELECT tablename FROM pg_tables WHERE schemaname = 'public')
    """,
    "constraints": """
        SELECT conrelid::regclass::text || ' ' || conname || ' ' || pg_get_constraintdef(oid)
        FROM pg_constraint WHERE connamespace = 'public'::regnamespace
    """,
    "indexes": """
        SELECT indexdef FROM pg_indexes WHERE schemaname = 'public'
    """,
}


async def _catalog(url: str) -> dict[str, set[str]]:
    conn = await connect(url)
    try:
        return {
            part: {r[0] for r in await conn.fetch(sql)} - {None}
            for part, sql in CATALOG_SQL.items()
        }
    finally:
        await conn.close()


async def test_the_migrated_catalog_is_the_declared_schema(
    database_url: str, empty_database_url: str
) -> None:
    """Alembic's comparison ignores CHECK constraints, server defaults and partial-index
    conditions: compare PostgreSQL's own catalog of the migrated database with one made
    from `db/schema.py` directly, so the checks the queries rely on cannot drift either."""
    engine = create_async_engine(
        empty_database_url.replace("postgresql://", "postgresql+asyncpg://"),
        poolclass=pool.NullPool,
    )
    try:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
    finally:
        await engine.dispose()
    migrated, declared = await _catalog(database_url), await _catalog(empty_database_url)
    migrated["indexes"] = {i for i in migrated["indexes"] if "alembic_version" not in i}
    migrated["constraints"] = {c for c in migrated["constraints"] if "alembic_version" not in c}
    migrated["columns"] = {c for c in migrated["columns"] if not c.startswith("alembic_version.")}
    for part in CATALOG_SQL:
        only_migrated = sorted(migrated[part] - declared[part])
        only_declared = sorted(declared[part] - migrated[part])
        assert (part, only_migrated, only_declared) == (part, [], [])


BEFORE_0016_SQL = """
INSERT INTO users (id, discord_id, pseudonym) OVERRIDING SYSTEM VALUE VALUES (1, 101, 'u1');
INSERT INTO prompts (id, text, negative_text, norm_hash) OVERRIDING SYSTEM VALUE
VALUES (1, 'A  Red Castle', 'blurry', 'h1'), (2, 'a red castle', '', 'h2'), (3, 'Straße', '', 'h3');
INSERT INTO model_versions (id, kind, name, artifact, status) OVERRIDING SYSTEM VALUE
VALUES (1, 'sd_base', 'base', 'x', 'serving'), (2, 'sd_adapter', 'adapter', 'y', 'testing');
INSERT INTO rounds (id, prompt_id, requester_id, k, status) OVERRIDING SYSTEM VALUE
VALUES (1, 1, 1, 4, 'ready'), (2, 2, 1, 4, 'ready'), (3, 3, 1, 4, 'failed');
INSERT INTO jobs (kind, state, result) VALUES
('generate', 'done', '{"round_id": 1, "status": "ready",
                       "plan": {"incumbent": 1, "candidate": 2, "versions": [1, 2, 2, 1]}}'),
('generate', 'done', '{"round_id": 3, "status": "failed",
                       "plan": {"incumbent": 1, "candidate": null, "versions": [1, 1, 1, 1]}}');
"""


async def test_migration_0016_keys_prompts_by_text_and_rounds_by_their_incumbent(
    empty_database_url: str,
) -> None:
    from db.prompts import text_hash

    await asyncio.to_thread(migrate.upgrade, empty_database_url, "0015")
    conn = await connect(empty_database_url)
    try:
        await conn.execute(BEFORE_0016_SQL)
        await asyncio.to_thread(migrate.upgrade, empty_database_url)
        hashes = await conn.fetch("SELECT id, text_hash FROM prompts ORDER BY id")
        incumbents = await conn.fetch("SELECT id, incumbent_version_id FROM rounds ORDER BY id")
    finally:
        await conn.close()
    # The same text (as normalised: spaces, case) whatever its negative prompt; casefold's ß.
    assert [tuple(r) for r in hashes] == [
        (1, text_hash("a red castle")), (2, text_hash("a red castle")), (3, text_hash("strasse"))
    ]  # fmt: skip
    # From the plan of the job that made the round ready; a failed round's plan is not one.
    assert [tuple(r) for r in incumbents] == [(1, 1), (2, None), (3, None)]
