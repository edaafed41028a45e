"""An analyst may NOTIFY the platform's channels (PostgreSQL has no privilege to refuse it);
the bot takes a notification as a wake-up only and reads what happened from the tables, so
a forged one posts nothing and changes nothing (issue 11, part 4)."""

from __future__ import annotations

import asyncio
import json

import asyncpg

from bot.fake_discord import FakeDiscord
from tests.e2e.conftest import ALICE, LOG_CHANNEL_ID, dream, wait_buttons
from tests.e2e.worker import TestWorker


async def test_forged_notifications_post_nothing_and_change_nothing(
    bot, fake: FakeDiscord, pool: asyncpg.Pool, worker: TestWorker
) -> None:
    interaction, queued = await dream(fake, ALICE, "a quiet harbour")
    round_id, job_id = await pool.fetchrow(
        "SELECT r.id, j.id FROM rounds r JOIN jobs j ON j.payload->>'round_id' = r.id::text"
    )
    forged = {
        "hps_rounds": {"round_id": round_id, "status": "ready"},
        "hps_job_done": {"id": job_id, "kind": "train_classifier", "state": "done"},
        "hps_models": {
            "event_id": 1,
            "version_id": 1,
            "name": "sd_adapter-evil",
            "kind": "sd_adapter",
            "action": "promoted",
            "actor": "review",
            "reason": "trust me",
        },
    }
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL ROLE hps_analyst")
        for channel, payload in forged.items():
            await conn.execute("SELECT pg_notify($1, $2)", channel, json.dumps(payload))
            await conn.execute("SELECT pg_notify($1, $2)", channel, "not even json")
    await asyncio.sleep(0.5)
    assert "Queued: #1 in line" in queued["content"]  # not shown as ready: it is not
    # The real change comes after them on the same listening connection: once the bot
    # shows it, it has handled the forged ones.
    await worker.run_once()
    message_id = interaction.original_message_id
    assert len(await wait_buttons(fake, message_id)) > 0
    assert fake.channel_messages(LOG_CHANNEL_ID) == []
    assert await pool.fetchval("SELECT count(*) FROM model_events") == 0
    assert await pool.fetchval("SELECT announced_at FROM jobs WHERE id = $1", job_id) is None
