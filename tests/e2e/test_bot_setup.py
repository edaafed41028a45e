"""Start-up: a cog failing to load is logged and the others work; each cog registers its
own buttons, which reach it whatever its class is called."""

from __future__ import annotations

import logging
from pathlib import Path

import asyncpg
import pytest

from bot.client import INITIAL_EXTENSIONS
from bot.fake_discord import FakeDiscord
from tests.e2e.conftest import (
    ALICE,
    BOB,
    CHANNEL_ID,
    bot_settings,
    dream,
    start_bot,
    stop_bot,
    wait_buttons,
)
from tests.e2e.worker import TestWorker


async def test_a_cog_that_fails_to_load_is_logged_and_the_others_work(
    fake: FakeDiscord, database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    extensions = (INITIAL_EXTENSIONS[0], "tests.e2e.broken_cog", *INITIAL_EXTENSIONS[1:])
    settings = bot_settings(fake, database_url, tmp_path / "data")
    with caplog.at_level(logging.ERROR, logger="bot.client"):
        bot = await start_bot(fake, settings, extensions=extensions)
    try:
        assert bot.failed_extensions == ["tests.e2e.broken_cog"]
        [record] = [r for r in caplog.records if r.name == "bot.client"]
        assert (
            record.getMessage() == "failed to load tests.e2e.broken_cog; the other features go on"
        )
        assert set(bot.cogs) == {"Dream", "Maintainers", "Community"}
        stats = await fake.slash(ALICE, "stats", {}, channel_id=CHANNEL_ID)
        answer = await stats.answer()
        assert answer["content"].startswith("**You**: 0 round(s) asked")
    finally:
        await stop_bot(bot)


async def test_buttons_reach_their_cog_whatever_its_class_is_called(
    fake: FakeDiscord,
    database_url: str,
    tmp_path: Path,
    pool: asyncpg.Pool,
    worker: TestWorker,
) -> None:
    settings = bot_settings(fake, database_url, tmp_path / "data")
    bot = await start_bot(fake, settings, extensions=("tests.e2e.renamed_cogs",))
    try:
        assert set(bot.cogs) == {"Dreaming", "Everyone"}
        _, queued = await dream(fake, ALICE, "a renamed cube")
        message_id = int(queued["id"])
        await worker.run_once()
        [_, second, *_] = await wait_buttons(fake, message_id, 6)
        pick = await fake.click(BOB, message_id, second["custom_id"])
        response = await pick.wait_response()
        assert response["data"]["content"] == "Recorded: you chose image 2. Thank you!"
        [choice] = await pool.fetch("SELECT verdict, chosen_position FROM choices")
        assert (choice["verdict"], choice["chosen_position"]) == ("pick", 2)

        ask = await fake.slash(ALICE, "forget-me", {}, channel_id=CHANNEL_ID)
        await ask.wait_response()
        no = await fake.click(ALICE, ask.original_message_id, f"hps:forget:no:{ALICE.id}")
        assert (await no.wait_response())["type"] == 7
        assert fake.messages[ask.original_message_id]["content"] == "Nothing was deleted."
    finally:
        await stop_bot(bot)


async def test_a_click_on_a_button_whose_cog_did_not_load_is_answered(
    fake: FakeDiscord, database_url: str, tmp_path: Path, pool: asyncpg.Pool, worker: TestWorker
) -> None:
    """Rounds shown before a restart keep their buttons; if /dream's cog then fails to load,
    a click is told so (not Discord's "This interaction failed") and changes nothing."""
    settings = bot_settings(fake, database_url, tmp_path / "data")
    bot = await start_bot(fake, settings)
    try:
        _, queued = await dream(fake, ALICE, "a cube before the restart")
        message_id = int(queued["id"])
        await worker.run_once()
        [first, *_] = await wait_buttons(fake, message_id, 6)
    finally:
        await stop_bot(bot)
    without_dream = tuple(e for e in INITIAL_EXTENSIONS if e != "bot.cogs.dream")
    bot = await start_bot(fake, settings, extensions=without_dream)
    try:
        click = await fake.click(ALICE, message_id, first["custom_id"])
        response = await click.wait_response()
        assert click.ephemeral and response["data"]["content"] == (
            "This feature is unavailable right now; please try again later."
        )
        assert await pool.fetchval("SELECT count(*) FROM choices") == 0
    finally:
        await stop_bot(bot)
