"""Shared fixtures: a real PostgreSQL database per test, cloned from a migrated template.

The server is `HPS_TEST_DATABASE_URL` (an admin URL) if set, else the local server on
127.0.0.1:5432 as `postgres`, else (none there) an embedded PostgreSQL that the session
starts from the `pgserver` package and deletes at exit, so a fresh machine needs nothing
installed. A session creates one template database migrated to head, and each test gets its
own copy (`CREATE DATABASE … TEMPLATE`, fast), dropped afterwards.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from db import migrate
from db.connect import create_pool
from hps.settings import get_settings
from tests.log_check import LogCheck

# The tiny diffusers pipeline's fixtures (tiny_sd_dir, tiny_lora_dirs, ...), the tiny
# reward models' (tiny_scorers), built on demand, the whole loop's models (loop_models) and
# the S3 server on loopback (tests.s3).
pytest_plugins = ["tests.tiny_sd", "tests.tiny_scorers", "tests.whole_loop", "tests.s3"]

LOCAL_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
_admin_url: str | None = None
_embedded: object = None  # the pgserver handle: alive as long as the test process


def admin_url() -> str:
    """The URL tests create their databases through (decided once per process)."""
    global _admin_url, _embedded
    if _admin_url is None:
        configured = os.environ.get("HPS_TEST_DATABASE_URL")
        if configured:
            _admin_url = configured
        elif asyncio.run(_reachable(LOCAL_ADMIN_URL)):
            _admin_url = LOCAL_ADMIN_URL
        else:
            import pgserver

            _embedded = pgserver.get_server(tempfile.mkdtemp(prefix="hps-test-pg-"), "delete")
            _admin_url = _embedded.get_uri()  # type: ignore[attr-defined]
    return _admin_url


async def _reachable(url: str) -> bool:
    try:
        conn = await asyncpg.connect(url, timeout=5)
    except (OSError, TimeoutError, asyncpg.PostgresError):
        return False
    await conn.close()
    return True


def url_for(database: str, admin: str | None = None) -> str:
    """The admin URL pointed at another database on the same server."""
    return urlunsplit(urlsplit(admin or admin_url())._replace(path=f"/{database}"))


async def _admin(sql: str, admin: str) -> None:
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def create_database(name: str, template: str | None = None) -> str:
    clause = f" TEMPLATE {template}" if template else ""
    asyncio.run(_admin(f'CREATE DATABASE "{name}"{clause}', admin_url()))
    return url_for(name)


def drop_database(name: str) -> None:
    asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', admin_url()))


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
    """No test sees the developer's HPS_* environment, .env or hps.toml, nor another test's
    cached settings; each gets its own data directory."""
    for key in list(os.environ):
        if key.startswith("HPS_") and key != "HPS_TEST_DATABASE_URL":
            monkeypatch.delenv(key)
    monkeypatch.setenv("HPS_DATA_DIR", str(tmp_path / "data"))
    # The CLI, run in-process, configures logging from the settings: keep DEBUG then too.
    monkeypatch.setenv("HPS_LOG_LEVEL", "DEBUG")
    monkeypatch.setattr("hps.settings.DEFAULT_CONFIG_FILE", tmp_path / "absent.toml")
    monkeypatch.setattr("hps.settings.DEFAULT_ENV_FILE", tmp_path / "absent.env")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture(autouse=True)
def log_calls_are_built(monkeypatch: pytest.MonkeyPatch) -> Iterator[LogCheck]:
    """Every logger at DEBUG through the project's logging set-up, every record formatted
    as text and as JSON: a log call that cannot be built fails the test that made it
    (`tests/log_check.py`)."""
    check = LogCheck(monkeypatch)
    check.start()
    try:
        yield check
    finally:
        check.stop()
    check.check()
