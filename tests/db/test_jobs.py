"""The job queue's primitives (workers racing and dying are tested with the worker)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from db import jobs
from tests.db.test_rounds import Listener

LEASE = timedelta(minutes=1)


async def test_dedupe_key_returns_the_first_job_for_all_time(pool) -> None:  # type: ignore[no-untyped-def]
    first, created = await jobs.enqueue(pool, "train_classifier", {"a": 1}, dedupe_key="k")
    assert created
    [claimed] = await jobs.claim(pool, ["train_classifier"], "w", LEASE)
    assert await jobs.complete(pool, claimed, "w", {"ok": True})
    again, created = await jobs.enqueue(pool, "train_classifier", {"a": 2}, dedupe_key="k")
    assert not created and again.id == first.id and again.state == "done"
    racing = await asyncio.gather(
        *(jobs.enqueue(pool, "adapt_sd", dedupe_key="week-48") for _ in range(20))
    )
    assert sum(created for _, created in racing) == 1
    assert len({job.id for job, _ in racing}) == 1


async def test_concurrent_claims_never_share_a_job(pool) -> None:  # type: ignore[no-untyped-def]
    for i in range(40):
        await jobs.enqueue(pool, "generate", {"i": i})
    batches = await asyncio.gather(
        *(jobs.claim(pool, ["generate"], f"w{n}", LEASE, limit=3) for n in range(20))
    )
    ids = [job.id for batch in batches for job in batch]
    assert len(ids) == len(set(ids)) == 40


async def test_priority_then_age_order(pool) -> None:  # type: ignore[no-untyped-def]
    low, _ = await jobs.enqueue(pool, "generate", {"n": "low"})
    high, _ = await jobs.enqueue(pool, "generate", {"n": "high"}, priority=5)
    later, _ = await jobs.enqueue(pool, "generate", {"n": "later"}, delay=timedelta(hours=1))
    claimed = await jobs.claim(pool, ["generate", "score"], "w", LEASE, limit=10)
    assert [j.id for j in claimed] == [high.id, low.id]  # the delayed one is not due
    assert await jobs.queue_position(pool, later) == 1


async def test_failures_back_off_then_dead_letter(pool, database_url: str) -> None:  # type: ignore[no-untyped-def]
    job, _ = await jobs.enqueue(pool, "score", max_attempts=2)
    [claimed] = await jobs.claim(pool, ["score"], "w", LEASE)
    retried = await jobs.fail(pool, claimed, "w", "flaky", backoff=timedelta(seconds=30))
    assert retried.state == "queued" and retried.error == "flaky"
    assert await jobs.claim(pool, ["score"], "w", LEASE) == []  # backing off
    await pool.execute("UPDATE jobs SET run_after = now()")
    async with Listener(database_url, jobs.JOB_DONE_CHANNEL) as done:
        [claimed] = await jobs.claim(pool, ["score"], "w", LEASE)
        assert claimed.attempts == 2
        dead = await jobs.fail(pool, claimed, "w", "still flaky")
        assert dead.state == "dead" and dead.finished_at is not None
        assert await done.next() == {"id": job.id, "kind": "score", "state": "dead"}
    revived = await jobs.retry(pool, job.id)
    assert revived.state == "queued" and revived.attempts == 0
    assert await jobs.retry(pool, job.id) is None  # only dead or cancelled jobs


async def test_expired_leases_are_taken_back_and_fenced(pool) -> None:  # type: ignore[no-untyped-def]
    job, _ = await jobs.enqueue(pool, "generate", max_attempts=2)
    [first] = await jobs.claim(pool, ["generate"], "dead-worker", LEASE)
    await pool.execute("UPDATE jobs SET lease_expires_at = now() - interval '1 second'")
    [requeued] = await jobs.requeue_expired(pool, backoff=timedelta(seconds=30))
    assert requeued.state == "queued" and "dead-worker" in requeued.error
    # What killed its worker may kill the next one: it backs off like a failed attempt.
    assert await jobs.claim(pool, ["generate"], "live-worker", LEASE) == []
    await pool.execute("UPDATE jobs SET run_after = now()")
    [second] = await jobs.claim(pool, ["generate"], "live-worker", LEASE)
    # The first worker wakes up: its heartbeat and completion are refused.
    assert await jobs.heartbeat(pool, [job.id], "dead-worker", LEASE) == set()
    assert not await jobs.complete(pool, first, "dead-worker", {"stale": True})
    assert await jobs.heartbeat(pool, [job.id], "live-worker", LEASE) == {job.id}
    assert await jobs.complete(pool, second, "live-worker", {"ok": 1})
    final = await jobs.get(pool, job.id)
    assert final.state == "done" and final.result == {"ok": 1} and final.attempts == 2
    # The history stays readable: who had it before, and why it was taken back.
    assert final.error == "lease expired: worker dead-worker stopped heartbeating"
    assert final.worker_id == "live-worker"
    # Spent attempts: an expired lease dead-letters instead.
    other, _ = await jobs.enqueue(pool, "generate", max_attempts=1)
    await jobs.claim(pool, ["generate"], "dead-worker", LEASE)
    await pool.execute("UPDATE jobs SET lease_expires_at = now() WHERE id = $1", other.id)
    [dead] = await jobs.requeue_expired(pool)
    assert dead.state == "dead"


async def test_release_and_cancel(pool) -> None:  # type: ignore[no-untyped-def]
    job, _ = await jobs.enqueue(pool, "generate")
    [claimed] = await jobs.claim(pool, ["generate"], "w", LEASE)
    assert await jobs.release(pool, claimed, "w")
    back = await jobs.get(pool, job.id)
    assert back.state == "queued" and back.attempts == 0
    assert await jobs.cancel(pool, [job.id]) == [job.id]
    assert (await jobs.get(pool, job.id)).state == "cancelled"


async def test_claim_matching_batches_compatible_jobs(pool) -> None:  # type: ignore[no-untyped-def]
    for size in (512, 768, 512, 512):
        await jobs.enqueue(pool, "generate", {"size": size})
    batch = await jobs.claim_matching(pool, "generate", {"size": 512}, "w", LEASE, limit=10)
    assert len(batch) == 3 and all(j.payload["size"] == 512 for j in batch)


async def test_workers_are_listed_with_their_heartbeat(pool) -> None:  # type: ignore[no-untyped-def]
    await jobs.register_worker(pool, "gpu-1:42", ["generate"], "cuda:0")
    await jobs.touch_worker(pool, "gpu-1:42", 17)
    [worker] = await jobs.list_workers(pool)
    assert worker.current_job_id == 17 and worker.kinds == ["generate"]
    await jobs.stop_worker(pool, "gpu-1:42")
    assert (await jobs.list_workers(pool))[0].stopped_at is not None


async def test_training_is_enqueued_once_while_active(pool) -> None:  # type: ignore[no-untyped-def]
    results = await asyncio.gather(
        *(jobs.enqueue_training(pool, "classifier", requested_by=f"u{i}") for i in range(10))
    )
    assert sum(created for _, created in results) == 1
    [claimed] = await jobs.claim(pool, ["train_classifier"], "w", LEASE)
    job, created = await jobs.enqueue_training(pool, "classifier", requested_by="again")
    assert not created and job.id == claimed.id  # still running
    await jobs.complete(pool, claimed, "w", {"summary": "ok"})
    job, created = await jobs.enqueue_training(pool, "classifier", requested_by="again")
    assert created and job.payload == {"requested_by": "again"}
    # A schedule's period runs once, even after the job finished.
    sched, created = await jobs.enqueue_training(
        pool, "sd", requested_by="schedule", dedupe_key="schedule:adapt_sd:2026-W48"
    )
    [claimed] = await jobs.claim(pool, ["adapt_sd"], "w", LEASE)
    await jobs.complete(pool, claimed, "w", None)
    again, created = await jobs.enqueue_training(
        pool, "sd", requested_by="schedule", dedupe_key="schedule:adapt_sd:2026-W48"
    )
    assert not created and again.id == sched.id


async def test_the_queue_leaves_what_a_death_means_to_its_caller(pool) -> None:  # type: ignore[no-untyped-def]
    """The queue knows no job kind: a dead generate job's round is failed by the worker
    (tests/pipeline/test_worker.py), in the transaction that dead-letters the job."""
    from db import rounds
    from tests.factories import queued_round

    round_id = await queued_round(pool, requester=1)
    [job] = await jobs.claim(pool, ["generate"], "w", LEASE)
    await rounds.start_generating(pool, round_id)
    dead = await jobs.fail(pool, job, "w", "CUDA out of memory", retry=False)
    assert dead.state == "dead"
    assert (await rounds.get_round(pool, round_id)).status == "generating"
