"""Counts for /status, /stats and the CLI."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from db import models
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


# A training that skipped (too few examples) trained nothing: it does not reset the count.
REQUESTER_CHOICES_SINCE_TRAINING_SQL = """
SELECT count(*) FROM choices
WHERE is_requester AND NOT flagged
  AND updated_at > coalesce(
      (SELECT max(started_at) FROM jobs
       WHERE kind = 'train_classifier' AND state = 'done'
         AND result->>'status' IS DISTINCT FROM 'skipped'),
      '-infinity')
"""


async def requester_choices_since_training(db: Executor) -> int:
    """Requesters' choices (not flagged) made or changed since the last classifier training
    that trained (finished, not skipped) started: what a new training would learn from.
    Clicking the same verdict again does not count as a change."""
    return await db.fetchval(REQUESTER_CHOICES_SINCE_TRAINING_SQL)


@dataclass(frozen=True)
class QueueTimings:
    """Finished jobs of one kind: how fast they were picked up and got through."""

    jobs: int
    workers: int  # distinct workers that finished them
    pickup_p50_ms: float | None  # enqueue (or last retry) → claim
    pickup_p99_ms: float | None
    pickup_max_ms: float | None
    span_seconds: float | None  # first enqueue → last finish
    drain_seconds: float | None  # first claim → last finish


QUEUE_TIMINGS_SQL = """
WITH done AS (
    SELECT worker_id, created_at, started_at, finished_at,
           extract(epoch FROM started_at - greatest(created_at, run_after)) * 1000 AS pickup_ms
    FROM jobs
    WHERE kind = $1 AND state = 'done' AND created_at > now() - $2::interval
)
SELECT count(*) AS jobs,
       count(DISTINCT worker_id) AS workers,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY pickup_ms) AS pickup_p50_ms,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY pickup_ms) AS pickup_p99_ms,
       max(pickup_ms)::float8 AS pickup_max_ms,
       extract(epoch FROM max(finished_at) - min(created_at))::float8 AS span_seconds,
       extract(epoch FROM max(finished_at) - min(started_at))::float8 AS drain_seconds
FROM done
"""


async def queue_timings(db: Executor, kind: str, window: timedelta) -> QueueTimings:
    """Pick-up latency and span of the jobs of `kind` enqueued within `window` and done."""
    return QueueTimings(**dict(await db.fetchrow(QUEUE_TIMINGS_SQL, kind, window)))


@dataclass(frozen=True)
class LiveResult:
    """A version's live A/B record against one opponent (the `ab_win_rates` view): rounds
    that showed both and that the requester decided by picking an image, the rounds its
    image won, and the win rate with its Wilson 95% interval."""

    version_id: int
    opponent_id: int
    rounds: int
    wins: int
    win_rate: float
    low: float
    high: float

    def as_json(self) -> dict[str, float | int]:
        return {
            "opponent_id": self.opponent_id,
            "rounds": self.rounds,
            "wins": self.wins,
            "win_rate": self.win_rate,
            "win_rate_ci": [self.low, self.high],
        }


LIVE_RESULTS_SQL = """
SELECT version_id, opponent_id, rounds, wins, win_rate,
       win_rate_low AS low, win_rate_high AS high
FROM ab_win_rates
WHERE version_id = ANY($1::bigint[]) AND opponent_id = $2
"""


async def live_results(
    db: Executor, version_ids: list[int], opponent_id: int
) -> dict[int, LiveResult]:
    """Each version's live record against `opponent_id`, read from the analysts' view so
    that the platform's decisions and the analysts' numbers agree. Versions never shown
    beside the opponent in a decided round are absent."""
    if not version_ids:
        return {}
    records = await db.fetch(LIVE_RESULTS_SQL, version_ids, opponent_id)
    return {r["version_id"]: LiveResult(**dict(r)) for r in records}


async def live_records(
    db: Executor, versions: list[models.ModelVersion]
) -> dict[int, dict[str, Any]]:
    """The live A/B record of each SD adapter among `versions`: for those in testing, fresh
    from the view against today's incumbent; for the others, the record stored in their
    metrics (`live`) by their last review. Adapters with neither are absent."""
    records = {
        v.id: v.metrics["live"] for v in versions if v.kind == "sd_adapter" and "live" in v.metrics
    }
    testing = [v.id for v in versions if v.kind == "sd_adapter" and v.status == "testing"]
    opponent = await models.sd_incumbent(db) if testing else None
    if opponent is not None:
        fresh = await live_results(db, testing, opponent.id)
        for version_id in testing:
            live = fresh.get(version_id)
            record = live.as_json() if live else {"rounds": 0, "wins": 0}
            records[version_id] = {**record, "opponent": opponent.name}
    return records


# Per recipe, the A/B rounds its adapters were decided in as the candidate under test: each
# round counts once, from the side of the version that was not the round's incumbent
# (`rounds.incumbent_version_id`, its A/B plan's), so an adapter that kept testing after
# another was promoted counts its rounds against the new incumbent, and the incumbent's
# side counts for nobody. A round made before the incumbent was recorded (migration 0016,
# whose generate job was gone) falls back to the newer version's side: an incumbent was
# registered before its candidates, unless one was promoted while another kept testing.
LIVE_BY_RECIPE_SQL = f"""
SELECT {models.RECIPE_OF_VERSION} AS recipe,
       count(DISTINCT d.version_id) AS versions,
       count(*) AS rounds,
       count(*) FILTER (WHERE d.won) AS wins
FROM ab_decisions d
JOIN rounds r ON r.id = d.round_id
JOIN model_versions v ON v.id = d.version_id
WHERE v.kind = 'sd_adapter'
  AND CASE WHEN r.incumbent_version_id IS NULL THEN d.version_id > d.opponent_id
           ELSE d.opponent_id = r.incumbent_version_id END
GROUP BY 1
ORDER BY 1
"""


async def live_by_recipe(db: Executor) -> list[dict[str, Any]]:
    """The live record of each adaptation recipe (`db.models.recipe_of`): how many of its
    adapters were tested, and the decided A/B rounds and wins of all of them together as
    candidates against the rounds' incumbents."""
    return [dict(r) for r in await db.fetch(LIVE_BY_RECIPE_SQL)]
