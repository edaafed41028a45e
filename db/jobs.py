"""The job queue: one `jobs` table shared by any number of workers on any number of machines.

- Claiming uses `FOR UPDATE SKIP LOCKED`, so racing workers never take the same job.
- A claim is a lease: the worker heartbeats to extend it; a job whose lease expired (its
  worker died) is put back in the queue by `requeue_expired`, or dead-lettered when its
  attempts are spent.
- Failures (and expired leases) retry with exponential backoff up to `max_attempts`, then
  the job is `dead` (the dead-letter state); `retry` puts a dead job back. `error` keeps the
  last failed attempt's error, also once a later attempt succeeded; `started_at` is when
  the current (or last) attempt started, `worker_id` who ran it.
- The queue knows no job kind. What a job's death means beyond it (a generate job's round
  fails) is its caller's: `fail` and `requeue_expired` return the dead jobs, and the
  worker acts on them in the same transaction (`pipeline.handlers.ON_DEAD`).
- `attempts` doubles as a fencing token: completing or failing a job checks the worker id and
  the attempt it claimed, so a worker that lost its lease cannot overwrite the new holder.
- `dedupe_key` is unique for all time: enqueueing the same key twice returns the first job
  (a schedule's run per period, a round's generate job).
- Wake-ups: `enqueue` NOTIFYs `hps_jobs` (payload: the kind); finishing a job NOTIFYs
  `hps_job_done` (payload: JSON id/kind/state) so a waiter (the bot's /score) can react.

Why not pgqueuer: it deletes finished jobs from its queue table (results and errors would
need a second store for /status and analysts), its dedupe key only covers queued jobs (a
schedule's period could run twice after a restart), and its schema converges on its own
release cadence outside our Alembic migrations.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from db import locks
from db.connect import Executor, transaction

JOBS_CHANNEL = "hps_jobs"
JOB_DONE_CHANNEL = "hps_job_done"


@dataclass(frozen=True)
class Job:
    id: int
    kind: str
    payload: dict[str, Any]
    state: str
    priority: int
    dedupe_key: str | None
    attempts: int
    max_attempts: int
    run_after: datetime
    worker_id: str | None
    lease_expires_at: datetime | None
    heartbeat_at: datetime | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    result: Any
    error: str | None
    requested_by: str | None
    announced_at: datetime | None = None  # when the bot posted its outcome to Discord


def _job(record: Any) -> Job:
    return Job(**dict(record))


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


ENQUEUE_SQL = """
WITH inserted AS (
    INSERT INTO jobs (kind, payload, priority, dedupe_key, max_attempts, run_after, requested_by)
    VALUES ($1, $2, $3, $4, $5, now() + $6::interval, $7)
    ON CONFLICT (dedupe_key) DO NOTHING
    RETURNING *
)
SELECT *, true AS created FROM inserted
UNION ALL
SELECT *, false AS created FROM jobs WHERE dedupe_key = $4 AND NOT EXISTS (SELECT FROM inserted)
"""

NOTIFY_SQL = """
SELECT pg_notify($1, $2)
"""


async def enqueue(
    db: Executor,
    kind: str,
    payload: dict[str, Any] | None = None,
    *,
    dedupe_key: str | None = None,
    priority: int = 0,
    delay: timedelta = timedelta(0),
    max_attempts: int = 3,
    requested_by: str | None = None,
) -> tuple[Job, bool]:
    """Add a job (or find the one with the same `dedupe_key`); returns `(job, created)`.

    Inside a caller's transaction the NOTIFY is delivered when that transaction commits.
    """
    async with transaction(db) as conn:
        record = await conn.fetchrow(
            ENQUEUE_SQL,
            kind,
            payload or {},
            priority,
            dedupe_key,
            max_attempts,
            delay,
            requested_by,
        )
        if record is None:
            # The conflicting row was inserted by a transaction that committed after our
            # snapshot: read it again in a fresh statement.
            record = await conn.fetchrow(GET_BY_DEDUPE_KEY_SQL, dedupe_key)
            assert record is not None
            return _job(record), False
        created = record["created"]
        if created:
            await conn.execute(NOTIFY_SQL, JOBS_CHANNEL, kind)
        fields = dict(record)
        del fields["created"]
        return Job(**fields), created


GET_BY_DEDUPE_KEY_SQL = """
SELECT * FROM jobs WHERE dedupe_key = $1
"""

GET_SQL = """
SELECT * FROM jobs WHERE id = $1
"""


async def get(db: Executor, job_id: int) -> Job | None:
    record = await db.fetchrow(GET_SQL, job_id)
    return _job(record) if record else None


async def get_by_dedupe_key(db: Executor, key: str) -> Job | None:
    record = await db.fetchrow(GET_BY_DEDUPE_KEY_SQL, key)
    return _job(record) if record else None


def _claim_sql(which: str) -> str:
    """The claim statement, taking the due queued jobs that `which` selects. Parameters:
    $2 worker id, $3 lease, $4 limit, and $1 (and $5) as `which` uses them."""
    return f"""
