"""Job handlers for the worker's tests and benchmarks (`--handler KIND=tests.job_handlers:fn`
in a subprocess, a `registry` in process).

Their visible effect is a prompt row `effect <job id>` written in the same transaction as
the job's completion, so a test can count how many times a job's effect was applied.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from db import prompts
from db.connect import transaction
from pipeline.handlers import JobContext, LeaseLost, PermanentError

RUNS: Counter[int] = Counter()  # job id → handler invocations in this process

REGISTRY = {
    "noop": "tests.job_handlers:noop",
    "effect": "tests.job_handlers:effect",
    "flaky": "tests.job_handlers:flaky",
    "invalid": "tests.job_handlers:invalid",
    "batching": "tests.job_handlers:batching",
}


async def noop(ctx: JobContext) -> dict[str, Any]:
    RUNS[ctx.job.id] += 1
    return {"worker": ctx.worker_id}


async def effect(ctx: JobContext) -> None:
    """Write the effect, hold the transaction open `payload.seconds` (on the attempts
    listed in `payload.slow_attempts`, default all), then complete in that transaction."""
    RUNS[ctx.job.id] += 1
    seconds = ctx.job.payload.get("seconds", 0)
    slow = ctx.job.payload.get("slow_attempts")
    async with transaction(ctx.pool) as conn:
        await prompts.ensure_prompt(conn, f"effect {ctx.job.id}")
        if slow is None or ctx.job.attempts in slow:
            await asyncio.sleep(seconds)
        if not await ctx.complete(conn, {"worker": ctx.worker_id}):
            raise LeaseLost("taken over")


async def flaky(ctx: JobContext) -> None:
    RUNS[ctx.job.id] += 1
    raise ValueError(f"boom on attempt {ctx.job.attempts}")


async def invalid(ctx: JobContext) -> None:
    RUNS[ctx.job.id] += 1
    raise PermanentError("payload names no such thing")


async def batching(ctx: JobContext) -> dict[str, Any]:
    """Take up to two more jobs with the same `group`, complete the first of them, and
    then raise if the payload says so (the other is left for the worker to settle)."""
    RUNS[ctx.job.id] += 1
    extra = await ctx.claim_matching({"group": ctx.job.payload["group"]}, 2)
    if extra:
        async with transaction(ctx.pool) as conn:
            await ctx.complete(conn, {"by": ctx.job.id}, job=extra[0])
    if ctx.job.payload.get("raise"):
        raise RuntimeError("batch broke")
    return {"extra": [job.id for job in extra], "held": [job.id for job in ctx.extra_jobs]}


async def generate_hanging_before_commit(ctx: JobContext) -> None:
    """The real generate handler, except that on a first attempt it hangs after the
    images are stored and before their rows commit (a worker to kill mid-job): the images
    are uploaded inside the round's transaction, just before the job's completion."""
    import pipeline.generate as generate

    if ctx.job.attempts == 1:

        async def hang(*args: object, **kwargs: object) -> bool:
            await asyncio.sleep(3600)
            return False

        ctx.complete = hang  # type: ignore[method-assign]
    await generate.handle_generate(ctx)
