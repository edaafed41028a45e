"""/dream end to end: the real bot against the local Discord-compatible server.

Generate jobs are served by `tests.e2e.worker.TestWorker` (real small PNGs through the image
store and `finish_round`), standing in for the GPU worker written concurrently.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import re
from datetime import timedelta

import asyncpg
from PIL import Image

from bot.fake_discord import EPHEMERAL, FakeDiscord, FakeUser, button_ids, buttons
from db import models as registry
from db import rounds, users
from db.choices import choices_of_round
from hps.store import LocalImageStore
from tests.e2e.conftest import (
    ALICE,
    BOB,
    CHANNEL_ID,
    GUILD_ID,
    OTHER_CHANNEL_ID,
    dream,
    eventually,
    stop_bot,
    wait_buttons,
    wait_db,
)
from tests.e2e.worker import TestWorker

GREEN, BLURPLE, GREY = 3, 1, 2  # Discord button styles


async def _round(pool: asyncpg.Pool) -> asyncpg.Record:
    [record] = await pool.fetch("SELECT * FROM rounds")
    return record


async def test_dream_posts_images_and_the_requesters_click_is_stored(
    bot, fake: FakeDiscord, pool: asyncpg.Pool, worker: TestWorker, store: LocalImageStore
) -> None:
    interaction, queued = await dream(fake, ALICE, "  a red cube on a beach  ", aspect="portrait")
    assert interaction.response_type == 5  # deferred ("thinking"), public
    [callback] = fake.calls("POST", f"/interactions/{interaction.id}/")
    assert callback.query == {"with_response": "1"}
    assert not interaction.ephemeral
    assert queued["content"] == (
        "**a red cube on a beach**\nQueued: #1 in line. "
        "I'll post the images here when they are ready."
    )
    message_id = int(queued["id"])
    await wait_db(pool, "SELECT message_id FROM rounds", message_id)
    round_ = await _round(pool)
    assert (round_["status"], round_["guild_id"], round_["channel_id"]) == (
        "queued",
        GUILD_ID,
        CHANNEL_ID,
    )
    assert round_["message_id"] == message_id
    assert round_["params"] == {"seed": None, "aspect": "portrait", "width": 512, "height": 768}
    assert await pool.fetchval("SELECT count(*) FROM jobs WHERE kind = 'generate'") == 1

    await worker.run_once()
    found = await wait_buttons(fake, message_id)
    round_id = round_["id"]
    assert button_ids(fake.messages[message_id]) == [
        f"hps:pick:{round_id}:1",
        f"hps:pick:{round_id}:2",
        f"hps:pick:{round_id}:3",
        f"hps:pick:{round_id}:4",
        f"hps:tie:{round_id}",
        f"hps:none:{round_id}",
    ]
    assert [b["label"] for b in found] == ["1", "2", "3", "4", "Can't decide", "None of these"]
    shown = fake.messages[message_id]
    assert shown["content"].startswith("**a red cube on a beach**\n<@710000000000000001>, pick")
    # The images are the stored ones, in order, as individual attachments.
    images = await pool.fetch("SELECT * FROM images ORDER BY position")
    assert [a["filename"] for a in shown["attachments"]] == ["1.png", "2.png", "3.png", "4.png"]
    for attachment, image in zip(shown["attachments"], images, strict=True):
        data = fake.attachment_data(attachment)
        assert data == store.get(image["storage_key"])
        assert Image.open(io.BytesIO(data)).size == (32, 32)
    # Shown while the /dream token was fresh: through the interaction webhook.
    assert len(fake.calls("PATCH", f"/webhooks/{fake.application_id}/")) == 2
    assert fake.calls("PATCH", "/channels/") == []
    await wait_db(pool, "SELECT shown_status FROM rounds", "ready")

    click = await fake.click(ALICE, message_id, f"hps:pick:{round_id}:2")
    await click.wait_response()
    assert click.response_type == 7  # the message is updated: the pick highlighted
    styles = [b["style"] for b in buttons(fake.messages[message_id])]
    assert styles == [GREY, GREEN, GREY, GREY, GREY, GREY]
    await fake.wait_for(lambda: len(click.followup_ids) == 2)
    confirmation, full_size = (fake.messages[i] for i in click.followup_ids)
    assert confirmation["content"] == "Recorded: you chose image 2. Thank you!"
    assert confirmation["flags"] & EPHEMERAL
    assert full_size["content"] == "<@710000000000000001> chose image 2:"
    assert not full_size["flags"] & EPHEMERAL
    [chosen] = full_size["attachments"]
    assert fake.attachment_data(chosen) == store.get(images[1]["storage_key"])

    [choice] = await choices_of_round(pool, round_id)
    assert (choice.verdict, choice.chosen_position, choice.is_requester) == ("pick", 2, True)
    events = await pool.fetch("SELECT * FROM choice_events")
    assert [(e["verdict"], e["chosen_position"], e["interaction_id"]) for e in events] == [
        ("pick", 2, click.id)
    ]

    # Another user's vote is recorded as a non-requester's and changes nothing on the message.
    vote = await fake.click(BOB, message_id, f"hps:none:{round_id}")
    response = await vote.wait_response()
    assert response["type"] == 4 and vote.ephemeral
    assert response["data"]["content"] == "Recorded: you chose “None of these”. Thank you!"
    choices = await choices_of_round(pool, round_id)
    assert [(c.verdict, c.is_requester) for c in choices] == [("pick", True), ("none", False)]
    assert [b["style"] for b in buttons(fake.messages[message_id])] == styles
    assert fake.unhandled == []


def _verdict(custom_id: str) -> tuple[str, int | None]:
    parts = custom_id.split(":")
    return (parts[1], int(parts[3]) if parts[1] == "pick" else None)


async def test_a_storm_of_200_clicks_from_50_users_keeps_one_choice_each_and_the_last_wins(
    bot, fake: FakeDiscord, pool: asyncpg.Pool, worker: TestWorker
) -> None:
    _, queued = await dream(fake, ALICE, "a storm over the sea")
    message_id = int(queued["id"])
    await worker.run_once()
    await wait_buttons(fake, message_id, 6)
    ids = button_ids(fake.messages[message_id])
    users = [ALICE] + [FakeUser(720000000000000000 + i, f"user{i}") for i in range(49)]
    rng = random.Random(7)
    plans = {user.id: [rng.choice(ids) for _ in range(4)] for user in users}
    answered: list = []

    async def clicks(user: FakeUser) -> None:
        # One user's clicks follow each other (as a person's do); the 50 users click at once.
        for custom_id in plans[user.id]:
            click = await fake.click(user, message_id, custom_id)
            await click.wait_response()
            answered.append(click)

    await asyncio.gather(*(clicks(user) for user in users))
    assert len(answered) == 200
    others = [c for c in answered if c.user.id != ALICE.id]
    assert all(c.response_type == 4 and c.ephemeral for c in others)
    assert sum(c.response_data["content"].startswith("Recorded:") for c in others) == 49

    round_id = (await _round(pool))["id"]
    choices = {c.user_id: c for c in await choices_of_round(pool, round_id)}
    assert len(choices) == 50
    assert await pool.fetchval("SELECT count(*) FROM choice_events") == 200
    assert (
        await pool.fetchval("SELECT count(*) FROM choice_events WHERE outcome = 'recorded'") == 50
    )
    discord_ids = dict(await pool.fetch("SELECT id, discord_id FROM users"))
    for user_id, choice in choices.items():
        last = plans[discord_ids[user_id]][-1]
        assert (choice.verdict, choice.chosen_position) == _verdict(last)
        assert choice.is_requester == (discord_ids[user_id] == ALICE.id)
    # The message highlights the requester's last verdict.
    [highlighted] = [
        b["custom_id"] for b in buttons(fake.messages[message_id]) if b["style"] == GREEN
    ]
    assert highlighted == plans[ALICE.id][-1]


async def test_invalid_prompts_are_refused_privately_and_create_nothing(
    make_bot, fake: FakeDiscord, pool: asyncpg.Pool
) -> None:
    await make_bot(limits={"prompt_max_length": 20, "banned_terms": ["Gore"]})
    cases = [
        ({"prompt": "   "}, "Your prompt is empty: describe the image you want."),
        ({"prompt": "x" * 21}, "Your prompt is 21 characters long; the limit is 20."),
        ({"prompt": "a cat\x07"}, "Your prompt contains control characters; please remove them."),
        ({"prompt": "a cat\u202e"}, "Your prompt contains control characters; please remove them."),
        ({"prompt": "some GORE here"}, "Your prompt contains a term that is not allowed here."),
        (
            {"prompt": "a cat", "negative_prompt": "ｇｏｒｅ"},  # fullwidth: NFKC-normalised
            "Your negative prompt contains a term that is not allowed here.",
        ),
    ]
    for options, expected in cases:
        refused = await fake.slash(ALICE, "dream", options, channel_id=CHANNEL_ID)
        response = await refused.wait_response()
        assert (response["type"], refused.ephemeral) == (4, True)
        assert response["data"]["content"] == expected
    elsewhere = await fake.slash(ALICE, "dream", {"prompt": "a cat"}, channel_id=OTHER_CHANNEL_ID)
    response = await elsewhere.wait_response()
    assert elsewhere.ephemeral
    assert response["data"]["content"] == f"/dream works in <#{CHANNEL_ID}> only."
    for table in ("rounds", "prompts", "jobs", "users"):
        assert await pool.fetchval(f"SELECT count(*) FROM {table}") == 0
    assert fake.channel_messages(CHANNEL_ID) == []


async def test_limits_come_from_the_database_survive_a_restart_and_refusals_create_nothing(
    make_bot, fake: FakeDiscord, pool: asyncpg.Pool, worker: TestWorker
) -> None:
    first = await make_bot(limits={"rounds_per_hour": 2, "rounds_in_flight": 1})
    await dream(fake, ALICE, "first")
    refused = await fake.slash(ALICE, "dream", {"prompt": "second"}, channel_id=CHANNEL_ID)
    response = await refused.wait_response()
    assert refused.ephemeral and response["data"]["content"] == (
        "You already have 1 round(s) being generated (limit 1); wait for them to finish."
    )
    await worker.run_once()
    await dream(fake, BOB, "bob's own")  # limits are per user
    await dream(fake, ALICE, "second")
    await worker.run_once()
    assert await pool.fetchval("SELECT count(*) FROM rounds") == 3

    await stop_bot(first)  # a restart does not reset the counts
    await make_bot(limits={"rounds_per_hour": 2, "rounds_in_flight": 1})
    refused = await fake.slash(ALICE, "dream", {"prompt": "third"}, channel_id=CHANNEL_ID)
    response = await refused.wait_response()
    assert refused.ephemeral
    assert re.fullmatch(
        r"You have started 2 round\(s\) in the last hour \(limit 2\)\. "
        r"You can start another in 59m \d\ds\.",
        response["data"]["content"],
    )
    assert await pool.fetchval("SELECT count(*) FROM rounds") == 3
    assert await pool.fetchval("SELECT count(*) FROM jobs") == 3


async def test_a_refusal_after_the_reply_was_deferred_replaces_the_thinking_message(
    bot, fake: FakeDiscord, pool: asyncpg.Pool, monkeypatch
) -> None:
    """The early, read-only limit check can lose a race with the user's other requests;
    `create_round` checks again under the row lock and the answer replaces "thinking…"."""
    await users.ban(pool, ALICE.id, reason="spam", actor="test")

    async def passes(*args, **kwargs) -> None:
        return None

    monkeypatch.setattr(rounds, "check_may_dream", passes)
    refused = await fake.slash(ALICE, "dream", {"prompt": "a cat"}, channel_id=CHANNEL_ID)
    assert (await refused.wait_response())["type"] == 5
    message = await fake.wait_for(
        lambda: (m := fake.messages.get(refused.original_message_id)) and m["content"] and m
    )
    assert message["content"] == "You are not allowed to start rounds here."
    assert await pool.fetchval("SELECT count(*) FROM rounds") == 0


async def test_a_failed_generation_shows_the_reason_and_the_requester_can_retry(
    bot, fake: FakeDiscord, pool: asyncpg.Pool, worker: TestWorker
) -> None:
    _, queued = await dream(fake, ALICE, "a broken cube")
    message_id = int(queued["id"])
    worker.fail_with = "the GPU ran out of memory"
    await worker.run_once()
    [retry] = await wait_buttons(fake, message_id, 1)
    round_id = (await _round(pool))["id"]
    assert retry["custom_id"] == f"hps:retry:{round_id}"
    assert fake.messages[message_id]["content"] == (
        "**a broken cube**\nGenerating the images failed: the GPU ran out of memory\n"
        "The person who asked can retry."
    )
    assert fake.messages[message_id]["attachments"] == []

    # A retry click is acknowledged at once (it may wait for the round's lock), then answered.
    other = await fake.click(BOB, message_id, retry["custom_id"])
    assert (await other.wait_response())["type"] == 6
    answer = await other.followup()
    assert answer["flags"] & EPHEMERAL and answer["content"] == (
        "Only the person who asked (or a maintainer) can retry this round."
    )
    assert (await _round(pool))["status"] == "failed"

    # A requester banned since cannot regenerate it.
    await users.ban(pool, ALICE.id, reason="abuse", actor="test")
    banned = await fake.click(ALICE, message_id, retry["custom_id"])
    answer = await banned.followup()
    assert answer["flags"] & EPHEMERAL and answer["content"] == (
        "You are not allowed to start rounds here."
    )
    assert (await _round(pool))["status"] == "failed"
    await users.unban(pool, ALICE.id)

    mine = await fake.click(ALICE, message_id, retry["custom_id"])
    response = await mine.wait_response()
    assert response["type"] == 6
    await fake.wait_for(lambda: "Queued again" in fake.messages[message_id]["content"])
    assert fake.messages[message_id]["content"] == (
        "**a broken cube**\nQueued again: #1 in line. "
        "I'll post the images here when they are ready."
    )
    assert fake.messages[message_id]["components"] == []
    await wait_db(pool, "SELECT shown_status FROM rounds", "queued")
    assert (await _round(pool))["status"] == "queued"
    await worker.run_once()
    await wait_buttons(fake, message_id, 6)
    assert len(fake.messages[message_id]["attachments"]) == 4
    await wait_db(pool, "SELECT shown_status FROM rounds", "ready")


async def test_flagged_images_are_never_shown_and_ab_rounds_reveal_no_versions(
    make_bot, fake: FakeDiscord, pool: asyncpg.Pool, worker: TestWorker, store: LocalImageStore
) -> None:
    await make_bot(generation={"post_grid": True})
    base = await registry.ensure_base(pool, kind="sd_base", artifact="tiny-sd-base")
    adapter = await registry.register(
        pool, kind="sd_adapter", artifact="/models/lora-secret", name="lora-secret-7"
    )
    worker.nsfw_positions = {3}
    worker.model_versions = {1: adapter.id, 2: base.id, 3: adapter.id, 4: base.id}
    _, queued = await dream(fake, ALICE, "a lighthouse at dusk")
    message_id = int(queued["id"])
    await worker.run_once()
    found = await wait_buttons(fake, message_id, 5)
    round_id = (await _round(pool))["id"]
    message = fake.messages[message_id]
    images = {r["position"]: r for r in await pool.fetch("SELECT * FROM images")}
    assert [a["filename"] for a in message["attachments"]] == [
        "1.png",
        "2.png",
        "3.png",
        "grid.png",
    ]
    sent = [fake.attachment_data(a) for a in message["attachments"]]
    assert sent[:3] == [store.get(images[p]["storage_key"]) for p in (1, 2, 4)]
    assert store.get(images[3]["storage_key"]) not in sent  # the flagged one is never posted
    assert Image.open(io.BytesIO(sent[3])).size == (64, 64)  # 2 × 2 grid of 32 px images
    assert [(b["label"], b["custom_id"]) for b in found[:3]] == [
        ("1", f"hps:pick:{round_id}:1"),
        ("2", f"hps:pick:{round_id}:2"),
        ("3", f"hps:pick:{round_id}:4"),
    ]
    everything = json.dumps(message)
    for secret in ("lora", "secret", "tiny-sd", "sd_adapter", "sd_base", "adapter", "model"):
        assert secret not in everything

    click = await fake.click(ALICE, message_id, f"hps:pick:{round_id}:4")
    await click.wait_response()
    await fake.wait_for(lambda: len(click.followup_ids) == 2)
    assert (
        fake.messages[click.followup_ids[0]]["content"] == "Recorded: you chose image 3. Thank you!"
    )
    [choice] = await choices_of_round(pool, round_id)
    assert choice.chosen_position == 4


async def test_a_closed_round_disables_its_buttons_and_refuses_clicks_politely(
    bot, fake: FakeDiscord, pool: asyncpg.Pool, worker: TestWorker
) -> None:
    _, queued = await dream(fake, ALICE, "a quiet harbour")
    message_id = int(queued["id"])
    await worker.run_once()
    await wait_buttons(fake, message_id, 6)
    assert await rounds.close_stale_rounds(pool, timedelta(0))
    await fake.wait_for(lambda: all(b.get("disabled") for b in buttons(fake.messages[message_id])))
    assert fake.messages[message_id]["content"] == (
        "**a quiet harbour**\n-# This round is closed: thank you for choosing!"
    )
    assert len(fake.messages[message_id]["attachments"]) == 4  # kept
    round_id = (await _round(pool))["id"]
    late = await fake.click(BOB, message_id, f"hps:pick:{round_id}:1")
    response = await late.wait_response()
    assert late.ephemeral and response["data"]["content"] == (
        "This round is closed: choices are no longer recorded. Thank you!"
    )
    assert await pool.fetchval("SELECT count(*) FROM choices") == 0
    assert await pool.fetchval("SELECT count(*) FROM choice_events") == 0
    await wait_db(pool, "SELECT shown_status FROM rounds", "closed")


async def test_after_the_interaction_token_expired_the_round_is_shown_by_message_id(
    bot, fake: FakeDiscord, pool: asyncpg.Pool, worker: TestWorker
) -> None:
    _, queued = await dream(fake, ALICE, "a slow render")
    message_id = int(queued["id"])
    await wait_db(pool, "SELECT message_id FROM rounds", message_id)
    fake.expire_tokens()  # as if generation took longer than 15 minutes
    await worker.run_once()
    await wait_buttons(fake, message_id, 6)
    assert [r.path for r in fake.calls("PATCH", f"/channels/{CHANNEL_ID}/messages/")] == [
        f"/channels/{CHANNEL_ID}/messages/{message_id}"
    ]
    assert len(fake.messages[message_id]["attachments"]) == 4

    # The message was deleted meanwhile: a new one is posted and remembered.
    _, queued = await dream(fake, ALICE, "another slow render")
    second = int(queued["id"])
    await wait_db(pool, "SELECT count(*) FROM rounds WHERE message_id = $1", 1, second)
    del fake.messages[second]
    fake.expire_tokens()
    await worker.run_once()
    posted = await fake.wait_for(
        lambda: [m for m in fake.channel_messages(CHANNEL_ID) if "another slow" in m["content"]]
    )
    [new] = posted
    assert len(buttons(new)) == 6 and len(new["attachments"]) == 4
    await wait_db(pool, "SELECT count(*) FROM rounds WHERE message_id = $1", 1, int(new["id"]))


async def test_the_bot_resumes_its_gateway_session_and_gets_the_clicks_it_missed(
    bot, fake: FakeDiscord, pool: asyncpg.Pool, worker: TestWorker
) -> None:
    _, queued = await dream(fake, ALICE, "a resumed session")
    message_id = int(queued["id"])
    await worker.run_once()
    await wait_buttons(fake, message_id, 6)
    round_id = (await _round(pool))["id"]
    await fake.request_reconnect()
    # Sent while the bot reconnects: replayed after RESUME.
    click = await fake.click(BOB, message_id, f"hps:pick:{round_id}:3")
    response = await click.wait_response()
    assert response["data"]["content"] == "Recorded: you chose image 3. Thank you!"
    assert (fake.identifies, fake.resumes) == (1, 1)
    assert [(c.user_id, c.chosen_position) for c in await choices_of_round(pool, round_id)] == [
        (await pool.fetchval("SELECT id FROM users WHERE discord_id = $1", BOB.id), 3)
    ]


async def test_heartbeats_are_acknowledged(make_bot, fake: FakeDiscord) -> None:
    fake.heartbeat_interval_ms = 50
    await make_bot()
    await fake.wait_for(lambda: fake.heartbeats >= 4)
    assert (fake.identifies, fake.resumes) == (1, 0)  # ACKed beats keep the session


async def test_where_only_the_requester_may_choose_other_votes_are_refused(
    make_bot, fake: FakeDiscord, pool: asyncpg.Pool, worker: TestWorker
) -> None:
    await make_bot(limits={"others_may_vote": False})
    _, queued = await dream(fake, ALICE, "a private choice")
    message_id = int(queued["id"])
    await worker.run_once()
    await wait_buttons(fake, message_id, 6)
    assert "Anyone may vote" not in fake.messages[message_id]["content"]
    round_id = (await _round(pool))["id"]
    vote = await fake.click(BOB, message_id, f"hps:pick:{round_id}:1")
    response = await vote.wait_response()
    assert vote.ephemeral
    assert response["data"]["content"] == "Only the person who asked can choose here."
    assert await pool.fetchval("SELECT count(*) FROM choice_events") == 0
    mine = await fake.click(ALICE, message_id, f"hps:none:{round_id}")
    await mine.wait_response()
    assert [(c.verdict, c.is_requester) for c in await choices_of_round(pool, round_id)] == [
        ("none", True)
    ]


async def test_a_click_answered_after_discords_deadline_is_logged_briefly_and_still_counts(
    bot, fake: FakeDiscord, pool: asyncpg.Pool, worker: TestWorker, caplog
) -> None:  # type: ignore[no-untyped-def]
    """Overloaded, the bot answers too late: Discord refuses the answer (10062). The choice
    is recorded all the same, and the bot logs one line, not tracebacks that would slow it
    further."""
    import logging

    _, queued = await dream(fake, ALICE, "a late cube")
    message_id = int(queued["id"])
    await worker.run_once()
    [*_, tie, _] = await wait_buttons(fake, message_id, 6)
    fake.response_deadline = 0.0  # every answer is late now
    with caplog.at_level(logging.WARNING, logger="bot"):
        late = await fake.click(BOB, message_id, tie["custom_id"])
        await wait_db(pool, "SELECT count(*) FROM choices", 1)
        await eventually(lambda: late.late)
        await asyncio.sleep(0.2)
    assert late.response is None
    messages = [
        (r.levelname, r.getMessage())
        for r in caplog.records
        if r.name.startswith("bot") and r.levelno >= logging.WARNING
    ]
    assert messages == [("WARNING", "a click was answered too late (after Discord's 3 s deadline)")]


async def test_a_click_failing_after_its_choice_committed_says_it_was_recorded(
    bot, fake: FakeDiscord, pool: asyncpg.Pool, worker: TestWorker, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    import sys

    dream_cog = sys.modules["bot.cogs.dream"]  # the module the bot loaded as its extension
    _, queued = await dream(fake, ALICE, "a cube that fails to upscale")
    message_id = int(queued["id"])
    await worker.run_once()
    [first, *_] = await wait_buttons(fake, message_id, 6)

    async def broken(*args: object, **kwargs: object) -> list:
        raise RuntimeError("reading the round's images failed")

    monkeypatch.setattr(dream_cog, "images_of_round", broken)  # the full-size image's step
    click = await fake.click(ALICE, message_id, first["custom_id"])
    await fake.wait_for(lambda: len(click.followup_ids) == 2)
    confirmation, failure = (fake.messages[i] for i in click.followup_ids)
    assert confirmation["content"] == "Recorded: you chose image 1. Thank you!"
    assert failure["flags"] & EPHEMERAL and failure["content"] == (
        "Recorded: you chose image 1. Thank you!\n"
        "That much is done; after it, something went wrong on our side (it has been logged)."
    )
    [choice] = await choices_of_round(pool, await pool.fetchval("SELECT id FROM rounds"))
    assert (choice.verdict, choice.chosen_position) == ("pick", 1)


async def test_a_round_a_maintainer_retried_from_the_shell_shows_it(
    bot, fake: FakeDiscord, pool: asyncpg.Pool, worker: TestWorker
) -> None:
    """`hps jobs retry` (rounds.retry_round, no click): the message stops showing the
    failure and its Retry button, then shows the images when they are ready."""
    _, queued = await dream(fake, ALICE, "a broken cube")
    message_id = int(queued["id"])
    worker.fail_with = "the GPU ran out of memory"
    await worker.run_once()
    await wait_buttons(fake, message_id, 1)
    await wait_db(pool, "SELECT shown_status FROM rounds", "failed")
    round_id = (await _round(pool))["id"]
    assert await rounds.retry_round(pool, round_id) is not None
    await fake.wait_for(lambda: "queued this round again" in fake.messages[message_id]["content"])
    assert fake.messages[message_id]["content"] == (
        "**a broken cube**\nA maintainer queued this round again: "
        "I'll post the images here when they are ready."
    )
    assert fake.messages[message_id]["components"] == []
    await wait_db(pool, "SELECT shown_status FROM rounds", "queued")
    worker.fail_with = None
    await worker.run_once()
    await wait_buttons(fake, message_id, 6)
    assert len(fake.messages[message_id]["attachments"]) == 4
    await wait_db(pool, "SELECT shown_status FROM rounds", "ready")
