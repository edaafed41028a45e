"""/dream end to end: the real bot against the local Discord-compatible server.

Generate jobs are served by `tests.e2e.worker.TestWorker` (real small PNGs through the image
store and `finish_round`), standing in for the GPU worker written concurrently.
"""

from __future__ import annotations

import io

import asyncpg
from PIL import Image

from db.choices import choices_of_round
from hps.store import LocalImageStore
from tests.discord_fake import EPHEMERAL, FakeDiscord, button_ids, buttons
from tests.e2e.conftest import ALICE, BOB, CHANNEL_ID, GUILD_ID, dream, wait_buttons, wait_db
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
    assert (await _round(pool))["shown_status"] == "ready"

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
