"""The worker: takes jobs of the kinds it declares from the queue and runs their handlers.

- Wake-ups: it LISTENs on `hps_jobs` on a connection of its own, and polls every
  `worker.poll_seconds` as well (a NOTIFY lost while the connection was down, a job whose
  backoff just ran out).
- Claims are leases (`db.jobs.claim`). While handlers run, a maintenance task heartbeats the
  jobs in hand (and those a handler took with `ctx.claim_matching`), touches the worker's
  row, and puts back jobs of workers that stopped heartbeating (`requeue_expired`): any
  worker may do that for any other.
- Outcomes: a handler's return value completes the job; `PermanentError` dead-letters it at
  once; any other exception fails the attempt (retried after a backoff doubling per attempt,
  dead-lettered when attempts are spent); `LeaseLost` (another worker took the job over)
  is only logged.
- A job that dies (dead-lettered here, or by `requeue_expired` when its worker vanished at
  its last attempt) runs its kind's hook in `pipeline.handlers.ON_DEAD` in the same
  transaction (`fail_job`, `requeue_expired`): a dead generate job fails its round.
- Shutdown (`stop()`, on SIGTERM/SIGINT): no new claims; jobs in hand run on for up to
  `worker.shutdown_grace_seconds`, after which their handlers are cancelled, which rolls
  back their open transaction, and the jobs are released untouched for another worker.
  Jobs claimed but not started are released at once. The worker's row is marked stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import traceback
from datetime import timedelta
from typing import Any

import asyncpg

from db import jobs
from db.connect import Executor, transaction
from hps.settings import Settings
from hps.storage import storage
from hps.store import ImageStore
from pipeline.handlers import (
    HANDLERS,
    ON_DEAD,
    JobContext,
    LeaseLost,
    OnDead,
    PermanentError,
    load_handler,
)

log = logging.getLogger(__name__)

DEFAULT_BACKOFF = timedelta(seconds=10)


async def fail_job(
    db: Executor,
    job: jobs.Job,
    worker_id: str,
    error: str,
    *,
    retry: bool = True,
    backoff: timedelta = DEFAULT_BACKOFF,
    on_dead: dict[str, OnDead] = ON_DEAD,
) -> jobs.Job | None:
    """`jobs.fail`, and if that dead-lettered the job, its kind's `on_dead` hook in the
    same transaction. None if the lease was lost (then nothing changed)."""
    async with transaction(db) as conn:
        failed = await jobs.fail(conn, job, worker_id, error, retry=retry, backoff=backoff)
        if failed is not None and failed.state == "dead":
            await _dead(conn, failed, on_dead)
        return failed


async def requeue_expired(
    db: Executor, backoff: timedelta = DEFAULT_BACKOFF, on_dead: dict[str, OnDead] = ON_DEAD
) -> list[jobs.Job]:
    """`jobs.requeue_expired`, and the `on_dead` hook of each job it dead-lettered, in the
    same transaction."""
    async with transaction(db) as conn:
        taken = await jobs.requeue_expired(conn, backoff)
        for job in taken:
            if job.state == "dead":
                await _dead(conn, job, on_dead)
        return taken


async def _dead(conn: asyncpg.Connection, job: jobs.Job, on_dead: dict[str, OnDead]) -> None:
    hook = on_dead.get(job.kind)
    if hook is not None:
        await hook(conn, job)


class Worker:
    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: Settings,
        *,
        kinds: list[str] | None = None,
        device: str = "cpu",
        device_label: str | None = None,
        concurrency: int | None = None,
        worker_id: str | None = None,
        registry: dict[str, str] | None = None,
        on_dead: dict[str, OnDead] | None = None,
        store: ImageStore | None = None,
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.registry = registry if registry is not None else HANDLERS
        # Every kind's hook, not only those of `kinds`: any worker may take back the expired
        # lease of another's job.
        self.on_dead = on_dead if on_dead is not None else ON_DEAD
        self.kinds = list(kinds if kinds is not None else settings.worker.kinds)
        unknown = sorted(set(self.kinds) - set(self.registry))
        if unknown or not self.kinds:
            raise ValueError(
                f"unknown job kind(s) {', '.join(unknown) or '(none given)'}: "
                f"choose from {', '.join(sorted(self.registry))}"
            )
        self.device = device
        # The device as the machine knows it (a process restricted to one GPU calls it cuda:0).
        self.device_label = device_label or device
        self.concurrency = concurrency or settings.worker.concurrency
        self.worker_id = worker_id or jobs.default_worker_id()
        self.store = store or storage(settings).images
        self.cache: dict[str, Any] = {}  # lives as long as the worker: resident models
        self.lease = timedelta(seconds=settings.worker.lease_seconds)
        self.backoff = timedelta(seconds=settings.worker.backoff_seconds)
        self._running: dict[asyncio.Task[None], JobContext] = {}
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._listener: asyncpg.Connection | None = None

    def stop(self) -> None:
        """Stop claiming and finish (see the module docstring); safe to call repeatedly."""
        if not self._stopping.is_set():
            log.info("worker %s stopping", self.worker_id, extra={"worker_id": self.worker_id})
        self._stopping.set()
        self._wake.set()

    async def run(self) -> None:
        """Run until `stop()`."""
        await jobs.register_worker(self.pool, self.worker_id, self.kinds, self.device_label)
        log.info(
            "worker %s takes %s on %s",
            self.worker_id,
            ",".join(self.kinds),
            self.device,
            extra={"worker_id": self.worker_id},
        )
        await self._listen()  # before the maintenance task, which re-LISTENs if it drops
        maintenance = asyncio.create_task(self._maintain())
        try:
            await self._loop()
            await self._drain()
        finally:
            maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await maintenance
            await self._unlisten()
            await jobs.stop_worker(self.pool, self.worker_id)
            log.info("worker %s stopped", self.worker_id, extra={"worker_id": self.worker_id})

    # -- claiming ----------------------------------------------------------------------

    async def _loop(self) -> None:
        poll = self.settings.worker.poll_seconds
        while not self._stopping.is_set():
            free = self.concurrency - len(self._running)
            claimed: list[jobs.Job] = []
            if free > 0:
                # Cleared before claiming, so a NOTIFY that lands during the claim is kept.
                self._wake.clear()
                try:
                    claimed = await jobs.claim(
                        self.pool, self.kinds, self.worker_id, self.lease, limit=free
                    )
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                    log.exception("claiming failed; trying again in %.1f s", poll)
                for job in claimed:
                    if self._stopping.is_set():  # SIGTERM during the claim: give it back
                        await jobs.release(self.pool, job, self.worker_id)
                        continue
                    self._start(job)
                if claimed and len(claimed) == free:
                    continue  # there may be more; claim again as soon as a slot frees
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), poll)

    def _start(self, job: jobs.Job) -> None:
        ctx = JobContext(
            job=job,
            settings=self.settings,
            pool=self.pool,
            store=self.store,
            worker_id=self.worker_id,
            device=self.device,
            cache=self.cache,
        )
        task = asyncio.create_task(self._run_job(ctx), name=f"job-{job.id}")
        self._running[task] = ctx
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.pop(task, None)
        self._wake.set()  # a slot is free

    async def _drain(self) -> None:
        if not self._running:
            return
        grace = self.settings.worker.shutdown_grace_seconds
        log.info("waiting up to %.0f s for %d job(s) in hand", grace, len(self._running))
        _, pending = await asyncio.wait(list(self._running), timeout=grace)
        for task in pending:
            task.cancel()  # the job is released in _run_job
        if pending:
            await asyncio.wait(pending)

    # -- running a job ------------------------------------------------------------------

    async def _run_job(self, ctx: JobContext) -> None:
        job = ctx.job
        extra = {"job_id": job.id, "job_kind": job.kind, "attempt": job.attempts}
        log.info("job %s (%s) started, attempt %d", job.id, job.kind, job.attempts, extra=extra)
        started = time.perf_counter()
        outcome = "unrecorded"
        try:
            outcome = await self._execute(ctx, extra)
        except asyncio.CancelledError:
            outcome = "released"
            ctx.cancelled.set()  # stops the handler's thread at its next step
            await self._release(ctx)
            raise
        except Exception:
            # The database failed us while recording the outcome: the lease will expire
            # and the job run again, so nothing is lost.
            log.exception("job %s: recording its outcome failed", job.id, extra=extra)
        finally:
            log.info(
                "job %s %s in %.2f s",
                job.id,
                outcome,
                time.perf_counter() - started,
                extra={**extra, "outcome": outcome},
            )

    async def _execute(self, ctx: JobContext, extra: dict[str, Any]) -> str:
        """Run the handler and record its outcome; returns the outcome's name."""
        job = ctx.job
        outcome = "done"
        try:
            handler = load_handler(job.kind, self.registry)
            try:
                result = await handler(ctx)
            finally:
                ctx.finishing = True
            if not ctx.completed and not await jobs.complete(
                self.pool, job, self.worker_id, result
            ):
                raise LeaseLost(f"job {job.id} was taken over by another worker")
            await self._settle_extras(ctx, None)
        except LeaseLost as exc:
            outcome = "lost"
            log.warning("job %s: %s", job.id, exc, extra=extra)
            await self._settle_extras(ctx, None)
        except PermanentError as exc:
            outcome = "dead"
            log.error("job %s failed permanently: %s", job.id, exc, extra=extra)
            await self._fail(job, str(exc), retry=False)
            await self._settle_extras(ctx, None)
        except Exception as exc:
            error = "".join(traceback.format_exception(exc)).strip()
            failed = await self._fail(job, error)
            outcome = {"queued": "failed, will retry", "dead": "dead"}.get(
                failed.state if failed else "", "lost"
            )
            log.exception("job %s failed (%s)", job.id, outcome, extra=extra)
            await self._settle_extras(ctx, error)
        return outcome

    async def _settle_extras(self, ctx: JobContext, error: str | None) -> None:
        """Jobs a handler claimed but did not finish: failed with the handler's error, or
        released untouched if it returned (the fencing leaves finished ones alone)."""
        for extra_job in ctx.extra_jobs:
            if error is None:
                await jobs.release(self.pool, extra_job, self.worker_id)
            else:
                await self._fail(extra_job, error)

    async def _fail(self, job: jobs.Job, error: str, *, retry: bool = True) -> jobs.Job | None:
        return await fail_job(
            self.pool,
            job,
            self.worker_id,
            error,
            retry=retry,
            backoff=self.backoff,
            on_dead=self.on_dead,
        )

    async def _release(self, ctx: JobContext) -> None:
        for job in [ctx.job, *ctx.extra_jobs]:
            if await jobs.release(self.pool, job, self.worker_id):
                log.info("job %s released", job.id, extra={"job_id": job.id})

    # -- heartbeats, expired leases, wake-ups ------------------------------------------

    async def _maintain(self) -> None:
        interval = self.settings.worker.heartbeat_seconds
        while True:
            try:
                await self._heartbeat()
                requeued = await requeue_expired(self.pool, self.backoff, self.on_dead)
                for job in requeued:
                    log.warning(
                        "job %s %s: %s",
                        job.id,
                        "requeued" if job.state == "queued" else "dead-lettered",
                        job.error,
                        extra={"job_id": job.id, "job_kind": job.kind},
                    )
                if self._listener is None or self._listener.is_closed():
                    await self._listen()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                log.exception("worker maintenance failed; trying again in %d s", interval)
            await asyncio.sleep(interval)

    def _held(self) -> set[int]:
        """The jobs in hand that are not finished: neither completed by their handler nor
        being recorded by the worker (their row says so, or soon will)."""
        return {
            j.id
            for ctx in self._running.values()
            if not ctx.finishing
            for j in ([] if ctx.completed else [ctx.job]) + ctx.extra_jobs
        }

    async def _heartbeat(self) -> None:
        held = self._held()
        kept = await jobs.heartbeat(self.pool, sorted(held), self.worker_id, self.lease)
        # A job that finished while the heartbeat ran was not lost.
        for job_id in sorted((held - kept) & self._held()):
            log.warning("job %s: lease lost", job_id, extra={"job_id": job_id})
        current = min((ctx.job.id for ctx in self._running.values()), default=None)
        await jobs.touch_worker(self.pool, self.worker_id, current)

    async def _listen(self) -> None:
        """LISTEN on a pool connection held for the worker's life (released, the pool would
        reset it and drop the LISTEN)."""
        await self._unlisten()
        try:
            self._listener = await self.pool.acquire()
            await self._listener.add_listener(jobs.JOBS_CHANNEL, self._on_notify)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            log.exception("LISTEN failed; polling until it works")
            await self._unlisten()

    async def _unlisten(self) -> None:
        conn, self._listener = self._listener, None
        if conn is None:
            return
        with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            if not conn.is_closed():
                await conn.remove_listener(jobs.JOBS_CHANNEL, self._on_notify)
        with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            await self.pool.release(conn)

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        if payload in self.kinds:
            self._wake.set()
