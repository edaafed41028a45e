"""Fixtures and helpers of the pipeline tests: worker/generator/scheduler helpers, the tiny
CLIP and the synthetic colour-choice dataset."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from db.connect import create_pool
from hps.settings import Settings, load_settings
from pipeline.tiny_models import tiny_weights
from pipeline.worker import Worker
from tests.colour_task import write_colour_hpd
from tests.conftest import create_database, drop_database, unique_name

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


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(config file, weights file) of a seeded tiny CLIP."""
    return tiny_weights(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def colour_hpd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The colour task in the HPD layout: 320 train and 80 test records of 4 images."""
    return write_colour_hpd(tmp_path_factory.mktemp("hpd"), n_train=320, n_test=80, k=4)


@pytest.fixture
def other_database_url(template_database: str) -> Iterator[str]:
    name = unique_name("hps_test_other")
    url = create_database(name, template=template_database)
    try:
        yield url
    finally:
        drop_database(name)


@pytest.fixture
async def other_pool(other_database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A second fresh database, for round trips from one database into another."""
    pool = await create_pool(other_database_url, min_size=1, max_size=4)
    try:
        yield pool
    finally:
        await pool.close()