WITH picked AS (
    SELECT id FROM jobs
    WHERE state = 'queued' AND {which} AND run_after <= now()
    ORDER BY priority DESC, run_after, id
    LIMIT $4
    FOR UPDATE SKIP LOCKED
)
UPDATE jobs j
SET state = 'running',
    attempts = j.attempts + 1,
    worker_id = $2,
    started_at = now(),
    heartbeat_at = now(),
    lease_expires_at = now() + $3::interval
FROM picked
WHERE j.id = picked.id
RETURNING j.*
"""


CLAIM_SQL = _claim_sql("kind = ANY($1::text[])")
# One kind (`= $1`, not `= ANY`): the index on queued jobs then yields them in order and the
# scan stops once `limit` match, instead of sorting every queued job of the kind.
CLAIM_MATCHING_SQL = _claim_sql("kind = $1 AND payload @> $5::jsonb")


async def claim(
    db: Executor,
    kinds: list[str],
    worker_id: str,
    lease: timedelta,
    *,
    limit: int = 1,
) -> list[Job]:
    """Take up to `limit` due jobs of these kinds, highest priority and oldest first."""
    records = await db.fetch(CLAIM_SQL, kinds, worker_id, lease, limit)
    return _claimed(records)


async def claim_matching(
    db: Executor,
    kind: str,
    payload_contains: dict[str, Any],
    worker_id: str,
    lease: timedelta,
    *,
    limit: int,
) -> list[Job]:
    """Take up to `limit` more due jobs of `kind` whose payload contains `payload_contains`
    (used to batch compatible generate jobs together)."""
    records = await db.fetch(CLAIM_MATCHING_SQL, kind, worker_id, lease, limit, payload_contains)
    return _claimed(records)


def _claimed(records: list[Any]) -> list[Job]:
    return sorted((_job(r) for r in records), key=lambda j: (-j.priority, j.run_after, j.id))


HEARTBEAT_SQL = """
UPDATE jobs
SET heartbeat_at = now(), lease_expires_at = now() + $3::interval
WHERE id = ANY($1::bigint[]) AND state = 'running' AND worker_id = $2
RETURNING id
"""


async def heartbeat(db: Executor, job_ids: list[int], worker_id: str, lease: timedelta) -> set[int]:
    """Extend the leases this worker still holds; returns the ids it still holds."""
    if not job_ids:
        return set()
    return {r["id"] for r in await db.fetch(HEARTBEAT_SQL, job_ids, worker_id, lease)}


COMPLETE_SQL = """
UPDATE jobs
SET state = 'done', finished_at = now(), result = $4, lease_expires_at = NULL
WHERE id = $1 AND state = 'running' AND worker_id = $2 AND attempts = $3
RETURNING *
"""


async def complete(db: Executor, job: Job, worker_id: str, result: Any = None) -> bool:
    """Mark the job done. False if this worker no longer holds it (its lease was lost).

    Call it on the connection of the transaction that applied the job's effect, so the
    effect and the completion commit together.
    """
    async with transaction(db) as conn:
        record = await conn.fetchrow(COMPLETE_SQL, job.id, worker_id, job.attempts, result)
        if record is None:
            return False
        await _notify_done(conn, _job(record))
        return True


FAIL_SQL = """
UPDATE jobs
SET state = CASE WHEN $4 AND attempts < max_attempts THEN 'queued' ELSE 'dead' END,
    run_after = CASE WHEN $4 AND attempts < max_attempts
                     THEN now() + $5::interval * power(2, attempts - 1)
                     ELSE run_after END,
    finished_at = CASE WHEN $4 AND attempts < max_attempts THEN NULL ELSE now() END,
    lease_expires_at = NULL,
    error = $6
