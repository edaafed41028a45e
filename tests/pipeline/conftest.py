"""Fixtures of the pipeline tests: the tiny CLIP and the synthetic colour-choice dataset."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from db.connect import create_pool
from tests.conftest import create_database, drop_database, unique_name
from tests.tiny_clip import tiny_weights, write_colour_hpd


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
