"""Alembic, driven from code: `hps db upgrade|downgrade|status` and the tests use these.

Alembic's commands are synchronous and its env.py runs its own event loop, so from async
code call them through `asyncio.to_thread`.

**Locks.** Migrating never waits forever, nor stalls the platform for long:
- the migration lock (an advisory lock: several processes upgrading at once apply the
  migrations one after the other) is waited for at most `lock_wait`; then
  `MigrationLockTimeout` names who holds it;
- each statement of a migration waits at most `TABLE_LOCK_TIMEOUT` for a table's lock: a
  table another session reads (an analyst's long query, a transaction left open) would
  otherwise hold the migration, and every query of the platform queued behind the
  migration's request, as long as that session likes. On such a timeout the migrations'
  one transaction is rolled back and tried again `RETRY_PAUSE` later, until `lock_wait`
  has passed; then `MigrationLockTimeout`, with nothing applied. (The analysts' logins have
  statement and idle-in-transaction timeouts, `db.analysts`, shorter than `LOCK_WAIT`.)

After upgrading, `hps db upgrade` (and `hps serve`) apply the analysts' policy
(`db.analysts.secure`): the privileges and limits that are not part of the schema (and that a
restore or a clone loses).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

from db.connect import Executor, connect

if TYPE_CHECKING:
    from hps.settings import AnalystSettings

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

# Any constant works; it only has to be the same for every process migrating a database.
MIGRATION_LOCK = 0x4850535F4D4947  # "HPS_MIG"
LOCK_WAIT = timedelta(minutes=5)
TABLE_LOCK_TIMEOUT = timedelta(seconds=3)
RETRY_PAUSE = timedelta(seconds=2)


class MigrationLockTimeout(Exception):
    """Migrating waited its time for a lock and stopped; nothing was applied."""


class TableLockTimeout(MigrationLockTimeout):
    """One try of the migrations waited `TABLE_LOCK_TIMEOUT` for a table (tried again)."""


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["database_url"] = url
    cfg.attributes["skip_logging_config"] = True
    return cfg


def upgrade(
    url: str,
    revision: str = "head",
    *,
    lock_wait: timedelta = LOCK_WAIT,
    analysts: AnalystSettings | None = None,
) -> list[str]:
    """Apply the migrations up to `revision`, then, given the analysts' limits (`hps db
    upgrade` gives the configured ones), the analysts' policy; returns what of the policy
    could not be applied (see `db.analysts.secure`)."""
    _with_lock_timeouts(command.upgrade, url, revision, lock_wait)
    return [] if analysts is None else asyncio.run(_secure(url, analysts))


def downgrade(url: str, revision: str, *, lock_wait: timedelta = LOCK_WAIT) -> None:
    _with_lock_timeouts(command.downgrade, url, revision, lock_wait)


def _with_lock_timeouts(run, url: str, revision: str, lock_wait: timedelta) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + lock_wait.total_seconds()
    while True:
        cfg = alembic_config(url)
        cfg.attributes["lock_wait"] = timedelta(seconds=max(0.001, deadline - time.monotonic()))
        cfg.attributes["lock_wait_total"] = lock_wait
        cfg.attributes["table_lock_timeout"] = TABLE_LOCK_TIMEOUT
        try:
            run(cfg, revision)
            return
        except TableLockTimeout as exc:
            if time.monotonic() + RETRY_PAUSE.total_seconds() >= deadline:
                raise MigrationLockTimeout(
                    f"{exc} Tried again for {lock_wait.total_seconds():g} s; nothing was "
                    "applied. Find the session with pg_stat_activity (a long query or an "
                    "open transaction), end it or wait for it, then upgrade again."
                ) from None
            time.sleep(RETRY_PAUSE.total_seconds())


async def _secure(url: str, analysts: AnalystSettings) -> list[str]:
    from db import analysts as policy

    conn = await connect(url)
    try:
        return await policy.secure(conn, analysts)
    finally:
        await conn.close()


@dataclass(frozen=True)
class MigrationStatus:
    current: str | None
    head: str
    pending: list[str]  # revisions not yet applied, oldest first

    @property
    def up_to_date(self) -> bool:
        return not self.pending


CURRENT_REVISION_SQL = """
SELECT version_num FROM alembic_version
"""

VERSION_TABLE_EXISTS_SQL = """
SELECT to_regclass('alembic_version') IS NOT NULL
"""


def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config(""))


def head_revision() -> str:
    head = _script().get_current_head()
    assert head is not None
    return head


class UnknownRevision(Exception):
    """The database was migrated by a newer checkout than this one."""


async def status(conn: Executor) -> MigrationStatus:
    """Where the database stands against the migrations in this checkout."""
    current = None
    if await conn.fetchval(VERSION_TABLE_EXISTS_SQL):
        current = await conn.fetchval(CURRENT_REVISION_SQL)
    script = _script()
    head = head_revision()
    if current is not None and current not in {rev.revision for rev in script.walk_revisions()}:
        raise UnknownRevision(
            f"the database is at revision {current}, which this checkout does not have "
            f"(its newest is {head}): it was migrated by a newer version of the code"
        )
    pending = [rev.revision for rev in script.iterate_revisions(head, current or "base")]
    return MigrationStatus(current=current, head=head, pending=list(reversed(pending)))
