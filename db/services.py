"""Liveness of the long-running processes: the bot and the scheduler heartbeat their row in
`services`; workers heartbeat theirs in `workers` (`db.jobs`). `hps health` and `/status`
read both: a process is alive while its last heartbeat is fresh and it has not stopped.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from db.connect import Executor


@dataclass(frozen=True)
class Service:
    id: str
    kind: str
    hostname: str
    pid: int
    started_at: datetime
    last_seen_at: datetime
    stopped_at: datetime | None
    state: dict[str, Any]
    alive: bool = False  # as `list_services` judged it


def service_id(kind: str) -> str:
    return f"{kind}:{socket.gethostname()}:{os.getpid()}"


HEARTBEAT_SQL = """
INSERT INTO services (id, kind, hostname, pid, state)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (id) DO UPDATE
SET last_seen_at = now(), stopped_at = NULL, state = EXCLUDED.state
"""


async def heartbeat(db: Executor, kind: str, state: dict[str, Any]) -> None:
    """This process is alive, in `state` (what it reports about itself)."""
    await db.execute(
        HEARTBEAT_SQL, service_id(kind), kind, socket.gethostname(), os.getpid(), state
    )


STOP_SQL = """
UPDATE services SET stopped_at = now() WHERE id = $1
"""


async def stopped(db: Executor, kind: str) -> None:
    """This process stopped cleanly."""
    await db.execute(STOP_SQL, service_id(kind))


LIST_SQL = """
SELECT *, stopped_at IS NULL AND last_seen_at > now() - $2::interval AS alive
FROM services
WHERE ($1::text IS NULL OR kind = $1)
  AND coalesce(stopped_at, last_seen_at) > now() - $3::interval
ORDER BY last_seen_at DESC
"""


async def list_services(
    db: Executor, kind: str | None, fresh: timedelta, recent: timedelta = timedelta(days=1)
) -> list[Service]:
    """Services of `kind` (all with None) heard from within `recent`: running, or stopped or
    silent (crashed: a killed process never says it stopped) since; older rows are history,
    not news. `alive` when the last heartbeat is younger than `fresh`."""
    return [Service(**dict(r)) for r in await db.fetch(LIST_SQL, kind, fresh, recent)]


LIVE_WORKERS_SQL = """
SELECT id, kinds, hostname FROM workers
WHERE stopped_at IS NULL AND last_seen_at > now() - $1::interval
"""


async def live_workers(db: Executor, fresh: timedelta) -> list[tuple[str, list[str], str]]:
    """(id, job kinds, hostname) of the workers whose last heartbeat is younger than `fresh`."""
    return [
        (r["id"], list(r["kinds"]), r["hostname"]) for r in await db.fetch(LIVE_WORKERS_SQL, fresh)
    ]
