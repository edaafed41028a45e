"""The scheduler: cron parsing, periods, de-duplication across schedulers, the retrain gate."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from db import jobs, rounds
from db.choices import record_choice
from pipeline.scheduler import (
    Scheduler,
    _crontab_weekdays,
    cron_trigger,
    period_start,
    unstarted_error,
)
from tests.factories import queued_round, ready_round
from tests.pipeline.conftest import make_settings, wait_until

WEDNESDAY = datetime(2026, 11, 25, 6, 30, tzinfo=UTC)
LEASE = timedelta(minutes=1)


def test_crontab_weekdays_count_sunday_as_zero() -> None:
    assert _crontab_weekdays("0") == _crontab_weekdays("7") == "sun"
    assert _crontab_weekdays("1-5") == "mon,tue,wed,thu,fri"
    assert _crontab_weekdays("*/2") == "sun,tue,thu,sat"
    assert _crontab_weekdays("5-7,mon") == "fri,sat,sun,mon"
    assert _crontab_weekdays("*") == "*" and _crontab_weekdays("mon-fri") == "mon-fri"
    with pytest.raises(ValueError, match="not within 0-7"):
        _crontab_weekdays("3-9")


def test_a_period_is_the_latest_fire_time_at_or_before_now() -> None:
    weekly = cron_trigger("0 4 * * 0", "UTC")  # Sundays 04:00
    assert period_start(weekly, WEDNESDAY) == datetime(2026, 11, 22, 4, 0, tzinfo=UTC)
    assert period_start(weekly, datetime(2026, 11, 22, 4, 0, tzinfo=UTC)) == datetime(
        2026, 11, 22, 4, 0, tzinfo=UTC
    )
    every5 = cron_trigger("*/5 * * * *", "UTC")
    assert period_start(every5, WEDNESDAY.replace(minute=7, second=3)) == WEDNESDAY.replace(
        minute=5
    )
    nightly_paris = cron_trigger("0 3 * * *", "Europe/Paris")
    assert period_start(nightly_paris, WEDNESDAY) == datetime(2026, 11, 25, 2, 0, tzinfo=UTC)
    seconds = cron_trigger("*/2 * * * * *", "UTC")  # six fields: seconds first
    assert period_start(seconds, WEDNESDAY.replace(second=3)) == WEDNESDAY.replace(second=2)


def test_an_invalid_cron_names_its_setting() -> None:
    settings = make_settings(schedules={"adapt_sd": "0 4 * *"})
    with pytest.raises(ValueError) as error:
        Scheduler(None, settings)  # type: ignore[arg-type]
    assert str(error.value) == (
        "HPS_SCHEDULES__ADAPT_SD (schedules.adapt_sd): invalid cron: "
        "'0 4 * *' has 4 fields, not 5 (or 6 with seconds first)"
    )
    with pytest.raises(
        ValueError,
        match=r"HPS_SCHEDULES__RETRAIN_CLASSIFIER .*higher than the maximum value \(59\)",
    ):
        Scheduler(None, make_settings(schedules={"retrain_classifier": "99 3 * * *"}))  # type: ignore[arg-type]
    with pytest.raises(ValueError) as error:
        Scheduler(None, make_settings(schedules={"timezone": "Mars/Olympus"}))  # type: ignore[arg-type]
    assert str(error.value) == (
        "HPS_SCHEDULES__TIMEZONE (schedules.timezone): unknown time zone 'Mars/Olympus'"
    )


async def test_two_schedulers_and_a_restart_enqueue_a_period_once(pool) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(schedules={"adapt_sd": "0 4 * * 0"})
    first, second = Scheduler(pool, settings), Scheduler(pool, settings)
    fired = await asyncio.gather(
        first.fire("adapt_sd", WEDNESDAY), second.fire("adapt_sd", WEDNESDAY)
    )
    assert sorted(f.action for f in fired) == ["enqueued", "existing"]
    assert fired[0].job_id == fired[1].job_id
    job = await jobs.get(pool, fired[0].job_id)
    assert job.kind == "adapt_sd" and job.dedupe_key == (
        "schedule:adapt_sd:2026-11-22T04:00:00+00:00"
    )
    assert job.requested_by == "schedule:adapt_sd"
    # The job runs and finishes; a restarted scheduler firing again in the same week
    # finds the period's job and enqueues nothing.
    [claimed] = await jobs.claim(pool, ["adapt_sd"], "w", LEASE)
    assert await jobs.complete(pool, claimed, "w", {"ok": True})
    restarted = Scheduler(pool, settings)
    again = await restarted.fire("adapt_sd", WEDNESDAY + timedelta(days=2))
    assert again.action == "existing" and again.job_id == job.id
    next_week = await restarted.fire("adapt_sd", WEDNESDAY + timedelta(days=7))
    assert next_week.action == "enqueued" and next_week.job_id != job.id
    assert await pool.fetchval("SELECT count(*) FROM jobs WHERE kind = 'adapt_sd'") == 2


async def test_live_schedulers_fire_each_period_once(pool, caplog) -> None:  # type: ignore[no-untyped-def]
    """Two running schedulers firing every second, while a worker finishes each job."""
    settings = make_settings(
        schedules={
            "adapt_sd": "* * * * * *",
            "retrain_classifier": None,
            "close_stale_rounds": None,
        }
    )
    caplog.set_level(logging.INFO, logger="pipeline.scheduler")
    started = [Scheduler(pool, settings).start() for _ in range(2)]
    try:
        deadline = asyncio.get_running_loop().time() + 3.2
        while asyncio.get_running_loop().time() < deadline:
            for job in await jobs.claim(pool, ["adapt_sd"], "w", LEASE, limit=5):
                await jobs.complete(pool, job, "w")
            await asyncio.sleep(0.05)
    finally:
        for scheduler in started:
            scheduler.shutdown(wait=False)

    async def settled() -> tuple[list[str], Counter[str]] | None:
        """The jobs' keys and the firings' logged actions, once they tell the same story: a
        firing under way at shutdown may have committed its job and not logged it yet."""
        logged = Counter(
            r.getMessage().split()[2] for r in caplog.records if r.name == "pipeline.scheduler"
        )
        rows = await pool.fetch("SELECT dedupe_key FROM jobs ORDER BY id")
        return (
            ([r["dedupe_key"] for r in rows], logged) if logged["enqueued"] == len(rows) else None
        )

    keys, actions = await wait_until(settled, within=5)
    periods = [datetime.fromisoformat(k.removeprefix("schedule:adapt_sd:")) for k in keys]
    # One job per period (a whole second), although both schedulers fired for each.
    assert 2 <= len(periods) <= 4 and periods == sorted(set(periods))
    assert all(p.microsecond == 0 for p in periods)
    assert actions["enqueued"] == len(periods) and actions["existing"] >= 1, actions


async def test_retraining_waits_for_enough_new_requester_choices(pool) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(schedules={"retrain_min_new_choices": 2})
    scheduler = Scheduler(pool, settings)
    first = await ready_round(pool, requester=1)
    await record_choice(pool, round_id=first, discord_user_id=1, verdict="pick", position=2)
    await record_choice(pool, round_id=first, discord_user_id=5, verdict="tie")  # not requester
    skipped = await scheduler.fire("retrain_classifier", WEDNESDAY)
    assert skipped.action == "skipped" and skipped.job_id is None
    assert skipped.detail == "1 new requester choice(s) since the last training, 2 needed"
    second = await ready_round(pool, requester=2, prompt="a blue cone")
    await record_choice(pool, round_id=second, discord_user_id=2, verdict="none")
    fired = await scheduler.fire("retrain_classifier", WEDNESDAY)
    assert fired.action == "enqueued"
    job = await jobs.get(pool, fired.job_id)
    assert job.kind == "train_classifier" and job.payload["new_choices"] == 2
    assert job.dedupe_key == "schedule:retrain_classifier:2026-11-25T03:00:00+00:00"
    # A training that skipped (too few examples) trained nothing: the count goes on.
    [claimed] = await jobs.claim(pool, ["train_classifier"], "w", LEASE)
    await jobs.complete(pool, claimed, "w", {"status": "skipped", "summary": "too few"})
    again = await scheduler.fire("retrain_classifier", WEDNESDAY + timedelta(days=1))
    assert again.action == "enqueued" and again.job_id != claimed.id
    # Once a training finishes, the count starts again from its start; clicking the same
    # image again is no new choice.
    [claimed] = await jobs.claim(pool, ["train_classifier"], "w", LEASE)
    await jobs.complete(pool, claimed, "w", {"status": "done"})
    await record_choice(pool, round_id=second, discord_user_id=2, verdict="none")
    later = await scheduler.fire("retrain_classifier", WEDNESDAY + timedelta(days=2))
    assert later.action == "skipped" and later.detail.startswith("0 new requester choice(s)")


async def test_stale_rounds_are_closed_in_place(pool) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(limits={"round_ttl_minutes": 60})
    old = await ready_round(pool, requester=1)
    fresh = await ready_round(pool, requester=2)
    await pool.execute("UPDATE rounds SET ready_at = now() - interval '2 hours' WHERE id = $1", old)
    fired = await Scheduler(pool, settings).fire("close_stale_rounds")
    assert fired.action == "closed" and fired.detail == "1 round(s) closed"
    assert (await rounds.get_round(pool, old)).status == "closed"
    assert (await rounds.get_round(pool, fresh)).status == "ready"
    assert await pool.fetchval("SELECT count(*) FROM jobs WHERE kind <> 'generate'") == 0


async def test_score_images_is_enqueued_once_per_period_and_only_when_needed(pool) -> None:  # type: ignore[no-untyped-def]
    scheduler = Scheduler(pool, make_settings(schedules={"score_images_batch": 50}))
    skipped = await scheduler.fire("score_images", WEDNESDAY)
    assert skipped.action == "skipped" and skipped.job_id is None
    await ready_round(pool, requester=1)
    first = await scheduler.fire("score_images", WEDNESDAY)
    again = await scheduler.fire("score_images", WEDNESDAY + timedelta(minutes=3))
    assert (first.action, again.action) == ("enqueued", "existing")
    assert again.job_id == first.job_id
    job = await jobs.get(pool, first.job_id)
    assert job.kind == "score_images" and job.payload["limit"] == 50
    # The next period waits while that job is still queued or running...
    busy = await scheduler.fire("score_images", WEDNESDAY + timedelta(minutes=10))
    assert (busy.action, busy.job_id) == ("existing", first.job_id)
    [claimed] = await jobs.claim(pool, ["score_images"], "w", LEASE)
    await jobs.complete(pool, claimed, "w", {"scored": 0})
    # ...and enqueues once it is done (the image is still unscored here).
    later = await scheduler.fire("score_images", WEDNESDAY + timedelta(minutes=10))
    assert later.action == "enqueued" and later.job_id != first.job_id


async def test_adapters_in_testing_are_reviewed_in_place(pool) -> None:  # type: ignore[no-untyped-def]
    from db import models

    settings = make_settings(adapt={"min_live_rounds": 1, "max_live_days": 1})
    scheduler = Scheduler(pool, settings)
    idle = await scheduler.fire("review_adapters", WEDNESDAY)
    assert (idle.action, idle.detail) == ("reviewed", "no adapter in testing")
    await models.ensure_base(pool, kind="sd_base", artifact="tiny-sd")
    adapter = await models.register(pool, kind="sd_adapter", artifact="/m/a")
    await models.start_testing(pool, adapter.id, actor="test")
    kept = await scheduler.fire("review_adapters")
    assert kept.detail == f"{adapter.name}: keep" and kept.job_id is None
    await pool.execute(
        "UPDATE model_events SET created_at = now() - interval '2 days' WHERE action = 'testing'"
    )
    retired = await scheduler.fire("review_adapters")
    assert retired.detail == f"{adapter.name}: retire"
    assert (await models.get(pool, adapter.id)).status == "retired"
    [event] = [e for e in await models.events(pool, "sd_adapter") if e["action"] == "retired"]
    assert event["actor"] == "schedule:review_adapters"
    assert event["reason"].startswith("no decided A/B rounds against sd_base:tiny-sd yet")
    assert await pool.fetchval("SELECT count(*) FROM jobs") == 0  # no queue work


def test_the_weekly_sd_adaptation_is_off_unless_a_maintainer_turns_it_on() -> None:
    """Hours of paid GPU time nobody asked for: off by default."""
    assert make_settings().schedules.adapt_sd is None
    assert "adapt_sd" not in Scheduler(None, make_settings()).triggers  # type: ignore[arg-type]


async def test_rounds_no_worker_started_in_time_fail_and_free_their_requesters(pool) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(limits={"queued_round_minutes": 30})
    waited = await queued_round(pool, requester=1)
    fresh = await queued_round(pool, requester=2, prompt="a blue cone")
    started = await queued_round(pool, requester=3, prompt="a green ball")
    # The first and the third were queued 40 minutes ago; a worker took the third.
    await pool.execute(
        "UPDATE jobs SET created_at = now() - interval '40 minutes', "
        "run_after = now() - interval '40 minutes' WHERE (payload->>'round_id')::int <> $1",
        fresh,
    )
    [claimed] = await jobs.claim(pool, ["generate"], "w", LEASE, limit=1)
    assert claimed.payload["round_id"] == waited  # oldest first: requeue it as if it died
    await pool.execute(
        "UPDATE jobs SET state = 'queued', worker_id = NULL WHERE id = $1", claimed.id
    )
    # A worker runs the third (its lease held): a job being run is never touched.
    await pool.execute(
        "UPDATE jobs SET state = 'running', worker_id = 'w2', attempts = 1, "
        "lease_expires_at = now() + interval '1 hour' WHERE (payload->>'round_id')::int = $1",
        started,
    )
    await rounds.start_generating(pool, started)
    fired = await Scheduler(pool, settings).fire("close_stale_rounds")
    assert fired.detail == "0 round(s) closed, 1 never started failed"
    failed = await rounds.get_round(pool, waited)
    assert (failed.status, failed.error) == ("failed", unstarted_error(30))
    assert "within 30 minutes" in failed.error and "You can retry it." in failed.error
    assert (await rounds.get_round(pool, fresh)).status == "queued"
    assert (await rounds.get_round(pool, started)).status == "generating"
    states = dict(await pool.fetch("SELECT (payload->>'round_id')::int, state FROM jobs"))
    assert states == {waited: "cancelled", fresh: "queued", started: "running"}
    # The requester is no longer held at the in-flight limit, and a retry waits anew.
    await rounds.check_may_dream(pool, 1, rounds.Limits(in_flight=1))
    job = await rounds.retry_round(pool, waited)
    assert job is not None and job.state == "queued"
    again = await Scheduler(pool, settings).fire("close_stale_rounds")
    assert again.detail == "0 round(s) closed"
    # 0 turns the deadline off.
    off = make_settings(limits={"queued_round_minutes": 0})
    await pool.execute(
        "UPDATE jobs SET created_at = now() - interval '9 hours', "
        "run_after = now() - interval '9 hours'"
    )
    assert (await Scheduler(pool, off).fire("close_stale_rounds")).detail == "0 round(s) closed"


async def test_a_dead_workers_jobs_come_back_without_another_worker(pool) -> None:  # type: ignore[no-untyped-def]
    """The only worker died mid-job: the scheduler takes its expired leases back (requeued,
    or dead with the round failed at the last attempt), and a round whose job then waits in
    the queue past `limits.queued_round_minutes` fails like one never started."""
    settings = make_settings(limits={"queued_round_minutes": 30})
    scheduler = Scheduler(pool, settings)
    assert "requeue_expired_jobs" in scheduler.triggers  # on by default
    retried = await queued_round(pool, requester=1)
    last = await queued_round(pool, requester=2, prompt="a blue cone")
    held = await queued_round(pool, requester=3, prompt="a green ball")
    claimed = await jobs.claim(pool, ["generate"], "dead-worker", LEASE, limit=3)
    assert len(claimed) == 3
    for round_id in (retried, last, held):
        await rounds.start_generating(pool, round_id)
    await pool.execute(
        "UPDATE jobs SET lease_expires_at = now() - interval '1 second', "
        "attempts = CASE WHEN (payload->>'round_id')::int = $1 THEN max_attempts ELSE 1 END "
        "WHERE (payload->>'round_id')::int <> $2",
        last,
        held,
    )
    fired = await scheduler.fire("requeue_expired_jobs")
    assert (fired.action, fired.detail) == ("requeued", "1 job(s) requeued, 1 dead-lettered")
    states = dict(await pool.fetch("SELECT (payload->>'round_id')::int, state FROM jobs"))
    assert states == {retried: "queued", last: "dead", held: "running"}
    dead = await rounds.get_round(pool, last)
    assert dead.status == "failed" and dead.error.startswith("Generation failed after")
    assert (await rounds.get_round(pool, retried)).status == "generating"
    again = await scheduler.fire("requeue_expired_jobs")
    assert (again.action, again.detail) == ("skipped", "no expired lease")
    # No worker takes the requeued job: past the deadline its generating round fails.
    assert (await scheduler.fire("close_stale_rounds")).detail == "0 round(s) closed"
    await pool.execute(
        "UPDATE jobs SET run_after = now() - interval '31 minutes', "
        "created_at = now() - interval '40 minutes' WHERE state = 'queued'"
    )
    swept = await scheduler.fire("close_stale_rounds")
    assert swept.detail == "0 round(s) closed, 1 never started failed"
    failed = await rounds.get_round(pool, retried)
    assert (failed.status, failed.error) == ("failed", unstarted_error(30))
    assert (await rounds.get_round(pool, held)).status == "generating"


async def test_the_scheduler_heartbeats_while_it_runs(pool) -> None:  # type: ignore[no-untyped-def]
    from db import services

    settings = make_settings(
        schedules={
            "close_stale_rounds": None,
            "requeue_expired_jobs": None,
            "score_images": None,
            "review_adapters": None,
        },
        health={"heartbeat_seconds": 0.05, "stale_seconds": 1},
    )
    stop = asyncio.Event()
    task = asyncio.create_task(Scheduler(pool, settings).run(stop))
    try:
        for _ in range(100):
            found = await services.list_services(pool, "scheduler", timedelta(seconds=1))
            if found:
                break
            await asyncio.sleep(0.05)
        [service] = found
        assert service.alive and service.state == {"schedules": ["retrain_classifier"]}
    finally:
        stop.set()
        await task
    [service] = await services.list_services(pool, "scheduler", timedelta(seconds=1))
    assert service.stopped_at is not None and not service.alive
