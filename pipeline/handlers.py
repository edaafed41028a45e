"""The contract between the worker and the job handlers.

A handler is `async def handle(ctx: JobContext) -> result`, registered by job kind in
`HANDLERS` as a "module:function" string so that a worker imports only the handlers of the
kinds it takes (a CPU-only worker for `score` never imports diffusers).

- The returned value (JSON-serialisable) becomes the job's `result`, and the worker marks
  the job done. A handler whose effect must commit together with the completion (a
  generate job writing a round's images) calls `await ctx.complete(conn, result)` on the
  connection of its own transaction instead; the worker then does nothing more.
- Raising `PermanentError` dead-letters the job at once (bad payload, a round that no longer
  exists); any other exception is retried with backoff until attempts are spent.
- A handler may take more queued jobs of its kind to run in the same pass
  (`ctx.claim_matching`, e.g. rounds generated in one batched call). The worker heartbeats
  them with the handler's own job, and the handler completes each with
  `ctx.complete(conn, result, job=...)`; any it leaves unfinished are failed (if the
  handler raised) or released (if it returned) by the worker.
- `LeaseLost`: raise it (from `ctx.complete` returning False) to roll back a transaction
  whose job another worker has taken over; the worker logs it and moves on.
- What a job's death means beyond the queue is its kind's hook in `ON_DEAD`,
  `async def hook(conn, job)`: the worker runs it in the transaction that dead-letters the
  job (its handler raised `PermanentError` or spent its attempts, or its last worker
  vanished at its last attempt), whichever worker that is, so hooks stay light (no model
  imports). A dead generate job fails its round with a reason its requester reads.
- GPU or CPU-heavy work runs in a thread (`await asyncio.to_thread(...)`) so the worker's
  event loop keeps heartbeating; long work checks `ctx.cancelled` between steps.
- `ctx.cache` lives as long as the worker process: handlers keep loaded models there so
  they stay resident between jobs.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import asyncpg

from db import jobs, rounds
from db.connect import Executor
from hps.settings import Settings
from hps.store import ImageStore

HANDLERS: dict[str, str] = {
    "generate": "pipeline.generate:handle_generate",
    "score": "pipeline.score:handle_score",
    "score_images": "pipeline.score:handle_score_images",
    "train_classifier": "pipeline.train_classifier:handle_train_classifier",
    "adapt_sd": "pipeline.adapt.recipes:handle_adapt_sd",
}

OnDead = Callable[[asyncpg.Connection, jobs.Job], Awaitable[object]]

ON_DEAD: dict[str, OnDead] = {
    rounds.GENERATE_KIND: rounds.fail_round_of_dead_job,
}


class Cancelled(Exception):
    """Work in a thread noticed that its job was cancelled (the worker is stopping)."""


class PermanentError(Exception):
    """The job can never succeed as given: dead-letter it without retrying."""


class LeaseLost(Exception):
    """This worker no longer holds the job (its lease expired and another worker took it)."""


@dataclass
class JobContext:
    job: jobs.Job
    settings: Settings
    pool: asyncpg.Pool
    store: ImageStore
    worker_id: str
    device: str
    cache: dict[str, Any]
    log: logging.LoggerAdapter = field(init=False)
    completed: bool = field(default=False, init=False)
    # The handler returned or raised: the worker is recording the outcome (no heartbeats).
    finishing: bool = field(default=False, init=False)
    # Jobs taken by `claim_matching` and not finished yet, run along with `job`.
    extra_jobs: list[jobs.Job] = field(default_factory=list, init=False)
    # Set when the worker gives the job up (shutdown past its grace): long work in a thread
    # checks it between steps and raises `Cancelled`, since a thread cannot be interrupted.
    cancelled: threading.Event = field(default_factory=threading.Event, init=False)

    def __post_init__(self) -> None:
        self.log = logging.LoggerAdapter(
            logging.getLogger(f"pipeline.jobs.{self.job.kind}"),
            {"job_id": self.job.id, "job_kind": self.job.kind},
        )

    @property
    def lease(self) -> timedelta:
        return timedelta(seconds=self.settings.worker.lease_seconds)

    async def complete(
        self, conn: Executor, result: Any = None, job: jobs.Job | None = None
    ) -> bool:
        """Mark the job (or one of `extra_jobs`) done on `conn`, inside the caller's
        transaction. False if this worker lost the job's lease: the caller should roll back
        (raise `LeaseLost`)."""
        target = job or self.job
        done = await jobs.complete(conn, target, self.worker_id, result)
        if target.id == self.job.id:
            self.completed = done
        elif done:
            self.settled(target)
        return done

    def settled(self, job: jobs.Job) -> None:
        """Forget an extra job the handler finished itself (no more heartbeats for it)."""
        self.extra_jobs = [j for j in self.extra_jobs if j.id != job.id]

    async def claim_matching(self, payload_contains: dict[str, Any], limit: int) -> list[jobs.Job]:
        """Take up to `limit` more queued jobs of this kind whose payload contains
        `payload_contains`, to run in this pass; they are heartbeated with this job."""
        if limit <= 0:
            return []
        claimed = await jobs.claim_matching(
            self.pool, self.job.kind, payload_contains, self.worker_id, self.lease, limit=limit
        )
        self.extra_jobs.extend(claimed)
        return claimed


Handler = Callable[[JobContext], Awaitable[Any]]


def load_handler(kind: str, registry: dict[str, str] | None = None) -> Handler:
    """Import the handler of a job kind."""
    target = (registry or HANDLERS).get(kind)
    if target is None:
        raise KeyError(f"no handler for job kind {kind!r}")
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)
