"""Helpers for the worker, generator and scheduler tests."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from hps.settings import Settings, load_settings
from pipeline.worker import Worker

FAST_WORKER = {
    "lease_seconds": 5,
    "heartbeat_seconds": 1,
    "poll_seconds": 0.2,
    "backoff_seconds": 0,
    "shutdown_grace_seconds": 10,
}


def make_settings(**sections: dict[str, Any]) -> Settings:
    """Settings with a fast worker and the given sections' values over the defaults."""
    worker = {**FAST_WORKER, **sections.pop("worker", {})}
    return load_settings(worker=worker, **sections)


@asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[Worker]:
    """Run `worker` in the background; stop it (cleanly) on exit."""
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)


async def wait_until(
    predicate: Callable[[], Awaitable[Any] | Any], within: float = 30, interval: float = 0.05
) -> Any:
    """Poll `predicate` until it returns something truthy; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(interval)


def stored_pngs(images_dir: Path) -> list[str]:
    """The names of the PNG files in an image store folder, sorted."""
    return sorted(path.name for path in images_dir.rglob("*.png"))
