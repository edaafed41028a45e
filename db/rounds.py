"""Rounds: one /dream, from request to closed.

Status lifecycle (enforced here, checked by the schema):

    queued ──▶ generating ──▶ ready ──▶ closed
       │            │
       └────────────┴──▶ failed ──(retry)──▶ queued

Every status change NOTIFYs `hps_rounds` with `{"round_id": …, "status": …}`; the NOTIFY is
part of the transaction, so listeners hear of a change exactly when it is visible.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from db import jobs, prompts, users
from db.connect import Executor, transaction
from db.images import Image, NewImage, hold_keys, images_of_round, insert_images

ROUNDS_CHANNEL = "hps_rounds"
GENERATE_KIND = "generate"


@dataclass(frozen=True)
class Round:
    id: int
    prompt_id: int
    requester_id: int | None
    source: str
    external_id: str | None
    split: str | None
    guild_id: int | None
    channel_id: int | None
    message_id: int | None
    params: dict[str, Any]
    k: int
    status: str
    error: str | None
    created_at: datetime
    started_at: datetime | None
    ready_at: datetime | None
    closed_at: datetime | None
    shown_status: str | None = None  # what the Discord message last showed


def _round(record: Any) -> Round:
    return Round(**{f: record[f] for f in Round.__dataclass_fields__})


@dataclass(frozen=True)
class Limits:
    """Per-user round limits; 0 means no rounds at all, None means no limit."""

    per_hour: int | None = None
    in_flight: int | None = None
    per_week: int | None = None


class RoundRefused(Exception):
    """A /dream that may not start. `code` is for programs, the message for people."""

    def __init__(self, code: str, message: str, retry_after: timedelta | None = None):
        super().__init__(message)
        self.code = code
        self.retry_after = retry_after


@dataclass(frozen=True)
class CreatedRound:
    round: Round
    job: jobs.Job
    queue_position: int


USAGE_SQL = """
SELECT
    count(*) FILTER (WHERE created_at > now() - interval '1 hour') AS last_hour,
    count(*) FILTER (WHERE status IN ('queued', 'generating')) AS in_flight,
    count(*) AS last_week,
    min(created_at) FILTER (WHERE created_at > now() - interval '1 hour')
        + interval '1 hour' - now() AS hour_frees_in,
    min(created_at) + interval '7 days' - now() AS week_frees_in
FROM rounds
WHERE requester_id = $1 AND created_at > now() - interval '7 days'
"""

# `prompt_text`: the requester's own spelling, where the prompt row has another one (a row
# keeps the first spelling of prompts that normalise alike).
INSERT_ROUND_SQL = """
INSERT INTO rounds (prompt_id, requester_id, guild_id, channel_id, params, k, prompt_text)
VALUES ($1, $2, $3, $4, $5, $6, NULLIF($7, (SELECT text FROM prompts WHERE id = $1)))
RETURNING *
"""


async def create_round(
    db: Executor,
    *,
    requester_discord_id: int,
    prompt: str,
    negative_prompt: str = "",
    k: int,
    params: dict[str, Any] | None = None,
    guild_id: int | None = None,
    channel_id: int | None = None,
    limits: Limits = Limits(),
    priority: int = 0,
) -> CreatedRound:
    """Check the user may dream, then insert the round and enqueue its generate job, in one
    transaction. Raises `RoundRefused` (and changes nothing) when the user is banned or over
    a limit. The user's row is locked meanwhile, so concurrent requests cannot both slip
    under a limit."""
    async with transaction(db) as conn:
        user = await users.ensure_user(conn, requester_discord_id)
        if user.banned:
            raise RoundRefused(*_BANNED)
        usage = await conn.fetchrow(USAGE_SQL, user.id)
        _check_limits(usage, limits)
        prompt_id = await prompts.ensure_prompt(conn, prompt, negative_prompt)
        record = await conn.fetchrow(
            INSERT_ROUND_SQL, prompt_id, user.id, guild_id, channel_id, params or {}, k, prompt
        )
        created = _round(record)
        job, _ = await jobs.enqueue(
            conn,
            GENERATE_KIND,
            generate_payload(created),
            dedupe_key=f"generate:round:{created.id}",
            priority=priority,
            requested_by=f"discord:{requester_discord_id}",
        )
        await _notify(conn, created.id, created.status)
        position = await jobs.queue_position(conn, job)
        return CreatedRound(created, job, position)


def generate_payload(round_: Round) -> dict[str, Any]:
    """The payload of a round's generate job. `batch` is equal for rounds with equal
    parameters: a worker generates such rounds together (`jobs.claim_matching`)."""
    return {"round_id": round_.id, "batch": json.dumps(round_.params, sort_keys=True)}


_BANNED = ("banned", "You are not allowed to start rounds here.")

LOCK_USER_BY_ID_SQL = """
SELECT banned FROM users WHERE id = $1 FOR UPDATE
"""


async def _check_may_retry(conn: Executor, user_id: int, limits: Limits) -> None:
    if await conn.fetchval(LOCK_USER_BY_ID_SQL, user_id):
        raise RoundRefused(*_BANNED)
    usage = await conn.fetchrow(USAGE_SQL, user_id)  # counts the round being retried
    if limits.in_flight is not None and usage["in_flight"] > limits.in_flight:
        others = usage["in_flight"] - 1
        raise RoundRefused(
            "in_flight",
            f"You already have {others} round(s) being generated "
            f"(limit {limits.in_flight}); wait for them to finish.",
        )


async def check_may_dream(db: Executor, requester_discord_id: int, limits: Limits) -> None:
    """Raise `RoundRefused` if the user may not start a round now. Read-only: a caller can
    answer early (before anything is shown to others); `create_round` checks again under
    the user's row lock."""
    user = await users.get_user(db, requester_discord_id)
    if user is None:
        return
    if user.banned:
        raise RoundRefused(*_BANNED)
    _check_limits(await db.fetchrow(USAGE_SQL, user.id), limits)


