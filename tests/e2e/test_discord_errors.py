"""The bot when Discord fails for a moment: a round it could not show (a 5xx that outlasted
discord.py's own retries) is shown again a little later, without waiting for the next
catch-up; a refusal that will not pass (403) is not retried."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest

from bot.fake_discord import FakeDiscord, buttons
from tests.e2e.conftest import ALICE, CHANNEL_ID, BotFactory, dream
from tests.e2e.worker import TestWorker


async def until(predicate: Callable[[], bool], within: float = 10) -> None:
    """Wait for what no request to the fake server marks (a log line)."""
    for _ in range(int(within / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"still not true after {within} s")


async def test_a_round_discord_failed_to_show_is_shown_again(
    fake: FakeDiscord,
    make_bot: BotFactory,
    worker: TestWorker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await make_bot()
    interaction, _ = await dream(fake, ALICE, "a red cube on a beach")
    message_id = interaction.original_message_id
    fake.expire_tokens()  # the round is shown by editing its message in the channel...
    fake.refusing[CHANNEL_ID] = (503, 0, "Service Unavailable")  # ...which Discord fails
    with caplog.at_level(logging.WARNING, logger="bot.cogs.dream"):
        await worker.run_once()
        await until(lambda: "trying again in 1 s" in caplog.text)
        assert buttons(fake.messages[message_id]) == []
        del fake.refusing[CHANNEL_ID]  # Discord is back
        await fake.wait_for(lambda: len(buttons(fake.messages[message_id])) == 6, within=10)
    assert "could not show the round: 503 Service Unavailable" in caplog.text
    assert len(fake.messages[message_id]["attachments"]) == 4


async def test_a_round_the_bot_may_not_show_there_is_not_retried(
    fake: FakeDiscord,
    make_bot: BotFactory,
    worker: TestWorker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await make_bot()
    interaction, _ = await dream(fake, ALICE, "a red cube on a beach")
    fake.expire_tokens()
    fake.refusing[CHANNEL_ID] = (403, 50001, "Missing Access")
    with caplog.at_level(logging.WARNING, logger="bot.cogs.dream"):
        await worker.run_once()
        await until(lambda: "given up" in caplog.text)
    assert "trying again" not in caplog.text
    assert buttons(fake.messages[interaction.original_message_id]) == []
