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

from bot import formats
from bot.fake_discord import EPHEMERAL, FakeDiscord, FakeInteraction, FakeUser, button_ids
from db import jobs, messages, users
from hps.store import LocalImageStore, StoreUnavailable
from tests.e2e.conftest import (
    ALICE,
    BOB,
    CHANNEL_ID,
    GUILD_ID,
    OTHER_CHANNEL_ID,
    dream,
    eventually,
    wait_buttons,
    wait_db,
)
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
    await wait_db(pool, "SELECT count(*) FROM round_messages", 1)  # her chosen image's

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
    # It answered from what was committed and queued before deleting anything on Discord.
    answers = [
        i for i, r in enumerate(fake.requests)
        if r.method == "PATCH" and r.path.endswith("/messages/@original")
        and (r.json or {}).get("content", "").startswith("Deleted 1 round(s)")
    ]  # fmt: skip
    deletions = [
        i for i, r in enumerate(fake.requests)
        if r.method == "DELETE" and r.path.startswith(f"/channels/{CHANNEL_ID}/messages/")
    ]  # fmt: skip
    assert len(answers) == 1 and len(deletions) == 2 and answers[0] < deletions[0]
    assert fake.requests[answers[0]].json["content"] == (
        "Deleted 1 round(s) and 2 choice(s) of yours. Deleting 4 image file(s) and the bot's "
        "2 message(s) showing your rounds now..."
    )
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


