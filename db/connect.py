"""Connections: resolving the database URL, the asyncpg pool, and transactions."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import asyncpg

if TYPE_CHECKING:
    from hps.settings import Settings

Executor = asyncpg.Connection | asyncpg.Pool

# What a database that is down, restarting or unreachable raises (as opposed to a bad query):
# a refused or reset socket, a connection that died mid-statement, an administrator's
# shutdown, a server still starting, an operation that timed out.
UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,
)


def database_url(settings: Settings) -> str:
    """The configured URL, or the embedded server's (started on first use)."""
    if settings.database_url is not None:
        return settings.database_url.get_secret_value()
    from db.embedded import embedded_database_url

    return embedded_database_url(settings.postgres_dir)


async def init_connection(conn: asyncpg.Connection) -> None:
    """Decode json/jsonb to Python objects on every connection."""
    for typename in ("json", "jsonb"):
        await conn.set_type_codec(
            typename, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )


async def connect(url: str) -> asyncpg.Connection:
    """One connection with our codecs (for LISTEN, or short CLI work)."""
    conn = await asyncpg.connect(url)
    await init_connection(conn)
    return conn


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Release without asyncpg's session reset (an open transaction is still rolled back)."""


async def create_pool(
    url: str, *, min_size: int = 1, max_size: int = 10, reset_session: bool = True
) -> asyncpg.Pool:
    """The connection pool every long-running process uses.

    By default a released connection's session is reset (`RESET ALL`, `UNLISTEN *`, ...), one
    more round trip per use. The data layer leaves no session state behind (no SET, LISTEN,
    session advisory locks or cursors outside transactions), so a hot path such as the bot's
    clicks may pass `reset_session=False` and save that round trip.
    """
    pool = await asyncpg.create_pool(
        url,
        min_size=min_size,
        max_size=max_size,
        init=init_connection,
        reset=None if reset_session else _keep_session,
    )
    assert pool is not None
    return pool


@asynccontextmanager
async def transaction(db: Executor) -> AsyncIterator[asyncpg.Connection]:
    """A transaction on a connection of `db` (a savepoint when one is already open)."""
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn, conn.transaction():
            yield conn
    else:
        async with db.transaction():
            yield db
