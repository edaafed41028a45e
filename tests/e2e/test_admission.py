"""Admission control end to end: beyond `bot.clicks_in_flight`, a click is answered "busy"
at once and writes nothing; an admitted click is recorded as always."""

from __future__ import annotations

import asyncio
import sys

import asyncpg

from bot import formats
from bot.fake_discord import FakeDiscord, FakeUser
from tests.e2e.conftest import ALICE, BOB, dream, wait_buttons
from tests.e2e.worker import TestWorker

CAROL = FakeUser(710000000000000004, "carol")


async def test_a_click_beyond_the_bound_is_refused_busy_and_writes_nothing(
    make_bot, fake: FakeDiscord, pool: asyncpg.Pool, worker: TestWorker, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    bot = await make_bot(bot={"clicks_in_flight": 1})
    dream_cog = sys.modules["bot.cogs.dream"]  # the module the bot loaded as its extension
    _, queued = await dream(fake, ALICE, "a crowded cube")
    message_id = int(queued["id"])
    await worker.run_once()
    [first, second, *_] = await wait_buttons(fake, message_id, 6)
    events_before = await pool.fetchval("SELECT count(*) FROM choice_events")

    # Bob's click is held inside its database call: the one place is taken.
    entered, release = asyncio.Event(), asyncio.Event()
    record_choice = dream_cog.record_choice

    async def held(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        entered.set()
        await release.wait()
        return await record_choice(*args, **kwargs)

    monkeypatch.setattr(dream_cog, "record_choice", held)
    holding = await fake.click(BOB, message_id, first["custom_id"])
    await asyncio.wait_for(entered.wait(), 10)

    refused = await fake.click(CAROL, message_id, second["custom_id"])
    response = await refused.wait_response()
    assert response["type"] == 4 and refused.ephemeral
    assert (
        response["data"]["content"]
        == formats.BUSY
        == ("Too many clicks at once: yours was **not recorded**. Please click again in a moment.")
    )
    assert bot.admission.in_flight == 1 and bot.admission.refused == 1
    # Nothing of Carol's was written: no user, no choice, no event.
    assert await pool.fetchval("SELECT count(*) FROM users WHERE discord_id = $1", CAROL.id) == 0
    assert await pool.fetchval("SELECT count(*) FROM choices") == 0
    assert await pool.fetchval("SELECT count(*) FROM choice_events") == events_before

    release.set()
    answer = await holding.wait_response()
    assert answer["data"]["content"] == "Recorded: you chose image 1. Thank you!"
    # Her click again, now that the place is free: recorded.
    monkeypatch.setattr(dream_cog, "record_choice", record_choice)
    again = await fake.click(CAROL, message_id, second["custom_id"])
    assert (await again.wait_response())["data"]["content"] == (
        "Recorded: you chose image 2. Thank you!"
    )
    assert (bot.admission.in_flight, bot.admission.admitted, bot.admission.refused) == (0, 2, 1)
    assert await pool.fetchval("SELECT count(*) FROM choice_events") == events_before + 2
