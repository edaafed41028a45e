"""The LISTEN connection comes back after the server drops it, and says so."""

from __future__ import annotations

import asyncio
import json

import asyncpg

from db import rounds
from db.listen import NotificationListener
from tests.factories import queued_round

TERMINATE_SQL = """
SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
WHERE datname = current_database() AND query LIKE 'LISTEN%'
"""


async def test_the_listener_reconnects_and_catches_up_after_its_connection_dies(
    pool: asyncpg.Pool, database_url: str
) -> None:
    heard: asyncio.Queue[tuple[str, dict]] = asyncio.Queue()
    connects = 0

    async def on_connect() -> None:
        nonlocal connects
        connects += 1

    listener = NotificationListener(
        database_url,
        [rounds.ROUNDS_CHANNEL],
        lambda channel, payload: heard.put_nowait((channel, json.loads(payload))),
        on_connect=on_connect,
        ping_seconds=0.2,
    )
    listener.start()
    try:
        await asyncio.wait_for(listener.listening.wait(), 5)
        first = await queued_round(pool, requester=1)
        assert await asyncio.wait_for(heard.get(), 5) == (
            "hps_rounds",
            {"round_id": first, "status": "queued"},
        )
        # The server drops the connection (as a restart does).
        assert await pool.fetchval(TERMINATE_SQL) == 1
        await _until(lambda: listener.connections == 2)
        await asyncio.wait_for(listener.listening.wait(), 5)
        second = await queued_round(pool, requester=2)
        assert await asyncio.wait_for(heard.get(), 5) == (
            "hps_rounds",
            {"round_id": second, "status": "queued"},
        )
        await _until(lambda: connects == 2)
    finally:
        await listener.stop()
    assert listener._task is None


async def _until(check) -> None:
    for _ in range(500):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in 10 s")
