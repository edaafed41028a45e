"""`hps scheduler`: fire the configured cron schedules (enqueueing jobs only)."""

from __future__ import annotations

import asyncio

from cli.common import fail, run_service, settings


def scheduler() -> None:
    """Run the schedules of `settings.schedules` until SIGTERM or Ctrl-C. Firings only
    enqueue jobs (one per schedule and period, however many schedulers run)."""
    from db.connect import create_pool, database_url
    from pipeline.scheduler import Scheduler

    config = settings()

    async def service(stop: asyncio.Event) -> None:
        pool = await create_pool(database_url(config), max_size=4)
        try:
            await Scheduler(pool, config).run(stop)
        finally:
            await pool.close()

    try:
        run_service(service)
    except ValueError as exc:  # a cron expression that does not parse
        raise fail(str(exc), 2) from None
