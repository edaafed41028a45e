"""Waiting for a lock with a deadline, and saying who holds it when the deadline passes.

The platform's own locks (the migration lock, a training kind's queue lock, the image keys'
locks) are advisory or row locks that any session of the database could also hold: a
forgotten `BEGIN` in an analyst's psql, a runaway query. A platform lock must never wait
forever on such a holder: it waits at most a few seconds (PostgreSQL's `lock_timeout`, set
for the transaction only), then the work stops with `LockTimeout`, whose message names what
could not be locked and the sessions holding it (process id, role, application, since
when), and the transaction is rolled back, so nothing is half-applied.

Advisory locks are taken by key (a bigint): `pg_locks` shows one as `classid` (high 32
bits), `objid` (low 32 bits) and `objsubid = 1`; `HOLDERS_SQL` puts the key together again.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from db.connect import Executor

ANALYST_ROLE = "hps_analyst"


class LockTimeout(Exception):
    """A platform lock could not be taken in time; nothing was changed. The message says
    what was waited for, how long, and who holds it."""


@dataclass(frozen=True)
class Holder:
    pid: int
    role: str | None
    application: str | None
    since: datetime | None  # when its transaction (or, outside one, its session) began
    analyst: bool  # a member of hps_analyst

    def describe(self) -> str:
        who = f"process {self.pid} (role {self.role or '?'}"
        if self.analyst:
            who += f", an {ANALYST_ROLE} login"
        if self.application:
            who += f", application {self.application!r}"
        if self.since is not None:
            who += f", since {self.since:%Y-%m-%d %H:%M:%S %Z}".rstrip()
        return who + ")"


CURRENT_LOCK_TIMEOUT_SQL = """
SELECT current_setting('lock_timeout')
"""

SET_LOCK_TIMEOUT_SQL = """
SELECT set_config('lock_timeout', $1, true)
"""


@asynccontextmanager
async def waiting_at_most(conn: asyncpg.Connection, limit: timedelta) -> AsyncIterator[None]:
    """Inside the caller's transaction, let every lock wait of the block last at most
    `limit` (then PostgreSQL raises `LockNotAvailableError`); the transaction's previous
    `lock_timeout` is restored after the block. An error rolls the setting back with the
    transaction (or savepoint) it aborts."""
    previous = await conn.fetchval(CURRENT_LOCK_TIMEOUT_SQL)
    await conn.execute(SET_LOCK_TIMEOUT_SQL, milliseconds(limit))
    yield
    await conn.execute(SET_LOCK_TIMEOUT_SQL, previous)


def milliseconds(limit: timedelta) -> str:
    """`limit` as a `lock_timeout` value; 0 would mean "wait forever", so at least 1 ms."""
    return f"{max(1, round(limit.total_seconds() * 1000))}ms"


# Sessions holding any of the advisory keys $1 in this database (not this session).
HOLDERS_SQL = """
SELECT DISTINCT a.pid, a.usename AS role, nullif(a.application_name, '') AS application,
       coalesce(a.xact_start, a.backend_start) AS since,
       a.usesysid IN (SELECT m.member FROM pg_auth_members m
                      JOIN pg_roles g ON g.oid = m.roleid
                      WHERE g.rolname = $2) AS analyst
FROM pg_locks l
JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 AND l.pid <> pg_backend_pid()
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND ((l.classid::bigint << 32) | l.objid::bigint) = ANY($1::bigint[])
ORDER BY since, a.pid
"""


async def holders(db: Executor, keys: list[int]) -> list[Holder]:
    """The other sessions that hold any of these advisory lock keys now."""
    return [Holder(**dict(r)) for r in await db.fetch(HOLDERS_SQL, keys, ANALYST_ROLE)]


def timed_out(what: str, limit: timedelta, found: list[Holder]) -> LockTimeout:
    """The error for `what` not locked within `limit`, naming the holders found."""
    seconds = f"{limit.total_seconds():g} s"
    if found:
        held = "; ".join(h.describe() for h in found)
        advice = (
            "End that session (SELECT pg_terminate_backend(pid)) or wait for it, then try again."
        )
        return LockTimeout(
            f"could not lock {what} within {seconds}: it is held by {held}. Nothing was "
            f"changed. {advice}"
        )
    return LockTimeout(
        f"could not lock {what} within {seconds}: another session held it (it has let go "
        "since). Nothing was changed; try again."
    )


def row_lock_timed_out(what: str, limit: timedelta) -> LockTimeout:
    """The error for rows (`what`) not locked within `limit`: another transaction is
    changing them (a click, a worker storing a round's images, a long transaction)."""
    seconds = f"{limit.total_seconds():g} s"
    return LockTimeout(
        f"could not lock {what} within {seconds}: another transaction is changing them. "
        "Nothing was changed; try again."
    )
