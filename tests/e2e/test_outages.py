"""Faults end to end: PostgreSQL going away under the bot, and the bot process restarting.

The database outage runs on a private PostgreSQL server the test owns (never the machine's
shared one). Generate jobs are served by `tests.e2e.worker.TestWorker`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from bot import formats
from bot.fake_discord import FakeDiscord
from db import migrate
from db.choices import choices_of_round
from db.connect import create_pool
from hps.store import LocalImageStore
from tests.e2e.conftest import (
    ALICE,
    BOB,
    CHANNEL_ID,
    BotProcess,
    bot_env,
    bot_settings,
    dream,
    eventually,
    start_bot,
    stop_bot,
    wait_buttons,
    wait_db,
)
from tests.e2e.private_pg import PrivatePostgres
from tests.e2e.worker import TestWorker


@pytest.fixture
async def private_pg() -> AsyncIterator[PrivatePostgres]:
    server = PrivatePostgres()
    try:
        await asyncio.to_thread(server.init)
        await asyncio.to_thread(server.start)
        await asyncio.to_thread(migrate.upgrade, server.url)
        yield server
    finally:
        await asyncio.to_thread(server.cleanup)


async def test_a_click_while_postgresql_is_down_is_not_recorded_and_later_clicks_work(
    fake: FakeDiscord, private_pg: PrivatePostgres, tmp_path: Path
) -> None:
    pool = await create_pool(private_pg.url)
    worker = TestWorker(pool, LocalImageStore(tmp_path / "data" / "images"))
    bot = await start_bot(fake, bot_settings(fake, private_pg.url, tmp_path / "data"))
    try:
        _, queued = await dream(fake, ALICE, "a fragile cube")
        message_id = int(queued["id"])
        await worker.run_once()
        await wait_buttons(fake, message_id, 6)
        round_id = await pool.fetchval("SELECT id FROM rounds")

        await asyncio.to_thread(private_pg.stop)
        click = await fake.click(BOB, message_id, f"hps:pick:{round_id}:2")
        response = await click.wait_response()
        assert click.ephemeral and response["data"]["content"] == formats.CLICK_NOT_RECORDED
        refused = await fake.slash(BOB, "dream", {"prompt": "x"}, channel_id=CHANNEL_ID)
        response = await refused.wait_response()
        assert refused.ephemeral and response["data"]["content"] == formats.DB_DOWN

        await asyncio.to_thread(private_pg.start)
        # Nothing of the refused click was written.
        assert await pool.fetchval("SELECT count(*) FROM choice_events") == 0
        assert await pool.fetchval("SELECT count(*) FROM choices") == 0
        assert await pool.fetchval("SELECT count(*) FROM users WHERE discord_id = $1", BOB.id) == 0

        click = await fake.click(BOB, message_id, f"hps:pick:{round_id}:2")
        response = await click.wait_response()
        assert response["data"]["content"] == "Recorded: you chose image 2. Thank you!"
        [choice] = await choices_of_round(pool, round_id)
        assert choice.chosen_position == 2
        assert await pool.fetchval("SELECT count(*) FROM choice_events") == 1

        # The LISTEN connection came back too: a new round is shown when it is ready.
        assert bot.listener is not None
        await eventually(lambda: bot.listener.connections >= 2)
        _, later = await dream(fake, BOB, "after the outage")
        await worker.run_once()
        await wait_buttons(fake, int(later["id"]), 6)
    finally:
        await stop_bot(bot)
        await pool.close()


def _log_messages(output: str) -> list[str]:
    messages = []
    for line in output.splitlines():
        try:
            messages.append(json.loads(line)["msg"])
        except (ValueError, KeyError):
            continue
    return messages


async def test_clicks_count_after_the_bot_process_restarts_and_missed_rounds_are_shown(
    fake: FakeDiscord,
    database_url: str,
    pool,
    worker: TestWorker,
    tmp_path: Path,
    bot_processes: list[BotProcess],
) -> None:
    env = bot_env(bot_settings(fake, database_url, tmp_path / "data"))
    first = BotProcess(env)
    bot_processes.append(first)
    await fake.wait_connected(within=60)
    _, before = await dream(fake, ALICE, "before the restart")
    await worker.run_once()
    await wait_buttons(fake, int(before["id"]), 6)
    _, missed = await dream(fake, BOB, "ready while the bot is down")
    await wait_db(pool, "SELECT count(*) FROM rounds WHERE message_id IS NOT NULL", 2)

    code, output = await asyncio.to_thread(first.stop)
    assert code == 0, output
    messages = _log_messages(output)
    assert "stopping the bot" in messages and messages[-1] == "bot stopped"
    assert fake.token not in output

    await worker.run_once()  # nobody listens: the NOTIFY is lost
    second = BotProcess(env)
    bot_processes.append(second)
    await fake.wait_for(lambda: fake.identifies == 2, within=60)
    # Caught up from rounds.shown_status; the first process's interaction token is gone,
    # so the message is edited by id.
    await wait_buttons(fake, int(missed["id"]), 6)
    assert fake.calls("PATCH", f"/channels/{CHANNEL_ID}/messages/{missed['id']}")

    round_id = await pool.fetchval("SELECT id FROM rounds WHERE message_id = $1", int(before["id"]))
    click = await fake.click(BOB, int(before["id"]), f"hps:pick:{round_id}:4")
    response = await click.wait_response()
    assert response["data"]["content"] == "Recorded: you chose image 4. Thank you!"
    assert [
        (c.chosen_position, c.is_requester) for c in await choices_of_round(pool, round_id)
    ] == [(4, False)]

    # The bot process is small and never imports torch.
    process = psutil.Process(second.process.pid)
    assert process.memory_info().rss < 200 * 2**20
    assert not [m.path for m in process.memory_maps() if "torch" in m.path]
    code, output = await asyncio.to_thread(second.stop)
    assert code == 0, output