def _check_limits(usage: Any, limits: Limits) -> None:
    if limits.in_flight is not None and usage["in_flight"] >= limits.in_flight:
        raise RoundRefused(
            "in_flight",
            f"You already have {usage['in_flight']} round(s) being generated "
            f"(limit {limits.in_flight}); wait for them to finish.",
        )
    if limits.per_hour is not None and usage["last_hour"] >= limits.per_hour:
        raise RoundRefused(
            "per_hour",
            f"You have started {usage['last_hour']} round(s) in the last hour "
            f"(limit {limits.per_hour}).",
            retry_after=usage["hour_frees_in"],
        )
    if limits.per_week is not None and usage["last_week"] >= limits.per_week:
        raise RoundRefused(
            "per_week",
            f"You have started {usage['last_week']} round(s) in the last 7 days "
            f"(limit {limits.per_week}).",
            retry_after=usage["week_frees_in"],
        )


GET_ROUND_SQL = """
SELECT * FROM rounds WHERE id = $1
"""


async def get_round(db: Executor, round_id: int) -> Round | None:
    record = await db.fetchrow(GET_ROUND_SQL, round_id)
    return _round(record) if record else None


@dataclass(frozen=True)
class RoundView:
    """A round with what it takes to show or generate it."""

    round: Round
    prompt: str
    negative_prompt: str
    requester_discord_id: int | None
    images: list[Image] = field(default_factory=list)  # shown images only (never nsfw)


ROUND_VIEW_SQL = """
SELECT r.*, coalesce(r.prompt_text, p.text) AS prompt, p.negative_text AS negative_prompt,
       u.discord_id AS requester_discord_id
FROM rounds r
JOIN prompts p ON p.id = r.prompt_id
LEFT JOIN users u ON u.id = r.requester_id
WHERE r.id = $1
"""


async def get_round_view(db: Executor, round_id: int) -> RoundView | None:
    record = await db.fetchrow(ROUND_VIEW_SQL, round_id)
    if record is None:
        return None
    shown = await images_of_round(db, round_id, include_nsfw=False)
    return RoundView(
        _round(record),
        record["prompt"],
        record["negative_prompt"],
        record["requester_discord_id"],
        shown,
    )


START_GENERATING_SQL = """
UPDATE rounds SET status = 'generating', started_at = coalesce(started_at, now())
WHERE id = $1 AND status IN ('queued', 'generating')
RETURNING id
"""


async def start_generating(db: Executor, round_id: int) -> RoundView | None:
    """Move a queued round to generating (a retried job finds it generating already) and
    return it; None if the round is gone or no longer waits for images."""
    async with transaction(db) as conn:
        if await conn.fetchrow(START_GENERATING_SQL, round_id) is None:
            return None
        await _notify(conn, round_id, "generating")
        return await get_round_view(conn, round_id)


