"""Alembic environment: runs migrations over SQLAlchemy's asyncpg dialect.

The URL is `config.attributes["database_url"]` when `hps db ...` (or a test) passes one,
else the HPS settings' URL (which may start the embedded server). An advisory lock makes
concurrent upgrades (several processes starting at once) run one after the other.
"""

from __future__ import annotations

import asyncio
import logging
from logging.config import fileConfig

from alembic import context
from sqlalchemy import pool, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from db.connect import open_connection
from db.schema import metadata

config = context.config
if config.config_file_name is not None and not config.attributes.get("skip_logging_config"):
    fileConfig(config.config_file_name, disable_existing_loggers=False)
log = logging.getLogger("alembic.env")

# Any constant works; it only has to be the same for every process migrating this database.
MIGRATION_LOCK = 0x4850535F4D4947  # "HPS_MIG"


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
    with context.begin_transaction():
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        context.run_migrations()


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
