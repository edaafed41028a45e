"""Analysts who cannot stall the platform (issue 11, part 4).

An analyst here is what docs/deploy.md tells a maintainer to create: a login of its own in
the group role `hps_analyst`, connecting to the platform's database. Each test runs the
analyst's attempts over that login, and shows the platform migrating, enqueueing and
forgetting within its own timeouts, or stopping with a clear error and nothing changed
where a foreign session holds one of its locks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from db import analysts, images, jobs, locks, migrate, users
from db.choices import record_choice
from hps.settings import AnalystSettings
from hps.store import LocalImageStore
from tests.conftest import admin_url, unique_name
from tests.factories import ready_round

# Short limits, so that the tests see them act.
LIMITS = AnalystSettings(
    statement_timeout_seconds=30,
    idle_in_transaction_seconds=2,
    lock_timeout_seconds=1,
    connection_limit=2,
)
TRAINING_KEY_SQL = "SELECT hashtext('hps_jobs:train_classifier')::bigint"
OUR_ADVISORY_LOCKS_SQL = """
SELECT count(*) FROM pg_locks
WHERE locktype = 'advisory'
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


def _as(url: str, user: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{user}@{parts.hostname}:{parts.port or 5432}"))


@pytest.fixture
async def analyst(pool: asyncpg.Pool, database_url: str) -> AsyncIterator[str]:
    """The URL of a fresh analyst login, with the policy applied to this database."""
    name = unique_name("analyst")
    admin = await asyncpg.connect(admin_url())
    try:
        await admin.execute(f"CREATE ROLE {name} LOGIN IN ROLE hps_analyst")
        assert await analysts.secure(pool, LIMITS) == []
        yield _as(database_url, name)
    finally:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", name
        )
        await admin.execute(f"DROP ROLE IF EXISTS {name}")
        await admin.close()


async def test_an_analyst_login_has_its_limits_and_nothing_but_reading(
    pool: asyncpg.Pool, analyst: str
) -> None:
    conn = await asyncpg.connect(analyst)
    try:
        assert await conn.fetchval("SHOW statement_timeout") == "30s"
        assert await conn.fetchval("SHOW idle_in_transaction_session_timeout") == "2s"
        assert await conn.fetchval("SHOW lock_timeout") == "1s"
        assert await conn.fetchval("SELECT count(*) FROM choices_flat") == 0  # reads
        refused = [
            "CREATE TEMP TABLE mine (x int)",
            "CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
            "CREATE FUNCTION public.f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
            "CREATE TABLE public.mine (x int)",
            "SELECT lo_creat(-1)",
            "SELECT lo_create(0)",
            "SELECT lo_from_bytea(0, 'x')",
            f"SELECT pg_advisory_lock({migrate.MIGRATION_LOCK})",
            f"SELECT pg_try_advisory_lock({migrate.MIGRATION_LOCK})",
            f"SELECT pg_advisory_lock_shared({migrate.MIGRATION_LOCK})",
            "SELECT pg_advisory_xact_lock(hashtext('hps_jobs:train_classifier'))",
            "SELECT pg_advisory_lock(hashtextextended('hps_image:ab/cd/x.png', 0))",
            "SELECT pg_advisory_lock(1, 2)",
        ]
        for sql in refused:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(sql)
        # A session idle inside a transaction is ended by the server.
        await conn.execute("BEGIN")
        await conn.fetchval("SELECT count(*) FROM rounds")
        await asyncio.sleep(3)
        assert conn.is_closed()
    finally:
        await conn.close()
    # At most `connection_limit` connections at once.
    held = [await asyncpg.connect(analyst) for _ in range(LIMITS.connection_limit)]
    try:
        with pytest.raises(asyncpg.TooManyConnectionsError):
            await asyncpg.connect(analyst)
    finally:
        for conn in held:
            await conn.close()
    listed = {login.name: login for login in await analysts.logins(pool)}
    login = listed[urlsplit(analyst).username]
    assert login.connection_limit == 2
    assert sorted(login.settings) == [
        "idle_in_transaction_session_timeout=2s",
        "lock_timeout=1s",
        "statement_timeout=30s",
    ]