WHERE id = $1 AND state = 'running' AND worker_id = $2 AND attempts = $3
RETURNING *
"""


async def fail(
    db: Executor,
    job: Job,
    worker_id: str,
    error: str,
    *,
    retry: bool = True,
    backoff: timedelta = timedelta(seconds=10),
) -> Job | None:
    """Record a failed attempt: back to the queue after `backoff * 2**(attempt-1)` while
    attempts remain and `retry` is true, else dead-lettered. None if the lease was lost.
    Inside a caller's transaction, the caller may act on a death in the same commit."""
    async with transaction(db) as conn:
        record = await conn.fetchrow(
            FAIL_SQL, job.id, worker_id, job.attempts, retry, backoff, error[:10_000]
        )
        if record is None:
            return None
        failed = _job(record)
        if failed.state == "dead":
            await _notify_done(conn, failed)
        else:
            await conn.execute(NOTIFY_SQL, JOBS_CHANNEL, failed.kind)
        return failed


RELEASE_SQL = """
UPDATE jobs
SET state = 'queued', attempts = attempts - 1, worker_id = NULL, lease_expires_at = NULL,
    started_at = NULL
WHERE id = $1 AND state = 'running' AND worker_id = $2 AND attempts = $3
RETURNING *
"""


async def release(db: Executor, job: Job, worker_id: str) -> bool:
    """Give a job back untouched (a worker shutting down before starting it)."""
    async with transaction(db) as conn:
        record = await conn.fetchrow(RELEASE_SQL, job.id, worker_id, job.attempts)
        if record is not None:
            await conn.execute(NOTIFY_SQL, JOBS_CHANNEL, job.kind)
        return record is not None


REQUEUE_EXPIRED_SQL = """
UPDATE jobs
SET state = CASE WHEN attempts < max_attempts THEN 'queued' ELSE 'dead' END,
    -- A job whose worker died may be what killed it (out of memory): not straight back.
    run_after = CASE WHEN attempts < max_attempts
                     THEN now() + $1::interval * power(2, attempts - 1)
                     ELSE run_after END,
    finished_at = CASE WHEN attempts < max_attempts THEN NULL ELSE now() END,
    error = 'lease expired: worker ' || coalesce(worker_id, '?') || ' stopped heartbeating',
    lease_expires_at = NULL
WHERE id IN (
    SELECT id FROM jobs
    WHERE state = 'running' AND lease_expires_at < now()
    FOR UPDATE SKIP LOCKED
)
RETURNING *
"""


async def requeue_expired(db: Executor, backoff: timedelta = timedelta(seconds=10)) -> list[Job]:
    """Take back jobs whose worker stopped heartbeating: requeued after the same backoff as
    a failed attempt, or dead when their attempts are spent (inside a caller's transaction,
    the caller may act on the deaths in the same commit)."""
    async with transaction(db) as conn:
        jobs = [_job(r) for r in await conn.fetch(REQUEUE_EXPIRED_SQL, backoff)]
        for job in jobs:
            if job.state == "dead":
                await _notify_done(conn, job)
            else:
                await conn.execute(NOTIFY_SQL, JOBS_CHANNEL, job.kind)
        return jobs


RETRY_SQL = """
UPDATE jobs
SET state = 'queued', attempts = 0, run_after = now(), finished_at = NULL,
    worker_id = NULL, result = NULL, announced_at = NULL
WHERE id = $1 AND state IN ('dead', 'cancelled')
RETURNING *
"""


async def retry(db: Executor, job_id: int) -> Job | None:
    """Put a dead or cancelled job back in the queue with fresh attempts (error kept until
    the next claim). None if the job is not dead or cancelled."""
    async with transaction(db) as conn:
        record = await conn.fetchrow(RETRY_SQL, job_id)
        if record is None:
            return None
        await conn.execute(NOTIFY_SQL, JOBS_CHANNEL, record["kind"])
        return _job(record)


