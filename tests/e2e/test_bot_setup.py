"""Start-up: a cog failing to load is logged and the others work."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from bot.client import INITIAL_EXTENSIONS
from tests.discord_fake import FakeDiscord
from tests.e2e.conftest import ALICE, CHANNEL_ID, bot_settings, start_bot, stop_bot


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
