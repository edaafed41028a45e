"""/score, /stats and /forget-me end to end.

Score jobs are completed by `tests.e2e.worker.TestWorker` with a deterministic score of
each image's bytes (the HPS scorer is written concurrently by another engineer).
"""

from __future__ import annotations

import io
import struct
import zlib

import asyncpg
from PIL import Image

from bot.fake_discord import EPHEMERAL, FakeDiscord, FakeInteraction, FakeUser, button_ids
from db import jobs
from hps.store import LocalImageStore
from tests.e2e.conftest import ALICE, BOB, CHANNEL_ID, dream, eventually, wait_buttons, wait_db
from tests.e2e.worker import TestWorker, fake_score, png


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that declares `width`×`height` pixels (a decompression bomb's header)."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _chunk(b"IEND", b"")
    )


def png_of(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("L", (width, height)).save(out, format="PNG")
    return out.getvalue()


async def _score(
    fake: FakeDiscord, user: FakeUser, prompt: str, *files: tuple[str, bytes, str]
) -> FakeInteraction:
    """`user` runs /score with (name, bytes, content type) files attached."""
    options: dict = {"prompt": prompt}
    for i, (name, data, content_type) in enumerate(files):
        options["image" if i == 0 else f"image{i + 1}"] = fake.upload(name, data, content_type)
    return await fake.slash(user, "score", options, channel_id=CHANNEL_ID)


async def _final_text(fake: FakeDiscord, interaction: FakeInteraction) -> str:
    """The text that replaced the deferred "thinking" reply."""
    await interaction.wait_response()
    message = await fake.wait_for(
        lambda: (m := fake.messages.get(interaction.original_message_id)) and m["content"] and m
    )
    assert message["flags"] & EPHEMERAL
    return message["content"]


async def test_score_refuses_non_images_and_decompression_bombs_and_enqueues_nothing(
    make_bot, fake: FakeDiscord, pool: asyncpg.Pool, store: LocalImageStore
) -> None:
    await make_bot(limits={"score_max_pixels": 10_000}, bot={"score_per_minute": 100})
    text = await _score(fake, ALICE, "a cat", ("notes.txt", b"hello", "text/plain"))
    response = await text.wait_response()
    assert text.ephemeral and response["data"]["content"] == (
        "`notes.txt` is not an image (text/plain): upload PNG, JPEG, WebP or GIF files."
    )
    cases = [
        (
            ("bomb.png", png_header_only(50_000, 50_000), "image/png"),
            "`bomb.png` declares far more pixels than it could sensibly hold "
            "(a decompression bomb); it was not scored.",
        ),
        (
            ("big.png", png_of(200, 200), "image/png"),
            "`big.png` is 200×200 pixels; the limit is 10,000 pixels per image.",
        ),
        (
            ("fake.png", b"definitely not a png", "image/png"),
            "`fake.png` is not an image Pillow can read.",
        ),
        (
            ("cut.png", png_of(50, 50)[:60], "image/png"),
            "`cut.png` is damaged and cannot be read",
        ),
    ]
    for upload, expected in cases:
        refused = await _score(fake, ALICE, "a cat", ("ok.png", png(1), "image/png"), upload)
        assert (await _final_text(fake, refused)).startswith(expected)
    assert await pool.fetchval("SELECT count(*) FROM jobs") == 0
    assert not (store.root).exists() or not any(store.root.rglob("*.png"))


async def test_score_returns_the_workers_scores_and_does_not_keep_the_uploads(
    bot, fake: FakeDiscord, pool: asyncpg.Pool, worker: TestWorker, store: LocalImageStore
) -> None:
    first, second = png(11), png(12)
    interaction = await _score(
        fake, ALICE, "two cats", ("a.png", first, "image/png"), ("b.png", second, "image/png")
    )
    await interaction.wait_response()
    assert interaction.response_type == 5 and interaction.ephemeral
    await wait_db(pool, "SELECT count(*) FROM jobs WHERE kind = 'score'", 1)
    [job] = await jobs.list_jobs(pool, kind="score")
    assert job.kind == "score" and job.payload["prompt"] == "two cats"
    assert [store.get(k) for k in job.payload["image_keys"]] == [first, second]
    await worker.run_once()
    text = await _final_text(fake, interaction)
    scores = [fake_score(first), fake_score(second)]
    best = 0 if scores[0] > scores[1] else 1
    lines = text.split("\n")
    assert lines[0] == (
        "HPS for **two cats** (model `test-scorer`, scale hps; "
        "higher means people would prefer it):"
    )
    assert lines[1] == f"1. `a.png`: **{scores[0]:.2f}**" + (" ← best" if best == 0 else "")
    assert lines[2] == f"2. `b.png`: **{scores[1]:.2f}**" + (" ← best" if best == 1 else "")
    await eventually(lambda: not any(store.exists(k) for k in job.payload["image_keys"]))
    assert (await jobs.get(pool, job.id)).state == "done"


async def test_score_gives_up_after_its_timeout_and_cancels_the_job(
    make_bot, fake: FakeDiscord, pool: asyncpg.Pool, store: LocalImageStore
) -> None:
    await make_bot(bot={"score_timeout_seconds": 0.3, "score_per_minute": 1})
    interaction = await _score(fake, ALICE, "a lonely cat", ("a.png", png(3), "image/png"))
    text = await _final_text(fake, interaction)
    [job] = await jobs.list_jobs(pool, kind="score")
    assert text == (
        f"No worker scored your images in time (job {job.id}). "
        "It was cancelled; please try again later."
    )
    assert job.state == "cancelled"
    await eventually(lambda: not store.exists(job.payload["image_keys"][0]))
    again = await _score(fake, ALICE, "a lonely cat", ("a.png", png(3), "image/png"))
    response = await again.wait_response()
    assert again.ephemeral and response["data"]["content"].startswith("Slow down: try again in ")
    assert len(await jobs.list_jobs(pool, kind="score")) == 1


async def test_stats_counts_the_users_and_everyones_activity(
    bot, fake: FakeDiscord, pool: asyncpg.Pool, worker: TestWorker
) -> None:
    _, queued = await dream(fake, ALICE, "a counted cube")
    await worker.run_once()
    [*_, tie, _none] = await wait_buttons(fake, int(queued["id"]), 6)
    for user in (ALICE, BOB):
        click = await fake.click(user, int(queued["id"]), tie["custom_id"])
        await click.wait_response()
    stats = await fake.slash(ALICE, "stats", {}, channel_id=CHANNEL_ID)
    answer = await stats.answer()
    assert stats.ephemeral and answer["content"] == (
        "**You**: 1 round(s) asked, 1 choice(s) made (0 picks, 1 can't decide, 0 none of these).\n"
        "**Everyone**: 2 people, 1 rounds, 4 images, 2 choices (2 in the last 24 h)."
    )
    again = await fake.slash(ALICE, "stats", {}, channel_id=CHANNEL_ID)
    response = await again.wait_response()
    assert again.ephemeral and response["data"]["content"].startswith("Slow down")


async def test_forget_me_asks_first_then_removes_the_users_data_and_files(
    bot, fake: FakeDiscord, pool: asyncpg.Pool, worker: TestWorker, store: LocalImageStore
) -> None:
    _, alices = await dream(fake, ALICE, "alice's dream")
    _, bobs = await dream(fake, BOB, "bob's dream")
    await worker.run_once()
    alice_buttons = await wait_buttons(fake, int(alices["id"]), 6)
    bob_buttons = await wait_buttons(fake, int(bobs["id"]), 6)
    for user, button in (
        (ALICE, alice_buttons[0]),
        (BOB, alice_buttons[1]),
        (ALICE, bob_buttons[2]),
    ):
        message_id = int(alices["id"]) if button in alice_buttons else int(bobs["id"])
        click = await fake.click(user, message_id, button["custom_id"])
        await click.wait_response()
    alice_keys = [
        r["storage_key"]
        for r in await pool.fetch(
            "SELECT i.storage_key FROM images i JOIN rounds r ON r.id = i.round_id"
            " JOIN prompts p ON p.id = r.prompt_id WHERE p.text = $1",
            "alice's dream",
        )
    ]
    assert len(alice_keys) == 4 and all(store.exists(k) for k in alice_keys)

    ask = await fake.slash(ALICE, "forget-me", {}, channel_id=CHANNEL_ID)
    response = await ask.wait_response()
    assert ask.ephemeral and response["data"]["content"].startswith("This deletes every round")
    prompt_id = ask.original_message_id
    assert button_ids(fake.messages[prompt_id]) == [
        f"hps:forget:yes:{ALICE.id}",
        f"hps:forget:no:{ALICE.id}",
    ]
    intruder = await fake.click(BOB, prompt_id, f"hps:forget:yes:{ALICE.id}")
    assert (await intruder.wait_response())["data"]["content"] == "This button is not for you."
    assert await pool.fetchval("SELECT count(*) FROM rounds") == 2

    no = await fake.click(ALICE, prompt_id, f"hps:forget:no:{ALICE.id}")
    assert (await no.wait_response())["type"] == 7
    assert fake.messages[prompt_id]["content"] == "Nothing was deleted."
    assert await pool.fetchval("SELECT count(*) FROM choices") == 3

    ask = await fake.slash(ALICE, "forget-me", {}, channel_id=CHANNEL_ID)
    await ask.wait_response()
    yes = await fake.click(ALICE, ask.original_message_id, f"hps:forget:yes:{ALICE.id}")
    assert (await yes.wait_response())["type"] == 6
    done = await fake.wait_for(
        lambda: (
            fake.messages[ask.original_message_id]["content"].startswith("Done")
            and fake.messages[ask.original_message_id]
        )
    )
    assert done["content"] == (
        "Done: deleted 1 round(s), 2 choice(s), 4 image file(s) and the bot's 2 message(s) "
        "showing your rounds."
    )
    assert done["components"] == []
    # Her round's message and her chosen image, which showed her images and mentioned her,
    # are gone from the channel; Bob's round stays.
    assert int(alices["id"]) not in fake.messages and int(bobs["id"]) in fake.messages
    assert not [m for m in fake.channel_messages(CHANNEL_ID) if f"<@{ALICE.id}>" in m["content"]]
    assert await pool.fetchval("SELECT count(*) FROM message_deletions") == 0
    assert [
        r["text"]
        for r in await pool.fetch(
            "SELECT p.text FROM rounds r JOIN prompts p ON p.id = r.prompt_id"
        )
    ] == ["bob's dream"]
    # Bob's vote on Alice's round went with her round; Bob's round and images stay.
    assert await pool.fetchval("SELECT count(*) FROM choices") == 0
    assert await pool.fetchval("SELECT count(*) FROM users WHERE discord_id = $1", ALICE.id) == 0
    assert not any(store.exists(k) for k in alice_keys)
    assert await pool.fetchval("SELECT count(*) FROM images") == 4
