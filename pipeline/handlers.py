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
- GPU or CPU-heavy work runs in a thread (`await asyncio.to_thread(...)`) so the worker's
  event loop keeps heartbeating.
- `ctx.cache` lives as long as the worker process: handlers keep loaded models there so
  they stay resident between jobs.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from db import jobs
from db.connect import Executor
from hps.settings import Settings
from hps.store import ImageStore

HANDLERS: dict[str, str] = {
    "generate": "pipeline.generate:handle_generate",
    "score": "pipeline.score:handle_score",
    "train_classifier": "pipeline.train_classifier:handle_train_classifier",
    "adapt_sd": "pipeline.adapt.run:handle_adapt_sd",
}


class PermanentError(Exception):
    """The job can never succeed as given: dead-letter it without retrying."""


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

    def __post_init__(self) -> None:
        self.log = logging.LoggerAdapter(
            logging.getLogger(f"pipeline.jobs.{self.job.kind}"),
            {"job_id": self.job.id, "job_kind": self.job.kind},
        )

    async def complete(self, conn: Executor, result: Any = None) -> bool:
        """Mark the job done on `conn` (inside the caller's transaction). False if this
        worker lost the job's lease, in which case the caller should roll back."""
        self.completed = await jobs.complete(conn, self.job, self.worker_id, result)
        return self.completed


Handler = Callable[[JobContext], Awaitable[Any]]


def load_handler(kind: str, registry: dict[str, str] | None = None) -> Handler:
    """Import the handler of a job kind."""
    target = (registry or HANDLERS).get(kind)
    if target is None:
        raise KeyError(f"no handler for job kind {kind!r}")
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)
