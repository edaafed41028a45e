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
    scheme, rest = url.split("://", 1)
    return f"postgresql+asyncpg://{rest}" if scheme in ("postgres", "postgresql") else url


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
    engine = create_async_engine(_url(), poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    context.configure(url=_url(), target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_run_async())