async def test_forget_me_failing_after_the_deletion_says_what_was_deleted(
    bot, fake: FakeDiscord, pool: asyncpg.Pool, worker: TestWorker, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    _, queued = await dream(fake, ALICE, "a round to forget")
    await worker.run_once()
    [first, *_] = await wait_buttons(fake, int(queued["id"]), 6)
    await (await fake.click(ALICE, int(queued["id"]), first["custom_id"])).wait_response()

    def broken(*args: object) -> str:
        raise RuntimeError("a bug after the commit")

    monkeypatch.setattr(formats, "forgetting", broken)
    ask = await fake.slash(ALICE, "forget-me", {}, channel_id=CHANNEL_ID)
    await ask.wait_response()
    yes = await fake.click(ALICE, ask.original_message_id, f"hps:forget:yes:{ALICE.id}")
    answer = await yes.followup()
    assert answer["flags"] & EPHEMERAL and answer["content"] == (
        "Deleted 1 round(s) and 1 choice(s) of yours.\n"
        "That much is done; after it, something went wrong on our side (it has been logged)."
    )
    assert await pool.fetchval("SELECT count(*) FROM rounds") == 0
    assert await pool.fetchval("SELECT count(*) FROM choices") == 0
    # The files are recorded: the bot's retry loop deletes them.
    assert await pool.fetchval("SELECT count(*) FROM image_deletions") == 4


async def test_forget_me_with_the_store_failing_halfway_says_so_and_the_retry_finishes(
    bot,
    fake: FakeDiscord,
    pool: asyncpg.Pool,
    worker: TestWorker,
    store: LocalImageStore,
    monkeypatch,
) -> None:  # type: ignore[no-untyped-def]
    _, queued = await dream(fake, ALICE, "a round to forget")
    await worker.run_once()
    [first, *_] = await wait_buttons(fake, int(queued["id"]), 6)
    await (await fake.click(ALICE, int(queued["id"]), first["custom_id"])).wait_response()
    await fake.wait_for(
        lambda: [m for m in fake.channel_messages(CHANNEL_ID) if "chose image" in m["content"]]
    )
    await wait_db(pool, "SELECT count(*) FROM round_messages", 1)  # recorded after posting
    keys = sorted(r["storage_key"] for r in await pool.fetch("SELECT storage_key FROM images"))
    real_delete = store.delete

    def failing_after_the_first(key: str) -> bool:
        if key != keys[0]:
            raise StoreUnavailable("cannot use the object store: connection refused")
        return real_delete(key)

    monkeypatch.setattr(bot.store, "delete", failing_after_the_first)
    ask = await fake.slash(ALICE, "forget-me", {}, channel_id=CHANNEL_ID)
    await ask.wait_response()
    yes = await fake.click(ALICE, ask.original_message_id, f"hps:forget:yes:{ALICE.id}")
    await yes.wait_response()
    done = await fake.wait_for(
        lambda: (m := fake.messages[ask.original_message_id])["content"].startswith("Done") and m
    )
    assert done["content"] == (
        "Done: deleted 1 round(s), 1 choice(s), 1 image file(s) and the bot's 2 message(s) "
        "showing your rounds. 3 image file(s) could not be deleted yet; they are deleted as "
        "soon as the image store answers."
    )
    assert [store.exists(k) for k in keys] == [False, True, True, True]
    assert await pool.fetchval("SELECT count(*) FROM rounds") == 0
    # The store answers again: the bot's retry loop deletes the rest (once due).
    monkeypatch.setattr(bot.store, "delete", real_delete)
    await pool.execute("UPDATE image_deletions SET next_attempt_at = now()")
    community = bot.get_cog("Community")
    assert await community.delete_pending_files() == 3
    assert not any(store.exists(k) for k in keys)
    assert await pool.fetchval("SELECT count(*) FROM image_deletions") == 0


async def test_forget_me_counts_only_its_own_messages_and_gives_up_on_refusals(
    bot, fake: FakeDiscord, pool: asyncpg.Pool, worker: TestWorker
) -> None:  # type: ignore[no-untyped-def]
    """Someone else's messages that cannot be deleted (Discord failing there, or the bot
    without access any more) hold up nothing and change nothing in Alice's answer; one the
    bot may never delete is given up at once, one Discord fails on waits its backoff."""
    fake.refusing[OTHER_CHANNEL_ID] = (503, 0, "Service Unavailable")
    async with pool.acquire() as conn, conn.transaction():  # one NOTIFY: one pass
        failing = [await messages.record_message(conn, 10**9, GUILD_ID, OTHER_CHANNEL_ID, 1 + i)
                   for i in range(60)]  # fmt: skip
    assert not any(failing)  # their rounds are gone: all 60 queued
    # The pass stops at the first failure (Discord is failing), handing the others back.
    await wait_db(pool, "SELECT count(*) FROM message_deletions WHERE error LIKE '503%'", 1)
    await wait_db(pool, "SELECT count(*) FROM message_deletions WHERE claimed_at IS NULL", 60)
    _, queued = await dream(fake, ALICE, "alice's dream")
    await worker.run_once()
    [first, *_] = await wait_buttons(fake, int(queued["id"]), 6)
    await (await fake.click(ALICE, int(queued["id"]), first["custom_id"])).wait_response()
    await fake.wait_for(
        lambda: [m for m in fake.channel_messages(CHANNEL_ID) if "chose image" in m["content"]]
    )
    await wait_db(pool, "SELECT count(*) FROM round_messages", 1)  # recorded after posting

    ask = await fake.slash(ALICE, "forget-me", {}, channel_id=CHANNEL_ID)
    await ask.wait_response()
    yes = await fake.click(ALICE, ask.original_message_id, f"hps:forget:yes:{ALICE.id}")
    await yes.wait_response()
    done = await fake.wait_for(
        lambda: (m := fake.messages[ask.original_message_id])["content"].startswith("Done") and m
    )
    assert done["content"] == (
        "Done: deleted 1 round(s), 1 choice(s), 4 image file(s) and the bot's 2 message(s) "
        "showing your rounds."
    )
    assert fake.channel_messages(CHANNEL_ID) == []
    # Her forget's NOTIFY started a pass too, which stopped at the next failing row: the two
    # that failed back off, the others wait in their place, untried.
    await wait_db(pool, "SELECT count(*) FROM message_deletions WHERE error LIKE '503%'", 2)
    await wait_db(pool, "SELECT count(*) FROM message_deletions WHERE claimed_at IS NULL", 60)
    left = await pool.fetch(
        "SELECT attempts, next_attempt_at > now() + interval '20 seconds' AS later"
        " FROM message_deletions ORDER BY id"
    )
    assert [tuple(r) for r in left] == [(1, True)] * 2 + [(0, False)] * 58

    # The bot lost access there: each is given up at the first refusal, kept for a moderator.
    fake.refusing[OTHER_CHANNEL_ID] = (403, 50001, "Missing Access")
    community = bot.get_cog("Community")
    assert await community.delete_queued_messages() == messages.Left(pending=2, given_up=58)
    given_up = await messages.given_up(pool)
    assert len(given_up) == 58 and given_up[0].error == "403 Missing Access"


async def test_bot_messages_posted_as_their_round_is_forgotten_are_deleted(
    bot, fake: FakeDiscord, pool: asyncpg.Pool, worker: TestWorker, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """The requester's chosen image is posted after the round was forgotten (between the
    pick and the post): nothing to record it on, so it is queued for deletion at once."""
    _, queued = await dream(fake, ALICE, "a dream forgotten mid-pick")
    await worker.run_once()
    [first, *_] = await wait_buttons(fake, int(queued["id"]), 6)
    real_get = bot.store.get_async

    async def forgotten_first(key: str) -> bytes:
        data = await real_get(key)
        await users.forget_user(pool, ALICE.id)
        return data

    monkeypatch.setattr(bot.store, "get_async", forgotten_first)
    await (await fake.click(ALICE, int(queued["id"]), first["custom_id"])).wait_response()
    posted = await fake.wait_for(
        lambda: [r for r in fake.requests if r.method == "POST" and r.files]
    )
    assert "chose image" in posted[-1].json["content"]  # it was posted...
    await fake.wait_for(lambda: fake.channel_messages(CHANNEL_ID) == [])  # ...and deleted
    await wait_db(pool, "SELECT count(*) FROM message_deletions", 0)
    assert await pool.fetchval("SELECT count(*) FROM round_messages") == 0


async def test_a_bot_message_that_cannot_be_recorded_is_deleted_at_once(
    bot, fake: FakeDiscord, pool: asyncpg.Pool, worker: TestWorker, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """The database fails between posting the chosen image and recording it: forgetting
    could never find it (it shows the image and mentions the requester), so it goes."""
    _, queued = await dream(fake, ALICE, "an unrecorded pick")
    await worker.run_once()
    [first, *_] = await wait_buttons(fake, int(queued["id"]), 6)

    async def unavailable(*args: object, **kwargs: object) -> bool:
        raise ConnectionResetError("the database went away")

    monkeypatch.setattr(messages, "record_round_message", unavailable)
    await (await fake.click(ALICE, int(queued["id"]), first["custom_id"])).wait_response()
    chosen = await fake.wait_for(
        lambda: [r for r in fake.requests if r.method == "POST" and r.files]
    )
    assert "chose image" in chosen[-1].json["content"]
    await fake.wait_for(
        lambda: not [m for m in fake.channel_messages(CHANNEL_ID) if "chose" in m["content"]]
    )
    assert int(queued["id"]) in fake.messages  # the round's own message stays
    assert await pool.fetchval("SELECT count(*) FROM round_messages") == 0


async def test_a_round_posted_anew_as_it_is_forgotten_has_its_message_deleted(
    bot, fake: FakeDiscord, pool: asyncpg.Pool, worker: TestWorker, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """Its message was deleted and the /dream token expired, so the ready round is posted as
    a new message; the round is forgotten meanwhile: the new message is queued and deleted."""
    _, queued = await dream(fake, ALICE, "a dream posted anew")
    message_id = int(queued["id"])
    await wait_db(pool, "SELECT message_id FROM rounds", message_id)
    del fake.messages[message_id]
    fake.expire_tokens()
    real_get = bot.store.get_async
    forgot: list[object] = []

    async def forgotten_first(key: str) -> bytes:
        if not forgot:
            forgot.append(await users.forget_user(pool, ALICE.id))
        return await real_get(key)

    monkeypatch.setattr(bot.store, "get_async", forgotten_first)
    await worker.run_once()
    await fake.wait_for(
        lambda: [r for r in fake.requests if r.method == "POST" and len(r.files) >= 4]
    )  # posted anew with its images...
    await fake.wait_for(lambda: fake.channel_messages(CHANNEL_ID) == [])  # ...and deleted
    await wait_db(pool, "SELECT count(*) FROM message_deletions", 0)
    assert forgot and await pool.fetchval("SELECT count(*) FROM rounds") == 0