MARK_READY_SQL = """
UPDATE rounds SET status = 'ready', ready_at = now(), error = NULL, incumbent_version_id = $2
WHERE id = $1 AND status IN ('queued', 'generating')
RETURNING id
"""


async def finish_round(
    db: Executor,
    round_id: int,
    images: list[NewImage],
    *,
    incumbent_id: int | None = None,
    store_files: Callable[[], Awaitable[object]] | None = None,
) -> bool:
    """Insert the round's images and mark it ready, in one transaction (the caller's, if it
    passes a connection inside one, so the job's completion can commit with it), recording
    `incumbent_id`, the version that served it (its A/B plan's incumbent). False, with
    nothing written, if the round no longer waits for images. `store_files` puts the
    files in the image store once their keys are held (no deletion of equal bytes can come
    in between) and before any row names them; if it fails, nothing is written. Locks go
    as a forget takes them: the round, then the keys."""
    async with transaction(db) as conn:
        if await conn.fetchrow(MARK_READY_SQL, round_id, incumbent_id) is None:
            return False
        await hold_keys(conn, [image.storage_key for image in images])
        if store_files is not None:
            await store_files()
        await insert_images(conn, round_id, images)
        await _notify(conn, round_id, "ready")
        return True


FAIL_ROUND_SQL = """
UPDATE rounds SET status = 'failed', error = $2
WHERE id = $1 AND status IN ('queued', 'generating')
RETURNING id
"""


async def fail_round(db: Executor, round_id: int, error: str) -> bool:
    """Mark a round failed with a reason the requester may read."""
    async with transaction(db) as conn:
        if await conn.fetchrow(FAIL_ROUND_SQL, round_id, error[:1000]) is None:
            return False
        await _notify(conn, round_id, "failed")
        return True


async def fail_round_of_dead_job(db: Executor, job: jobs.Job) -> bool:
    """A round's generate job died (its attempts spent, or its last worker vanished): fail
    the round, so that its requester sees the failure and a retry button instead of a round
    that waits forever (and counts against their in-flight limit). Call it in the
    transaction that dead-letters the job. False if the payload names no round or the
    round no longer waits for images."""
    round_id = job.payload.get("round_id")
    if not isinstance(round_id, int):
        return False
    return await fail_round(
        db, round_id, f"Generation failed after {job.attempts} attempt(s). You can retry it."
    )


REQUEUE_ROUND_SQL = """
UPDATE rounds SET status = 'queued', error = NULL, started_at = NULL
WHERE id = $1 AND status = 'failed'
RETURNING *
"""


async def retry_round(
    db: Executor, round_id: int, *, limits: Limits | None = None
) -> jobs.Job | None:
    """Put a failed round back in the queue (its generate job too); None if not failed.
    With `limits` (a requester retrying, not a maintainer), the requester must not be
    banned and the round, in flight again, must stay within `limits.in_flight`: checked
    under the requester's row lock, as `create_round` does, so concurrent retries cannot
    both slip under it; else `RoundRefused` and nothing changes."""
    async with transaction(db) as conn:
        # The round's row first, then the user's: the order clicks and forgetting lock in.
        record = await conn.fetchrow(REQUEUE_ROUND_SQL, round_id)
        if record is None:
            return None
        if limits is not None and record["requester_id"] is not None:
            await _check_may_retry(conn, record["requester_id"], limits)
        key = f"generate:round:{round_id}"
        latest = await conn.fetchrow(LATEST_GENERATE_JOB_SQL, key)
        job = await jobs.get(conn, latest["id"]) if latest else None
        if job is not None and job.state in ("dead", "cancelled"):
            job = await jobs.retry(conn, job.id)
        elif job is None or job.state == "done":
            # done: the job finished by failing the round on purpose (e.g. all images
            # flagged); a fresh job with an attempt-numbered key runs it again.
            number = latest["n"] + 1 if latest else 1
            job, _ = await jobs.enqueue(
                conn, GENERATE_KIND, generate_payload(_round(record)), dedupe_key=f"{key}:{number}"
            )
        await _notify(conn, round_id, "queued")
        return job


# A round's generate jobs: its first, and one per retry after a deliberate failure.
LATEST_GENERATE_JOB_SQL = """
SELECT id, count(*) OVER () AS n FROM jobs
WHERE dedupe_key = $1 OR dedupe_key LIKE $1 || ':%'
ORDER BY id DESC LIMIT 1
"""

