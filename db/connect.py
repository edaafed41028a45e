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
    # Reachable, but not for us: a wrong password or user, a database that does not exist.
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidCatalogNameError,
)


class DatabaseUnreachable(ConnectionError):
    """No connection could be opened: the server is down or unreachable, or refuses these
    credentials or this database. The message names the server (password redacted) and why,
    and says which setting to check. One of `UNAVAILABLE`."""

    def __init__(self, url: str, cause: BaseException) -> None:
        from hps.settings import redact_url

        why = str(cause) or type(cause).__name__
        super().__init__(
            f"cannot connect to the database {redact_url(url)}: {why}\n"
            "Check database_url (HPS_DATABASE_URL, or database_url in hps.toml), or leave it "
            "unset for the embedded server."
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


async def open_connection(url: str) -> asyncpg.Connection:
    """One plain asyncpg connection (no codecs); `DatabaseUnreachable` if none opens."""
    try:
        return await asyncpg.connect(url)
    except UNAVAILABLE as exc:
        raise DatabaseUnreachable(url, exc) from exc


async def connect(url: str) -> asyncpg.Connection:
    """One connection with our codecs (for LISTEN, or short CLI work)."""
    conn = await open_connection(url)
    await init_connection(conn)
    return conn


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Release without asyncpg's session reset (an open transaction is still rolled back)."""


async def create_pool(
    url: str, *, min_size: int = 1, max_size: int = 10, reset_session: bool = True
) -> asyncpg.Pool:
    """The connection pool every long-running process uses.

    By default a released connection's session is reset (`RESET ALL`, `UNLISTEN *`, ...), one
    more round trip per use. The data layer leaves no session state behind on a pool's
    connections: no SET (settings are `set_config(..., true)`, for the transaction, but for
    `db.reports.tune`, which only `hps report` uses, on a pool that resets), no
    LISTEN (`db.listen` keeps its own connection), no session-level advisory locks (only
    `pg_advisory_xact_lock` and its kin, released at commit or rollback; the migration lock
    is taken on Alembic's own connection) and no cursors outside transactions
    (`tests/db/test_migrations.py` checks the statements). So a hot path such as the bot's
    clicks may pass `reset_session=False` and save that round trip.
    """
    try:
        pool = await asyncpg.create_pool(
            url,
            min_size=min_size,
            max_size=max_size,
            init=init_connection,
            reset=None if reset_session else _keep_session,
        )
    except UNAVAILABLE as exc:
        raise DatabaseUnreachable(url, exc) from exc
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
