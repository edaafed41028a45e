"""The embedded PostgreSQL (pgserver) stopped on demand, before its folder is deleted."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import asyncpg
import psutil
import pytest

from db.embedded import embedded_database_url, stop_embedded


@pytest.mark.slow
async def test_the_embedded_server_stops_before_its_folder_goes(tmp_path: Path) -> None:
    pgdata = tmp_path / "postgres"
    url = embedded_database_url(pgdata)
    conn = await asyncpg.connect(url)
    assert await conn.fetchval("SELECT 1") == 1
    await conn.close()
    pid = int((pgdata / "postmaster.pid").read_text().splitlines()[0])
    assert psutil.pid_exists(pid)
    assert stop_embedded(pgdata) is True
    assert not psutil.pid_exists(pid)
    with pytest.raises((OSError, asyncpg.PostgresError)):
        await asyncpg.connect(url, timeout=5)
    await asyncio.to_thread(shutil.rmtree, tmp_path)
    assert stop_embedded(pgdata) is False  # nothing runs there any more