CLOSE_STALE_SQL = """
UPDATE rounds SET status = 'closed', closed_at = now()
WHERE status = 'ready' AND ready_at < now() - $1::interval
RETURNING id
"""


async def close_stale_rounds(db: Executor, ttl: timedelta) -> list[int]:
    """Close rounds ready for longer than `ttl`; returns their ids."""
    async with transaction(db) as conn:
        ids = [r["id"] for r in await conn.fetch(CLOSE_STALE_SQL, ttl)]
        for round_id in ids:
            await _notify(conn, round_id, "closed")
        return ids


# A queued round's waiting starts when its generate job was (re)queued: a retried round
# or job waits anew (`jobs.retry` and the backoff set `run_after`).
FAIL_UNSTARTED_SQL = """
WITH stale AS (
    SELECT r.id AS round_id, j.id AS job_id
    FROM rounds r
    JOIN jobs j ON j.kind = 'generate' AND j.state = 'queued'
               AND (j.payload->>'round_id')::bigint = r.id
    WHERE r.status IN ('queued', 'generating')
      AND greatest(j.created_at, j.run_after) < now() - $1::interval
    FOR UPDATE OF r, j SKIP LOCKED
), cancelled AS (
    UPDATE jobs SET state = 'cancelled', finished_at = now(), error = $2
    WHERE id IN (SELECT job_id FROM stale)
)
UPDATE rounds SET status = 'failed', error = $2
WHERE id IN (SELECT round_id FROM stale)
RETURNING id
"""


async def fail_unstarted_rounds(db: Executor, deadline: timedelta, error: str) -> list[int]:
    """Fail the rounds whose generate job has waited in the queue longer than `deadline`
    (no worker took it: none runs, or all are busy), cancelling those jobs, so that their
    requesters hear why and are no longer held at their in-flight limit; returns the ids.
    A generating round whose job is back in the queue (its worker died, or an attempt
    failed) counts too, from when the job became runnable again; a job being run is never
    touched. Rounds or jobs being taken just now are skipped (the next sweep sees them
    again)."""
    async with transaction(db) as conn:
        ids = [r["id"] for r in await conn.fetch(FAIL_UNSTARTED_SQL, deadline, error[:1000])]
        for round_id in ids:
            await _notify(conn, round_id, "failed")
        return ids


CLOSE_ROUND_SQL = """
UPDATE rounds SET status = 'closed', closed_at = now()
WHERE id = $1 AND status = 'ready'
RETURNING id
"""


async def close_round(db: Executor, round_id: int) -> bool:
    async with transaction(db) as conn:
        if await conn.fetchrow(CLOSE_ROUND_SQL, round_id) is None:
            return False
        await _notify(conn, round_id, "closed")
        return True


SET_SHOWN_SQL = """
UPDATE rounds SET shown_status = $2 WHERE id = $1
"""


async def set_shown(db: Executor, round_id: int, status: str) -> None:
    """Remember that the round's Discord message now shows `status`."""
    await db.execute(SET_SHOWN_SQL, round_id, status)


# Rounds whose message lags behind their status: the bot shows ready, failed and closed
# rounds (queued and generating are shown by the command that created or retried them),
# and a failed round retried elsewhere (`hps jobs retry`), whose message shows the failure.
ROUNDS_TO_SHOW_SQL = """
SELECT id FROM rounds
WHERE (status IN ('ready', 'failed', 'closed') AND shown_status IS DISTINCT FROM status
       OR status IN ('queued', 'generating') AND shown_status = 'failed')
  AND source = 'discord' AND channel_id IS NOT NULL AND created_at > now() - $1::interval
ORDER BY id
LIMIT $2
"""


async def rounds_to_show(db: Executor, within: timedelta, limit: int = 100) -> list[int]:
    """Rounds created within `within` whose Discord message does not show their status."""
    return [r["id"] for r in await db.fetch(ROUNDS_TO_SHOW_SQL, within, limit)]


NOTIFY_ROUND_SQL = """
SELECT pg_notify($1, $2)
"""


async def _notify(conn: Executor, round_id: int, status: str) -> None:
    payload = json.dumps({"round_id": round_id, "status": status})
    await conn.execute(NOTIFY_ROUND_SQL, ROUNDS_CHANNEL, payload)