CANCEL_SQL = """
UPDATE jobs SET state = 'cancelled', finished_at = now()
WHERE id = ANY($1::bigint[]) AND state = 'queued'
RETURNING id
"""


async def cancel(db: Executor, job_ids: list[int]) -> list[int]:
    """Cancel queued jobs (running ones finish); returns the ids cancelled."""
    return [r["id"] for r in await db.fetch(CANCEL_SQL, job_ids)]


async def _notify_done(conn: Executor, job: Job) -> None:
    payload = json.dumps({"id": job.id, "kind": job.kind, "state": job.state})
    await conn.execute(NOTIFY_SQL, JOB_DONE_CHANNEL, payload)


QUEUE_POSITION_SQL = """
SELECT count(*) FROM jobs
WHERE kind = $1 AND state = 'queued' AND (priority > $2 OR (priority = $2 AND id <= $3))
"""


async def queue_position(db: Executor, job: Job) -> int:
    """1 for the next job of its kind to be taken (0 if it is no longer queued)."""
    return await db.fetchval(QUEUE_POSITION_SQL, job.kind, job.priority, job.id)


LIST_SQL = """
SELECT * FROM jobs
WHERE ($1::text IS NULL OR kind = $1) AND ($2::text IS NULL OR state = $2)
ORDER BY id DESC
LIMIT $3
"""


async def list_jobs(
    db: Executor, *, kind: str | None = None, state: str | None = None, limit: int = 50
) -> list[Job]:
    return [_job(r) for r in await db.fetch(LIST_SQL, kind, state, limit)]


# -- workers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Worker:
    id: str
    hostname: str
    pid: int
    kinds: list[str]
    device: str
    started_at: datetime
    last_seen_at: datetime
    stopped_at: datetime | None
    current_job_id: int | None


REGISTER_WORKER_SQL = """
INSERT INTO workers (id, hostname, pid, kinds, device)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (id) DO UPDATE
SET hostname = EXCLUDED.hostname, pid = EXCLUDED.pid, kinds = EXCLUDED.kinds,
    device = EXCLUDED.device, started_at = now(), last_seen_at = now(), stopped_at = NULL,
    current_job_id = NULL
RETURNING *
"""


async def register_worker(db: Executor, worker_id: str, kinds: list[str], device: str) -> Worker:
    record = await db.fetchrow(
        REGISTER_WORKER_SQL, worker_id, socket.gethostname(), os.getpid(), kinds, device
    )
    return Worker(**dict(record))


TOUCH_WORKER_SQL = """
UPDATE workers SET last_seen_at = now(), current_job_id = $2 WHERE id = $1
"""


async def touch_worker(db: Executor, worker_id: str, current_job_id: int | None) -> None:
    await db.execute(TOUCH_WORKER_SQL, worker_id, current_job_id)


STOP_WORKER_SQL = """
UPDATE workers SET stopped_at = now(), current_job_id = NULL WHERE id = $1
"""


async def stop_worker(db: Executor, worker_id: str) -> None:
    await db.execute(STOP_WORKER_SQL, worker_id)


LIST_WORKERS_SQL = """
SELECT * FROM workers
WHERE coalesce(stopped_at, last_seen_at) > now() - $1::interval
ORDER BY last_seen_at DESC
"""


async def list_workers(db: Executor, recent: timedelta = timedelta(days=1)) -> list[Worker]:
    """Workers heard from within `recent`: running, or stopped or silent since (a killed
    worker never says it stopped); older rows are history, not news."""
    return [Worker(**dict(r)) for r in await db.fetch(LIST_WORKERS_SQL, recent)]


# -- announcing outcomes ------------------------------------------------------------------

CLAIM_ANNOUNCEMENTS_SQL = """
UPDATE jobs SET announced_at = now()
WHERE id IN (
    SELECT id FROM jobs
    WHERE announced_at IS NULL AND state IN ('done', 'dead') AND kind = ANY($1::text[])
      AND ($2::bigint IS NULL OR id = $2) AND finished_at > now() - $3::interval
    ORDER BY id
    FOR UPDATE SKIP LOCKED
)
RETURNING *
"""

