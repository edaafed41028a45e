"""Counts for /status, /stats and the CLI."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from db.connect import Executor

QUEUE_DEPTH_SQL = """
SELECT kind, state, count(*) AS n FROM jobs
WHERE state IN ('queued', 'running', 'dead')
GROUP BY kind, state ORDER BY kind, state
"""


async def queue_depth(db: Executor) -> dict[str, dict[str, int]]:
    """Jobs per kind and state (queued, running, dead)."""
    depth: dict[str, dict[str, int]] = {}
    for r in await db.fetch(QUEUE_DEPTH_SQL):
        depth.setdefault(r["kind"], {})[r["state"]] = r["n"]
    return depth


CHOICES_SINCE_SQL = """
SELECT count(*) FROM choices WHERE updated_at > now() - $1::interval
"""


async def choices_since(db: Executor, window: timedelta) -> int:
    """Choices made or changed within `window`."""
    return await db.fetchval(CHOICES_SINCE_SQL, window)


ROUNDS_BY_STATUS_SQL = """
SELECT status, count(*) AS n FROM rounds GROUP BY status
"""


async def rounds_by_status(db: Executor) -> dict[str, int]:
    return {r["status"]: r["n"] for r in await db.fetch(ROUNDS_BY_STATUS_SQL)}


@dataclass(frozen=True)
class UserStats:
    rounds: int
    choices: int
    picks: int
    ties: int
    nones: int


USER_STATS_SQL = """
SELECT
    (SELECT count(*) FROM rounds r WHERE r.requester_id = u.id) AS rounds,
    count(c.id) AS choices,
    count(c.id) FILTER (WHERE c.verdict = 'pick') AS picks,
    count(c.id) FILTER (WHERE c.verdict = 'tie') AS ties,
    count(c.id) FILTER (WHERE c.verdict = 'none') AS nones
FROM users u LEFT JOIN choices c ON c.user_id = u.id
WHERE u.discord_id = $1
GROUP BY u.id
"""


async def user_stats(db: Executor, discord_id: int) -> UserStats:
    record = await db.fetchrow(USER_STATS_SQL, discord_id)
    return UserStats(**dict(record)) if record else UserStats(0, 0, 0, 0, 0)


@dataclass(frozen=True)
class Totals:
    users: int
    rounds: int
    images: int
    choices: int
    choices_24h: int


TOTALS_SQL = """
SELECT
    (SELECT count(*) FROM users WHERE forgotten_at IS NULL) AS users,
    (SELECT count(*) FROM rounds) AS rounds,
    (SELECT count(*) FROM images) AS images,
    (SELECT count(*) FROM choices WHERE NOT flagged) AS choices,
    (SELECT count(*) FROM choices
     WHERE NOT flagged AND updated_at > now() - interval '24 hours') AS choices_24h
"""


async def totals(db: Executor) -> Totals:
    """The community's totals (flagged choices are not counted)."""
    return Totals(**dict(await db.fetchrow(TOTALS_SQL)))


REQUESTER_CHOICES_SINCE_TRAINING_SQL = """
SELECT count(*) FROM choices
WHERE is_requester AND NOT flagged
  AND updated_at > coalesce(
      (SELECT max(started_at) FROM jobs WHERE kind = 'train_classifier' AND state = 'done'),
      '-infinity')
"""


async def requester_choices_since_training(db: Executor) -> int:
    """Requesters' choices (not flagged) made or changed since the last classifier training
    that finished started: what a new training would learn from."""
    return await db.fetchval(REQUESTER_CHOICES_SINCE_TRAINING_SQL)
