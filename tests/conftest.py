"""Shared fixtures: a real PostgreSQL database per test, cloned from a migrated template.

The server is `HPS_TEST_DATABASE_URL` (an admin URL; default the local server on
127.0.0.1:5432 as `postgres`). A session creates one template database migrated to head,
and each test gets its own copy (`CREATE DATABASE … TEMPLATE`, fast), dropped afterwards.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from db import migrate
from db.connect import create_pool
from hps.settings import get_settings

# The tiny diffusers pipeline's fixtures (tiny_sd_dir, tiny_lora_dirs, ...), built on demand.
pytest_plugins = ["tests.tiny_sd"]

ADMIN_URL = os.environ.get("HPS_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def url_for(database: str, admin_url: str = ADMIN_URL) -> str:
    """The admin URL pointed at another database on the same server."""
    return urlunsplit(urlsplit(admin_url)._replace(path=f"/{database}"))


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN_URL)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def create_database(name: str, template: str | None = None) -> str:
    clause = f" TEMPLATE {template}" if template else ""
    asyncio.run(_admin(f'CREATE DATABASE "{name}"{clause}'))
    return url_for(name)


def drop_database(name: str) -> None:
    asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def unique_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def template_database() -> Iterator[str]:
    """A database migrated to head that tests clone (never used directly)."""
    name = unique_name("hps_tmpl")
    url = create_database(name)
    try:
        migrate.upgrade(url)
        yield name
    finally:
        drop_database(name)


@pytest.fixture
def database_url(template_database: str) -> Iterator[str]:
    """A fresh database at head for this test."""
    name = unique_name("hps_test")
    url = create_database(name, template=template_database)
    try:
        yield url
    finally:
        drop_database(name)


@pytest.fixture
def empty_database_url() -> Iterator[str]:
    """A fresh database with no schema at all."""
    name = unique_name("hps_empty")
    url = create_database(name)
    try:
        yield url
    finally:
        drop_database(name)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database_url, min_size=1, max_size=20)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture(autouse=True)
def isolated_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No test sees the developer's HPS_* environment or hps.toml, nor another test's
    cached settings; each gets its own data directory."""
    for key in list(os.environ):
        if key.startswith("HPS_") and key != "HPS_TEST_DATABASE_URL":
            monkeypatch.delenv(key)
    monkeypatch.setenv("HPS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr("hps.settings.DEFAULT_CONFIG_FILE", tmp_path / "absent.toml")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()
