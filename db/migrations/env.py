"""Alembic environment: runs migrations over SQLAlchemy's asyncpg dialect.

The URL is `config.attributes["database_url"]` when `hps db ...` (or a test) passes one,
else the HPS settings' URL (which may start the embedded server). An advisory lock makes
concurrent upgrades (several processes starting at once) run one after the other. How long
the lock and each table's lock are waited for: `db.migrate` (module docstring).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from logging.config import fileConfig

from alembic import context
from sqlalchemy import pool, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from db import locks
from db.connect import open_connection
from db.migrate import (
    LOCK_WAIT,
    MIGRATION_LOCK,
    TABLE_LOCK_TIMEOUT,
    MigrationLockTimeout,
    TableLockTimeout,
)
from db.schema import metadata

config = context.config
if config.config_file_name is not None and not config.attributes.get("skip_logging_config"):
    fileConfig(config.config_file_name, disable_existing_loggers=False)
log = logging.getLogger("alembic.env")

LOCK_NOT_AVAILABLE = "55P03"  # SQLSTATE of a lock_timeout


def _url() -> str:
    url = config.attributes.get("database_url")
    if url is None:
        from db.connect import database_url
        from hps.settings import get_settings

        url = database_url(get_settings())
    return url


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        compare_type=True,
        transaction_per_migration=False,
    )
    lock_wait = config.attributes.get("lock_wait", LOCK_WAIT)
    table_lock_timeout = config.attributes.get("table_lock_timeout", TABLE_LOCK_TIMEOUT)
    with context.begin_transaction():
        _take_migration_lock(connection, lock_wait)
        _set_lock_timeout(connection, table_lock_timeout)
        try:
            context.run_migrations()
        except DBAPIError as exc:
            if getattr(exc.orig, "sqlstate", None) != LOCK_NOT_AVAILABLE:
                raise
            raise TableLockTimeout(
                f"a migration waited more than {table_lock_timeout.total_seconds():g} s for "
                f"a table that another session is using ({exc.orig})."
            ) from None


def _set_lock_timeout(connection: Connection, limit: timedelta) -> None:
    connection.exec_driver_sql(locks.SET_LOCK_TIMEOUT_SQL, (locks.milliseconds(limit),))


def _take_migration_lock(connection: Connection, wait: timedelta) -> None:
    """The migration lock, waited for at most `wait`; `MigrationLockTimeout` (naming who
    holds it) after that."""
    key = {"key": MIGRATION_LOCK}
    if connection.execute(text("SELECT pg_try_advisory_xact_lock(:key)"), key).scalar():
        return
    found = [
        locks.Holder(**row._asdict())
        for row in connection.exec_driver_sql(
            locks.HOLDERS_SQL, ([MIGRATION_LOCK], locks.ANALYST_ROLE)
        )
    ]
    log.info("waiting for the migration lock: %s", "; ".join(h.describe() for h in found))
    _set_lock_timeout(connection, wait)
    try:
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), key)
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) != LOCK_NOT_AVAILABLE:
            raise
        # Said as the caller asked (a retry after a table's lock waits what is left of it).
        error = locks.timed_out(
            "the migration lock", config.attributes.get("lock_wait_total", wait), found
        )
        raise MigrationLockTimeout(str(error)) from None


async def _run_async() -> None:
    # asyncpg itself reads the URL, as the application's pool does: SQLAlchemy would pass
    # libpq query options such as `?sslmode=require` on as keyword arguments asyncpg lacks.
    url = _url()
    engine = create_async_engine(
        "postgresql+asyncpg://",
        async_creator=lambda: open_connection(url),
        poolclass=pool.NullPool,
    )
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    # SQL scripts only need the dialect (`alembic upgrade --sql`), not a connection.
    context.configure(dialect_name="postgresql", target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_run_async())