async def test_the_platform_migrates_enqueues_and_forgets_while_an_analyst_tries_to_stall_it(
    pool: asyncpg.Pool, database_url: str, analyst: str, tmp_path: Path
) -> None:
    store = LocalImageStore(tmp_path)
    mine = await ready_round(pool, requester=1, prompt="mine")
    for position in range(1, 5):
        store.put(f"round {mine} image {position}".encode())
    await record_choice(pool, round_id=mine, discord_user_id=1, verdict="pick", position=1)
    await asyncio.to_thread(migrate.downgrade, database_url, "0007")

    conn = await asyncpg.connect(analyst)
    try:
        # The analyst tries every lock of the platform's, and is refused each.
        for sql in (
            f"SELECT pg_advisory_lock({migrate.MIGRATION_LOCK})",
            "SELECT pg_advisory_lock(hashtext('hps_jobs:train_classifier'))",
            "SELECT pg_advisory_lock(hashtextextended('hps_image:' || $1, 0))",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(sql, *(["k"] if "$1" in sql else []))
        # ... and leaves a transaction open on a table the pending migrations alter.
        await conn.execute("BEGIN")
        assert await conn.fetchval("SELECT count(*) FROM rounds") == 1
        await conn.execute("NOTIFY hps_models, 'forged'")  # allowed, and only a wake-up

        started = time.monotonic()
        await asyncio.to_thread(migrate.upgrade, database_url, lock_wait=timedelta(seconds=60))
        migrated = time.monotonic() - started
        # It waited for the analyst's idle transaction to be ended (2 s), no longer.
        assert 1.5 < migrated < 20
        assert conn.is_closed()
    finally:
        await conn.close()
    status = await migrate.status(pool)
    assert status.up_to_date

    conn = await asyncpg.connect(analyst)
    try:
        # Reading in an open transaction holds nothing the platform's writes wait for.
        await conn.execute("BEGIN")
        await conn.fetchval("SELECT count(*) FROM jobs, images, users, choices_flat")
        started = time.monotonic()
        _, created = await jobs.enqueue_training(pool, "classifier", requested_by="test")
        assert created and time.monotonic() - started < 2
        forgotten = await users.forget_user(pool, 1, delete=store.delete)
        assert forgotten.rounds_deleted == 1 and forgotten.files_deleted == 4
        assert not any(store.exists(k) for k in forgotten.orphaned_image_keys)
    finally:
        await conn.close()


@pytest.fixture
async def foreign() -> AsyncIterator[asyncpg.Connection]:
    """A session the platform does not control, free to take advisory locks (an analyst
    where the policy could not be applied, another program): here a superuser's psql."""
    conn = await asyncpg.connect(admin_url(), server_settings={"application_name": "psql"})
    try:
        yield conn
    finally:
        await conn.close()


async def _holding(foreign: asyncpg.Connection, database_url: str) -> asyncpg.Connection:
    """The foreign session, connected to the test's database."""
    await foreign.close()
    parts = urlsplit(database_url)
    return await asyncpg.connect(
        urlunsplit(parts._replace(netloc=f"postgres@{parts.hostname}:{parts.port or 5432}")),
        server_settings={"application_name": "psql"},
    )


async def test_a_foreign_holder_of_a_platform_lock_gets_a_clear_error_and_nothing_changes(
    pool: asyncpg.Pool, database_url: str, foreign: asyncpg.Connection, tmp_path: Path
) -> None:
    holder = await _holding(foreign, database_url)
    pid = await holder.fetchval("SELECT pg_backend_pid()")
    try:
        # The training queue's lock.
        await holder.execute("SELECT pg_advisory_lock($1)", await pool.fetchval(TRAINING_KEY_SQL))
        started = time.monotonic()
        with pytest.raises(locks.LockTimeout) as error:
            await jobs.enqueue_training(
                pool, "classifier", requested_by="test", lock_timeout=timedelta(seconds=0.5)
            )
        assert time.monotonic() - started < 3
        assert str(error.value).startswith(
            f"could not lock the train_classifier queue within 0.5 s: it is held by process "
            f"{pid} (role postgres, application 'psql', since "
        )
        assert str(error.value).endswith(
            "Nothing was changed. End that session (SELECT pg_terminate_backend(pid)) or wait "
            "for it, then try again."
        )
        assert await pool.fetchval("SELECT count(*) FROM jobs WHERE kind = 'train_classifier'") == 0
        await holder.execute("SELECT pg_advisory_unlock_all()")
        assert (await jobs.enqueue_training(pool, "classifier", requested_by="test"))[1]

        # An image key of the user to forget: it holds up nothing. The rows go at once, and
        # the files but the held one; that one waits, recorded, and goes once let go.
        store = LocalImageStore(tmp_path)
        mine = await ready_round(pool, requester=1, prompt="mine")
        keys = [store.put(f"round {mine} image {p}".encode()).key for p in range(1, 5)]
        await record_choice(pool, round_id=mine, discord_user_id=1, verdict="pick", position=1)
        await holder.execute("BEGIN")
        await holder.execute(
            "SELECT pg_advisory_xact_lock_shared(hashtextextended('hps_image:' || $1, 0))",
            keys[2],
        )
        started = time.monotonic()
        forgotten = await users.forget_user(
            pool, 1, delete=store.delete, lock_timeout=timedelta(seconds=0.5)
        )
        assert time.monotonic() - started < 3
        assert (forgotten.files_deleted, forgotten.files_pending) == (3, 1)
        assert await pool.fetchval("SELECT count(*) FROM rounds") == 0
        assert await pool.fetchval("SELECT count(*) FROM choices") == 0
        assert [store.exists(k) for k in keys] == [False, False, True, False]
        # The forget held no lock after it: the holder's writer side goes on.
        await holder.execute("COMMIT")
        assert await pool.fetchval(OUR_ADVISORY_LOCKS_SQL) == 0
        swept = await images.delete_pending(pool, store.delete, keys=[keys[2]])
        assert swept.deleted == 1 and not any(store.exists(k) for k in keys)

        # The migration lock.
        await holder.execute("SELECT pg_advisory_lock($1)", migrate.MIGRATION_LOCK)
        started = time.monotonic()
        with pytest.raises(migrate.MigrationLockTimeout) as failed:
            await asyncio.to_thread(migrate.upgrade, database_url, lock_wait=timedelta(seconds=0.5))
        assert time.monotonic() - started < 10
        assert str(failed.value).startswith(
            f"could not lock the migration lock within 0.5 s: it is held by process {pid} "
            "(role postgres, application 'psql', since "
        )
    finally:
        await holder.close()


async def test_a_migration_gives_up_on_a_table_held_too_long_with_nothing_applied(
    pool: asyncpg.Pool, database_url: str, foreign: asyncpg.Connection
) -> None:
    await asyncio.to_thread(migrate.downgrade, database_url, "0007")
    holder = await _holding(foreign, database_url)
    try:
        await holder.execute("BEGIN")
        await holder.fetchval("SELECT count(*) FROM rounds")  # a long read, say
        started = time.monotonic()
        with pytest.raises(migrate.MigrationLockTimeout) as failed:
            await asyncio.to_thread(migrate.upgrade, database_url, lock_wait=timedelta(seconds=4))
        assert 3 < time.monotonic() - started < 15
        assert str(failed.value).startswith(
            f"a migration waited more than {migrate.TABLE_LOCK_TIMEOUT.total_seconds():g} s "
            "for a table that another session is using ("
        )
        assert "Tried again for 4 s; nothing was applied." in str(failed.value)
        assert (await migrate.status(pool)).current == "0007"
    finally:
        await holder.close()
    await asyncio.to_thread(migrate.upgrade, database_url)
    assert (await migrate.status(pool)).up_to_date


async def test_hps_db_analysts_applies_the_configured_limits_or_says_what_it_cannot(
    pool: asyncpg.Pool, database_url: str, analyst: str
) -> None:
    from tests.test_cli import hps

    login = urlsplit(analyst).username
    done = await asyncio.to_thread(hps, "db", "analysts", env={"HPS_DATABASE_URL": database_url})
    assert done.returncode == 0, done.stderr
    assert f"{login}: 4 connection(s); statement_timeout=120s, " in done.stdout
    # Run by a role that may change nothing (the analyst itself): each part is named.
    refused = await asyncio.to_thread(hps, "db", "analysts", env={"HPS_DATABASE_URL": analyst})
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    for what in (
        "analysts' policy not applied: TEMPORARY on the database: only its owner or a "
        "superuser may revoke it",
        "analysts' policy not applied: the advisory lock and large object functions: only a "
        "superuser may revoke them (run `hps db analysts` as one)",
        f"analysts' policy not applied: the limits of login {login}: only a superuser or a "
        "role administrator may set them",
    ):
        assert what in " ".join(refused.stderr.split()), what


async def test_revoking_connect_as_docs_deploy_says_keeps_the_analyst_out(analyst: str) -> None:
    """docs/deploy.md (Analysts): the cluster's other databases refuse the analysts' role
    once CONNECT is revoked from PUBLIC."""
    from tests.conftest import url_for

    other = unique_name("other_app")
    admin = await asyncpg.connect(admin_url())
    try:
        await admin.execute(f'CREATE DATABASE "{other}"')
        login = urlsplit(analyst).username
        elsewhere = _as(url_for(other), login)
        conn = await asyncpg.connect(elsewhere)  # by default, every database lets it in
        await conn.close()
        await admin.execute(f'REVOKE CONNECT ON DATABASE "{other}" FROM PUBLIC')
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
            await asyncpg.connect(elsewhere)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{other}" WITH (FORCE)')
        await admin.close()
