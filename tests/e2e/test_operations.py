"""What an operator relies on, end to end: commands kept out of DMs, the invite URL at start,
the bot's heartbeat, and a forget from the CLI reaching the bot's messages."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest

from bot.fake_discord import FakeDiscord
from bot.invite import PERMISSIONS
from db import services
from tests.e2e.conftest import (
    ALICE,
    CHANNEL_ID,
    GUILD_ID,
    ROOT,
    BotFactory,
    dream,
    stop_bot,
    wait_buttons,
)
from tests.e2e.worker import TestWorker


async def test_dream_and_score_stay_in_servers_unless_dms_are_allowed(
    make_bot: BotFactory, fake: FakeDiscord, pool: asyncpg.Pool
) -> None:
    bot = await make_bot()
    synced = fake.commands[GUILD_ID]
    for name in ("dream", "score"):
        assert synced[name]["contexts"] == [0] and synced[name]["dm_permission"] is False
    for name in ("stats", "forget-me"):  # harmless in DMs; forgetting must work anywhere
        assert synced[name]["dm_permission"] is True
    asked = await fake.slash(ALICE, "dream", {"prompt": "a private cat"}, dm=True)
    response = await asked.wait_response()
    assert asked.ephemeral and response["data"]["content"] == (
        "This command works in servers only, not in direct messages."
    )
    assert await pool.fetchval("SELECT count(*) FROM rounds") == 0
    await stop_bot(bot)

    await make_bot(discord={"dream_in_dms": True, "channel_ids": []})
    assert "contexts" not in fake.commands[GUILD_ID]["dream"] or (
        fake.commands[GUILD_ID]["dream"]["contexts"] != [0]
    )
    allowed = await fake.slash(ALICE, "dream", {"prompt": "a private cat"}, dm=True)
    answer = await allowed.answer()
    assert answer["content"].startswith("**a private cat**\nQueued: #1 in line.")
    assert await pool.fetchval("SELECT guild_id FROM rounds") is None


async def test_the_bot_logs_its_invite_url_and_warns_when_anyone_may_add_it(
    make_bot: BotFactory, fake: FakeDiscord, caplog: pytest.LogCaptureFixture
) -> None:
    fake.bot_public = True
    with caplog.at_level(logging.INFO, logger="bot.client"):
        await make_bot()
    said = [r.getMessage() for r in caplog.records if r.name == "bot.client"]
    assert (
        "invite the bot to a server: https://discord.com/oauth2/authorize?"
        f"client_id={fake.application_id}&scope=bot+applications.commands"
        f"&permissions={PERMISSIONS.value}"
    ) in said
    assert any(s.startswith("the application is public: anyone can add this bot") for s in said)


async def test_the_bot_heartbeats_whether_its_gateway_is_connected(
    make_bot: BotFactory, fake: FakeDiscord, pool: asyncpg.Pool
) -> None:
    bot = await make_bot(health={"heartbeat_seconds": 0.05, "stale_seconds": 5})
    fresh = timedelta(seconds=5)

    async def state() -> dict:  # type: ignore[type-arg]
        [service] = await services.list_services(pool, "bot", fresh)
        return service.state if service.alive else {}

    for _ in range(100):
        if (await state()).get("gateway"):
            break
        await asyncio.sleep(0.05)
    assert await state() == {"gateway": True, "guilds": 1, "shards": [0]}
    # Discord goes away: the next heartbeats say the gateway is down (`hps health bot` fails).
    await fake.stop()
    for _ in range(200):
        if (await state()).get("gateway") is False:
            break
        await asyncio.sleep(0.02)
    assert (await state())["gateway"] is False
    await stop_bot(bot)
    [service] = await services.list_services(pool, "bot", fresh)
    assert service.stopped_at is not None and not service.alive


async def test_forgetting_from_the_cli_deletes_the_bots_messages_of_those_rounds(
    bot,
    fake: FakeDiscord,
    pool: asyncpg.Pool,
    worker: TestWorker,
    database_url: str,
    tmp_path: Path,
) -> None:  # type: ignore[no-untyped-def]
    """A deletion request by email: `hps users forget` queues the messages, the running bot
    deletes them (the round's message and the requester's chosen image)."""
    _, queued = await dream(fake, ALICE, "a cube to forget")
    await worker.run_once()
    [first, *_] = await wait_buttons(fake, int(queued["id"]), 6)
    pick = await fake.click(ALICE, int(queued["id"]), first["custom_id"])
    await pick.wait_response()
    chosen = await fake.wait_for(
        lambda: [m for m in fake.channel_messages(CHANNEL_ID) if "chose image" in m["content"]]
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPS_")}
    env.update(HPS_DATABASE_URL=database_url, HPS_DATA_DIR=str(tmp_path / "data"))
    forgot = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "cli", "users", "forget", str(ALICE.id), "--yes"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert forgot.returncode == 0, forgot.stderr
    assert "2 Discord message(s) of those rounds are queued for the bot to delete" in (
        forgot.stdout
    )
    await fake.wait_for(
        lambda: int(queued["id"]) not in fake.messages and int(chosen[0]["id"]) not in fake.messages
    )
    assert fake.channel_messages(CHANNEL_ID) == []
    await asyncio.sleep(0.1)  # the bot deletes the queue's rows after Discord answered
    assert await pool.fetchval("SELECT count(*) FROM message_deletions") == 0
