"""The worker in process: claiming races, outcomes, wake-ups, batches, registration.

Workers killed or stopped by signals run as real subprocesses in tests/test_processes.py.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import pytest

from db import jobs, rounds, stats
from pipeline.worker import Worker, fail_job, requeue_expired
from tests.factories import queued_round
from tests.job_handlers import REGISTRY, RUNS
from tests.pipeline.conftest import make_settings, running, wait_until


def _worker(pool, settings, name: str, kinds: list[str], **kwargs) -> Worker:  # type: ignore[no-untyped-def]
    return Worker(pool, settings, kinds=kinds, worker_id=name, registry=REGISTRY, **kwargs)


async def _states(pool, kind: str) -> dict[str, int]:  # type: ignore[no-untyped-def]
    rows = await pool.fetch(
        "SELECT state, count(*) AS n FROM jobs WHERE kind = $1 GROUP BY 1", kind
    )
    return {r["state"]: r["n"] for r in rows}


async def test_two_workers_racing_on_100_jobs_run_each_exactly_once(pool) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings()
    created = [(await jobs.enqueue(pool, "effect", {"n": i}))[0].id for i in range(100)]
    RUNS.clear()
    a = _worker(pool, settings, "racer-a", ["effect"], concurrency=3)
    b = _worker(pool, settings, "racer-b", ["effect"], concurrency=3)
    async with running(a), running(b):
        await wait_until(lambda: _done_count(pool, "effect", 100), within=60)
    assert sorted(RUNS) == created and set(RUNS.values()) == {1}
    rows = await pool.fetch("SELECT worker_id, attempts, result FROM jobs WHERE kind = 'effect'")
    assert {r["attempts"] for r in rows} == {1}
    by_worker = {w: sum(r["worker_id"] == w for r in rows) for w in ("racer-a", "racer-b")}
    assert sum(by_worker.values()) == 100 and min(by_worker.values()) > 0, by_worker
    assert all(r["result"] == {"worker": r["worker_id"]} for r in rows)
    # Each job's effect was applied once, in the transaction that completed it.
    assert await pool.fetchval("SELECT count(*) FROM prompts WHERE text LIKE 'effect %'") == 100
    timings = await stats.queue_timings(pool, "effect", timedelta(hours=1))
    assert (timings.jobs, timings.workers) == (100, 2)
    assert 0 <= timings.pickup_p50_ms <= timings.pickup_p99_ms <= timings.pickup_max_ms


async def _done_count(pool, kind: str, n: int) -> bool:  # type: ignore[no-untyped-def]
    return (await _states(pool, kind)).get("done", 0) == n


async def test_a_permanent_error_dead_letters_at_once_with_its_error(pool) -> None:  # type: ignore[no-untyped-def]
    job, _ = await jobs.enqueue(pool, "invalid", max_attempts=5)
    async with running(_worker(pool, make_settings(), "w", ["invalid"])):
        dead = await wait_until(lambda: _in_state(pool, job.id, "dead"))
    assert dead.attempts == 1 and dead.error == "payload names no such thing"
    assert dead.finished_at is not None and dead.worker_id == "w"


async def test_other_errors_retry_with_backoff_then_dead_letter(pool) -> None:  # type: ignore[no-untyped-def]
    job, _ = await jobs.enqueue(pool, "flaky", max_attempts=3)
    RUNS.clear()
    async with running(_worker(pool, make_settings(), "w", ["flaky"])):
        dead = await wait_until(lambda: _in_state(pool, job.id, "dead"))
    assert RUNS[job.id] == 3 and dead.attempts == 3
    assert dead.error.startswith("Traceback") and "ValueError: boom on attempt 3" in dead.error
    # With a backoff, the failed attempt waits before it is due again.
    slow, _ = await jobs.enqueue(pool, "flaky", max_attempts=3)
    settings = make_settings(worker={"backoff_seconds": 60})
    async with running(_worker(pool, settings, "w", ["flaky"])):
        queued = await wait_until(lambda: _failed_once(pool, slow.id))
    assert queued.state == "queued" and queued.run_after > queued.created_at + timedelta(seconds=50)


async def _in_state(pool, job_id: int, state: str) -> jobs.Job | None:  # type: ignore[no-untyped-def]
    job = await jobs.get(pool, job_id)
    return job if job.state == state else None


async def _failed_once(pool, job_id: int) -> jobs.Job | None:  # type: ignore[no-untyped-def]
    job = await jobs.get(pool, job_id)
    return job if job.attempts == 1 and job.state == "queued" else None


async def test_a_notify_wakes_an_idle_worker_without_waiting_for_the_poll(pool) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(worker={"poll_seconds": 30})
    async with running(_worker(pool, settings, "w", ["noop"])) as worker:
        await wait_until(lambda: worker._listener is not None)
        await asyncio.sleep(0.3)  # idle, waiting on its 30 s poll
        started = time.monotonic()
        job, _ = await jobs.enqueue(pool, "noop")
        await wait_until(lambda: _in_state(pool, job.id, "done"), within=5, interval=0.01)
        assert time.monotonic() - started < 2
        # A kind it does not take is left alone.
        other, _ = await jobs.enqueue(pool, "flaky")
        await asyncio.sleep(0.5)
    assert (await jobs.get(pool, other.id)).state == "queued"


async def test_the_worker_registers_heartbeats_and_marks_itself_stopped(pool) -> None:  # type: ignore[no-untyped-def]
    job, _ = await jobs.enqueue(pool, "effect", {"seconds": 2.5})
    worker = _worker(pool, make_settings(), "hb", ["effect", "noop"], device="cuda:3")
    async with running(worker):
        running_job = await wait_until(lambda: _in_state(pool, job.id, "running"))
        await asyncio.sleep(1.5)  # heartbeats every second
        [row] = await jobs.list_workers(pool)
        assert (row.id, row.kinds, row.device, row.stopped_at) == (
            "hb",
            ["effect", "noop"],
            "cuda:3",
            None,
        )
        assert row.current_job_id == job.id
        beating = await jobs.get(pool, job.id)
        assert beating.heartbeat_at > running_job.heartbeat_at
        assert beating.lease_expires_at > running_job.lease_expires_at
    done = await jobs.get(pool, job.id)  # the clean stop let it finish
    assert done.state == "done" and done.finished_at >= done.started_at
    [row] = await jobs.list_workers(pool)
    assert row.stopped_at is not None and row.current_job_id is None


async def test_expired_leases_of_dead_workers_are_taken_back(pool) -> None:  # type: ignore[no-untyped-def]
    job, _ = await jobs.enqueue(pool, "noop")
    await jobs.claim(pool, ["noop"], "vanished", timedelta(seconds=1))
    RUNS.clear()
    async with running(_worker(pool, make_settings(), "w", ["noop"])):
        done = await wait_until(lambda: _in_state(pool, job.id, "done"), within=10)
    assert done.attempts == 2 and done.worker_id == "w" and RUNS[job.id] == 1


async def test_jobs_a_handler_took_are_settled_by_the_worker(pool) -> None:  # type: ignore[no-untyped-def]
    first = [(await jobs.enqueue(pool, "batching", {"group": 1}))[0] for _ in range(3)]
    async with running(_worker(pool, make_settings(), "w", ["batching"], concurrency=1)):
        await wait_until(lambda: _in_state(pool, first[0].id, "done"))
        lead, finished, left = [await jobs.get(pool, j.id) for j in first]
        # The one it finished is no longer heartbeated; the other was, until released.
        assert lead.result == {"extra": [finished.id, left.id], "held": [left.id]}
        assert finished.state == "done" and finished.result == {"by": lead.id}
        # The one it returned without finishing was released untouched, then run alone.
        await wait_until(lambda: _in_state(pool, left.id, "done"))
    left = await jobs.get(pool, left.id)
    assert left.attempts == 1 and left.result == {"extra": [], "held": []}

    broken = [(await jobs.enqueue(pool, "batching", {"group": 2, "raise": True}))[0]]
    broken += [(await jobs.enqueue(pool, "batching", {"group": 2}))[0] for _ in range(2)]
    settings = make_settings(worker={"backoff_seconds": 60})
    async with running(_worker(pool, settings, "w", ["batching"])):
        await wait_until(lambda: _failed_once(pool, broken[2].id))
    lead, finished, failed = [await jobs.get(pool, j.id) for j in broken]
    assert lead.state == "queued" and "RuntimeError: batch broke" in lead.error
    assert finished.state == "done"
    assert failed.state == "queued" and failed.attempts == 1 and "batch broke" in failed.error


async def test_unknown_kinds_are_refused(pool) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="unknown job kind"):
        _worker(pool, make_settings(), "w", ["noop", "teleport"])


LEASE = timedelta(minutes=1)


async def test_a_dead_generate_job_fails_its_round(pool) -> None:  # type: ignore[no-untyped-def]
    """Moved from tests/db/test_jobs.py: the worker's failing and taking back, not the
    queue, run what a job's death means (`pipeline.handlers.ON_DEAD`)."""
    by_errors = await queued_round(pool, requester=1)
    [job] = await jobs.claim(pool, ["generate"], "w", LEASE)
    await rounds.start_generating(pool, by_errors)
    await fail_job(pool, job, "w", "CUDA out of memory", retry=False)
    failed = await rounds.get_round(pool, by_errors)
    assert failed.status == "failed"
    assert failed.error == "Generation failed after 1 attempt(s). You can retry it."

    by_lease = await queued_round(pool, requester=2)
    await pool.execute("UPDATE jobs SET max_attempts = 1 WHERE state = 'queued'")
    await jobs.claim(pool, ["generate"], "vanished", LEASE)
    await pool.execute("UPDATE jobs SET lease_expires_at = now() WHERE state = 'running'")
    [dead] = await requeue_expired(pool)
    assert dead.state == "dead"
    assert (await rounds.get_round(pool, by_lease)).status == "failed"
    # The requester can retry: the dead job is revived.
    assert (await rounds.retry_round(pool, by_lease)).id == dead.id


async def test_any_worker_fails_the_round_of_a_generate_job_whose_worker_vanished(pool) -> None:  # type: ignore[no-untyped-def]
    round_id = await queued_round(pool, requester=1)
    await pool.execute("UPDATE jobs SET max_attempts = 1")
    [job] = await jobs.claim(pool, ["generate"], "vanished", timedelta(seconds=1))
    await rounds.start_generating(pool, round_id)
    # A worker that takes no generate jobs takes the expired lease back all the same.
    async with running(_worker(pool, make_settings(), "w", ["noop"])):
        dead = await wait_until(lambda: _in_state(pool, job.id, "dead"), within=10)
    assert dead.error == "lease expired: worker vanished stopped heartbeating"
    failed = await rounds.get_round(pool, round_id)
    assert failed.status == "failed"
    assert failed.error == "Generation failed after 1 attempt(s). You can retry it."
