"""The scheduler: cron schedules (`settings.schedules`) that enqueue work, never run it.

APScheduler 3.x (`AsyncIOScheduler`, an in-memory job store built from the settings at start)
fires the schedules; each firing only touches the database:

- `retrain_classifier` enqueues a `train_classifier` job when at least
  `schedules.retrain_min_new_choices` requester choices arrived since the last training
  job that finished;
- `adapt_sd` enqueues an `adapt_sd` job;
- `close_stale_rounds` closes rounds ready for longer than `limits.round_ttl_minutes`
  (a single idempotent UPDATE, run in place), and fails the rounds no worker started within
  `limits.queued_round_minutes` (a round back in the queue after its worker died or a
  failed attempt included), cancelling their generate jobs (their requesters see why and
  may retry; their in-flight slots are free again);
- `requeue_expired_jobs` takes back the jobs whose worker stopped heartbeating
  (`pipeline.worker.requeue_expired`: requeued with backoff, or dead-lettered with their
  kind's `on_dead` hook when their attempts are spent), as every worker does too, so that a
  dead worker's jobs come back even when no other worker runs;
- `score_images` enqueues a `score_images` job when served images lack an HPS score;
- `review_adapters` reviews the adapters in live A/B testing (`pipeline.adapt.live`:
  promote the significantly better, retire the worse), DB-only work run in place, in one
  transaction under the registry's lock, so overlapping reviews are harmless.

Training jobs go through `db.jobs.enqueue_training` (the same entry point as /retrain) with
the dedupe key `schedule:<name>:<period start>`, the period being the schedule's latest
fire time; so any number of schedulers, or one restarted, enqueue a period at most once.

The weekly `adapt_sd` schedule is off by default: a run takes hours of GPU time, which a
maintainer turns on deliberately (`schedules.adapt_sd`).

While it runs, the scheduler heartbeats its row in `services` every
`health.heartbeat_seconds` (`hps health scheduler`).

Cron expressions have the crontab's five fields (minute hour day month weekday, weekday 0 or
7 = Sunday), or six with seconds first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import asyncpg
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger

from db import images, jobs, rounds, services, stats
from hps.settings import Settings
from pipeline import worker
from pipeline.adapt import live

log = logging.getLogger(__name__)

SCHEDULES = (
    "retrain_classifier",
    "adapt_sd",
    "close_stale_rounds",
    "requeue_expired_jobs",
    "score_images",
    "review_adapters",
)
TRAINING_TARGETS = {"retrain_classifier": "classifier", "adapt_sd": "sd"}
WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def _crontab_weekdays(field: str) -> str:
    """The crontab weekday field in APScheduler 3's terms: numbers become names, since
    APScheduler 3 counts 0 as Monday where crontab counts 0 (and 7) as Sunday."""
    parts: list[str] = []
    for part in field.split(","):
        span, _, step = part.partition("/")
        if span != "*" and not span.replace("-", "").isdigit():
            parts.append(part)  # names mean the same to both
            continue
        if span == "*":
            if not step:
                parts.append(part)
                continue
            first, last = 0, 6
        elif "-" in span:
            first, last = (int(x) for x in span.split("-", 1))
        else:
            first = int(span)
            last = 6 if step else first
        if not (0 <= first <= last <= 7):
            raise ValueError(f"weekday {part!r} is not within 0-7")
        for day in range(first, last + 1, int(step or 1)):
            if WEEKDAYS[day % 7] not in parts:
                parts.append(WEEKDAYS[day % 7])
    return ",".join(parts)


def cron_trigger(expr: str, timezone: str) -> CronTrigger:
    """A trigger from a crontab expression (5 fields, or 6 with seconds first)."""
    fields = expr.split()
    if len(fields) not in (5, 6):
        raise ValueError(f"{expr!r} has {len(fields)} fields, not 5 (or 6 with seconds first)")
    second = fields.pop(0) if len(fields) == 6 else "0"
    minute, hour, day, month, weekday = fields
    return CronTrigger(
        second=second,
        minute=minute,
        hour=hour,
        day=day,
        month=month,
        day_of_week=_crontab_weekdays(weekday),
        timezone=ZoneInfo(timezone),
    )


def period_start(trigger: CronTrigger, now: datetime) -> datetime | None:
    """The trigger's latest fire time at or before `now` (None if it never fired in the
    last ~2 years): the period a firing at `now` stands for."""
    window = timedelta(minutes=1)
    while window < timedelta(days=800):
        fire = trigger.get_next_fire_time(None, now - window)
        if fire is not None and fire <= now:
            while (later := trigger.get_next_fire_time(None, fire + timedelta(seconds=1))) and (
                later <= now
            ):
                fire = later
            return fire
        window *= 2
    return None


def unstarted_error(minutes: int) -> str:
    """Why a round that no worker started failed (shown to its requester)."""
    return (
        f"No image generator took this round within {minutes} minutes (none may be running), "
        "so it was given up and nothing was generated. You can retry it."
    )


@dataclass(frozen=True)
class Firing:
    """What one firing of a schedule did."""

    schedule: str
    period: datetime
    action: str  # enqueued | existing | skipped | closed | requeued | reviewed
    job_id: int | None = None
    detail: str = ""


class Scheduler:
    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self.pool = pool
        self.settings = settings
        config = settings.schedules
        try:
            ZoneInfo(config.timezone)
        except (ValueError, ZoneInfoNotFoundError):
            raise ValueError(
                f"HPS_SCHEDULES__TIMEZONE (schedules.timezone): unknown time zone "
                f"{config.timezone!r}"
            ) from None
        self.triggers: dict[str, CronTrigger] = {}
        for name in SCHEDULES:
            expr = getattr(config, name)
            if not expr:
                continue
            try:
                self.triggers[name] = cron_trigger(expr, config.timezone)
            except ValueError as exc:
                env = f"HPS_SCHEDULES__{name.upper()}"
                raise ValueError(f"{env} (schedules.{name}): invalid cron: {exc}") from None

    async def fire(self, name: str, now: datetime | None = None) -> Firing:
        """Do what schedule `name` does for the period containing `now` (default: now)."""
        now = now or datetime.now(UTC)
        period = period_start(self.triggers[name], now) or now
        key = f"schedule:{name}:{period.astimezone(UTC).isoformat()}"
        if name == "close_stale_rounds":
            ttl = timedelta(minutes=self.settings.limits.round_ttl_minutes)
            closed = await rounds.close_stale_rounds(self.pool, ttl)
            detail = f"{len(closed)} round(s) closed"
            minutes = self.settings.limits.queued_round_minutes
            if minutes:
                failed = await rounds.fail_unstarted_rounds(
                    self.pool, timedelta(minutes=minutes), unstarted_error(minutes)
                )
                if failed:
                    detail += f", {len(failed)} never started failed"
            return Firing(name, period, "closed", detail=detail)
        if name == "requeue_expired_jobs":
            backoff = timedelta(seconds=self.settings.worker.backoff_seconds)
            taken = await worker.requeue_expired(self.pool, backoff)
            if not taken:
                return Firing(name, period, "skipped", detail="no expired lease")
            dead = [job.id for job in taken if job.state == "dead"]
            detail = f"{len(taken) - len(dead)} job(s) requeued, {len(dead)} dead-lettered"
            return Firing(name, period, "requeued", detail=detail)
        if name == "review_adapters":
            reviews = await live.review(self.pool, self.settings.adapt, actor=f"schedule:{name}")
            decided = ", ".join(f"{r.version.name}: {r.decision.action}" for r in reviews)
            return Firing(name, period, "reviewed", detail=decided or "no adapter in testing")
        payload: dict[str, object] = {"schedule": name, "period": period.isoformat()}
        if name == "score_images":
            if not await images.count_unscored(self.pool):
                return Firing(name, period, "skipped", detail="every shown image has a score")
            active = await jobs.active_of_kind(self.pool, "score_images")
            if active is not None:  # two at once would score the same images
                return Firing(name, period, "existing", active.id, "still scoring")
            payload["limit"] = self.settings.schedules.score_images_batch
            job, created = await jobs.enqueue(
                self.pool, "score_images", payload, dedupe_key=key, requested_by="schedule"
            )
            return Firing(name, period, "enqueued" if created else "existing", job.id)
        if name == "retrain_classifier":
            new = await stats.requester_choices_since_training(self.pool)
            needed = self.settings.schedules.retrain_min_new_choices
            if new < needed:
                detail = f"{new} new requester choice(s) since the last training, {needed} needed"
                return Firing(name, period, "skipped", detail=detail)
            payload["new_choices"] = new
        job, created = await jobs.enqueue_training(
            self.pool,
            TRAINING_TARGETS[name],
            requested_by=f"schedule:{name}",
            dedupe_key=key,
            payload=payload,
        )
        return Firing(name, period, "enqueued" if created else "existing", job.id)

    async def _fire_logged(self, name: str) -> None:
        try:
            firing = await self.fire(name)
        except Exception:
            log.exception("schedule %s failed", name, extra={"schedule": name})
            return
        # Every minute with nothing to take back: not worth a line at INFO.
        quiet = name == "requeue_expired_jobs" and firing.action == "skipped"
        log.log(
            logging.DEBUG if quiet else logging.INFO,
            "schedule %s: %s %s",
            name,
            firing.action,
            firing.detail or f"job {firing.job_id}",
            extra={"schedule": name, "period": firing.period.isoformat(), "job_id": firing.job_id},
        )

    def start(self) -> AsyncIOScheduler:
        """Start firing on the running event loop; the caller shuts the result down."""
        scheduler = AsyncIOScheduler(timezone=ZoneInfo(self.settings.schedules.timezone))
        for name, trigger in self.triggers.items():
            scheduler.add_job(
                self._fire_logged,
                trigger,
                args=[name],
                id=name,
                name=name,
                coalesce=True,  # after a stall, one firing for all missed ones
                max_instances=1,
                misfire_grace_time=300,
            )
        scheduler.start()
        for job in scheduler.get_jobs():
            log.info("schedule %s: next at %s", job.id, job.next_run_time.isoformat())
        if not self.triggers:
            log.warning("every schedule is off: nothing to do")
        return scheduler

    async def run(self, stop: asyncio.Event) -> None:
        """Fire schedules until `stop` is set, heartbeating meanwhile."""
        scheduler = self.start()
        state = {"schedules": sorted(self.triggers)}
        interval = self.settings.health.heartbeat_seconds
        try:
            while not stop.is_set():
                try:
                    await services.heartbeat(self.pool, "scheduler", state)
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    log.warning("scheduler heartbeat failed: %s", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), interval)
        finally:
            scheduler.shutdown(wait=False)
            with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                await services.stopped(self.pool, "scheduler")
