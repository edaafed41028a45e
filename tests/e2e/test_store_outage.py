"""The bot when the store fails for a moment: a round's images that could not be read are
shown again a little later, without waiting for the next catch-up."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from bot.fake_discord import FakeDiscord, buttons
from hps.store import StoreUnavailable
from tests.e2e.conftest import ALICE, BotFactory, dream
from tests.e2e.worker import TestWorker


async def test_a_round_whose_images_the_store_could_not_give_is_shown_again(
    fake: FakeDiscord,
    make_bot: BotFactory,
    worker: TestWorker,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bot = await make_bot()
    interaction, _ = await dream(fake, ALICE, "a red cube on a beach")
    message_id = interaction.original_message_id
    real_get = bot.store.get_async
    failures = []

    async def flaky_get(key: str) -> Any:
        if not failures:
            failures.append(key)
            raise StoreUnavailable("cannot reach the object store s3://hps at http://x: timed out")
        return await real_get(key)

    monkeypatch.setattr(bot.store, "get_async", flaky_get)
    with caplog.at_level(logging.WARNING, logger="bot.cogs.dream"):
        await worker.run_once()
        await fake.wait_for(lambda: len(buttons(fake.messages[message_id])) == 6, within=10)
    assert len(failures) == 1
    assert "could not show the round: cannot reach the object store" in caplog.text
    assert "trying again in 1 s" in caplog.text
    assert len(fake.messages[message_id]["attachments"]) == 4