UNANNOUNCE_SQL = """
UPDATE jobs SET announced_at = NULL WHERE id = $1
"""


async def claim_announcements(
    db: Executor,
    kinds: list[str],
    *,
    job_id: int | None = None,
    within: timedelta = timedelta(days=7),
) -> list[Job]:
    """Finished jobs of `kinds` whose outcome nobody has posted yet (only `job_id`, if
    given), finished within `within`, marked as announced: whoever claims a job posts it,
    once, however many bot processes heard of it. Oldest first."""
    records = await db.fetch(CLAIM_ANNOUNCEMENTS_SQL, kinds, job_id, within)
    return sorted((_job(r) for r in records), key=lambda j: j.id)


async def unannounce(db: Executor, job_id: int) -> None:
    """Posting a claimed outcome failed: leave it for the next claim."""
    await db.execute(UNANNOUNCE_SQL, job_id)


# -- training jobs: one entry point for the scheduler and the maintainers' /retrain ----

TRAINING_KINDS = {"classifier": "train_classifier", "sd": "adapt_sd"}

LOCK_KIND_SQL = """
SELECT pg_advisory_xact_lock(hashtext('hps_jobs:' || $1))
"""

KIND_LOCK_KEY_SQL = """
SELECT hashtext('hps_jobs:' || $1)::bigint
"""

# How long enqueueing a training run waits for its kind's lock (another enqueue holds it
# for milliseconds; anything longer is a foreign holder, see `db.locks`).
TRAINING_LOCK_TIMEOUT = timedelta(seconds=5)

ACTIVE_OF_KIND_SQL = """
SELECT * FROM jobs WHERE kind = $1 AND state IN ('queued', 'running') ORDER BY id LIMIT 1
"""


async def active_of_kind(db: Executor, kind: str) -> Job | None:
    """The oldest queued or running job of `kind`, if any."""
    record = await db.fetchrow(ACTIVE_OF_KIND_SQL, kind)
    return _job(record) if record else None


async def enqueue_training(
    db: Executor,
    target: str,
    *,
    requested_by: str,
    dedupe_key: str | None = None,
    payload: dict[str, Any] | None = None,
    lock_timeout: timedelta = TRAINING_LOCK_TIMEOUT,
) -> tuple[Job, bool]:
    """Enqueue a training run of `target` ("classifier" or "sd") unless one is already
    queued or running, in which case that one is returned with `created=False`.

    The scheduler passes a `dedupe_key` per schedule and period, so that a restart or a
    second scheduler never enqueues the same period twice; /retrain passes none. Raises
    `locks.LockTimeout` (nothing enqueued) when the kind's lock stays held for `lock_timeout`.
    """
    kind = TRAINING_KINDS.get(target)
    if kind is None:
        raise ValueError(f"unknown training target {target!r}: use one of {sorted(TRAINING_KINDS)}")
    try:
        return await _enqueue_training(db, kind, requested_by, dedupe_key, payload, lock_timeout)
    except asyncpg.LockNotAvailableError:
        key = await db.fetchval(KIND_LOCK_KEY_SQL, kind)
        found = await locks.holders(db, [key])
        raise locks.timed_out(f"the {kind} queue", lock_timeout, found) from None


async def _enqueue_training(
    db: Executor,
    kind: str,
    requested_by: str,
    dedupe_key: str | None,
    payload: dict[str, Any] | None,
    lock_timeout: timedelta,
) -> tuple[Job, bool]:
    async with transaction(db) as conn:
        async with locks.waiting_at_most(conn, lock_timeout):
            await conn.execute(LOCK_KIND_SQL, kind)
        if dedupe_key is not None:
            existing = await get_by_dedupe_key(conn, dedupe_key)
            if existing is not None:
                return existing, False
        active = await conn.fetchrow(ACTIVE_OF_KIND_SQL, kind)
        if active is not None:
            return _job(active), False
        return await enqueue(
            conn,
            kind,
            {"requested_by": requested_by, **(payload or {})},
            dedupe_key=dedupe_key,
            requested_by=requested_by,
            max_attempts=2,
        )
