"""Alembic, driven from code: `hps db upgrade|downgrade|status` and the tests use these.

Alembic's commands are synchronous and its env.py runs its own event loop, so from async
code call them through `asyncio.to_thread`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

from db.connect import Executor

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["database_url"] = url
    cfg.attributes["skip_logging_config"] = True
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)


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
