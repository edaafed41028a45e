"""The bot's messages about rounds: recorded, or queued for deletion when their round is
gone; and the deletion queue, whose failing rows back off, give up, and hold up no one."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import asyncpg

from db import messages, users
from tests.factories import queued_round

GUILD, CHANNEL = 810000000000000001, 810000000000000011


async def _queue(pool: asyncpg.Pool, n: int, first: int = 1) -> list[int]:
    """`n` messages of rounds that are gone, queued for deletion; their rows' ids."""
    for message_id in range(first, first + n):
        assert not await messages.record_message(pool, 10**9, GUILD, CHANNEL, message_id)
    return [r["id"] for r in await pool.fetch("SELECT id FROM message_deletions ORDER BY id")]


async def test_a_message_of_a_round_that_is_gone_is_queued_for_deletion(
    pool: asyncpg.Pool,
) -> None:
    round_id = await queued_round(pool, requester=1, channel_id=CHANNEL)
    assert await messages.record_message(pool, round_id, GUILD, CHANNEL, 101)
    assert await messages.record_round_message(pool, round_id, GUILD, CHANNEL, 102, "chosen")
    assert await pool.fetchval("SELECT message_id FROM rounds WHERE id = $1", round_id) == 101
    assert await pool.fetchval("SELECT count(*) FROM message_deletions") == 0
    forgotten = await users.forget_user(pool, 1)
    assert forgotten.messages_queued == 2
    # Posted while the round was being forgotten: nothing to record them on, so queued.
    async with pool.acquire() as listener:
        notified = asyncio.Event()

        def wake(*_: object) -> None:
            notified.set()

        await listener.add_listener(messages.MESSAGES_CHANNEL, wake)
        assert not await messages.record_message(pool, round_id, GUILD, CHANNEL, 103)
        await asyncio.wait_for(notified.wait(), 5)
        await listener.remove_listener(messages.MESSAGES_CHANNEL, wake)
    assert not await messages.record_round_message(pool, round_id, GUILD, CHANNEL, 104, "chosen")
    queued = await pool.fetch("SELECT * FROM message_deletions ORDER BY message_id")
    assert [(r["guild_id"], r["channel_id"], r["message_id"], r["reason"]) for r in queued] == [
        (None, CHANNEL, 101, "forgotten"),
        (None, CHANNEL, 102, "forgotten"),
        (GUILD, CHANNEL, 103, "forgotten"),
        (GUILD, CHANNEL, 104, "forgotten"),
    ]


async def test_recording_during_a_forget_waits_for_it_then_queues(pool: asyncpg.Pool) -> None:
    """The forget locks the round first: a message recorded meanwhile either comes first
    (and the forget queues it with the round's) or after (and is queued itself); it never
    fails on the foreign key nor escapes."""
    round_id = await queued_round(pool, requester=1, channel_id=CHANNEL)
    async with pool.acquire() as forgetting, forgetting.transaction():
        await forgetting.execute("SELECT 1 FROM rounds WHERE id = $1 FOR UPDATE", round_id)
        chosen = asyncio.create_task(
            messages.record_round_message(pool, round_id, GUILD, CHANNEL, 201, "chosen")
        )
        main = asyncio.create_task(messages.record_message(pool, round_id, GUILD, CHANNEL, 202))
        await asyncio.sleep(0.3)
        assert not chosen.done() and not main.done()  # waiting for the round
        await forgetting.execute("DELETE FROM rounds WHERE id = $1", round_id)
    assert (await chosen, await main) == (False, False)
    rows = await pool.fetch("SELECT message_id FROM message_deletions ORDER BY message_id")
    assert [r["message_id"] for r in rows] == [201, 202]


async def test_failing_deletions_back_off_so_the_others_go_first(pool: asyncpg.Pool) -> None:
    ids = await _queue(pool, 60)
    first = await messages.claim_deletions(pool)
    assert [d.id for d in first] == ids[:50] and {d.attempts for d in first} == {1}
    for deletion in first:  # Discord failed for all of them (5xx)
        assert not await messages.failed(pool, deletion.id, "503 Service Unavailable")
    # The ten behind them are not held up; the fifty wait their backoff.
    assert [d.id for d in await messages.claim_deletions(pool)] == ids[50:]
    assert await messages.claim_deletions(pool) == []
    backoff = await pool.fetchval(
        "SELECT min(next_attempt_at - now()) FROM message_deletions WHERE id = $1", ids[0]
    )
    assert timedelta(seconds=25) < backoff <= timedelta(seconds=30)
    # A claim not settled (its bot died) comes back after the claim's timeout.
    await pool.execute(
        "UPDATE message_deletions SET claimed_at = claimed_at - $2::interval WHERE id = $1",
        ids[50], messages.CLAIM_TIMEOUT,
    )  # fmt: skip
    assert [(d.id, d.attempts) for d in await messages.claim_deletions(pool)] == [(ids[50], 2)]
    # Claims handed back untried are due at once, in their place, their attempt not counted.
    await messages.release(pool, ids[51:])
    again = await messages.claim_deletions(pool, limit=2)
    assert [(d.id, d.attempts) for d in again] == [(ids[51], 1), (ids[52], 1)]
    assert await messages.left(pool, ids[:3]) == messages.Left(pending=3, given_up=0)


async def test_a_deletion_is_given_up_after_its_last_attempt_or_at_a_final_refusal(
    pool: asyncpg.Pool,
) -> None:
    retried, refused, other = await _queue(pool, 3)
    backoffs = []
    for attempt in range(1, messages.MAX_ATTEMPTS + 1):
        [deletion] = await messages.claim_deletions(pool, only=[retried])
        assert deletion.attempts == attempt
        gave_up = await messages.failed(pool, deletion.id, "502 Bad Gateway")
        assert gave_up == (attempt == messages.MAX_ATTEMPTS)
        backoffs.append(
            await pool.fetchval(
                "SELECT next_attempt_at - now() FROM message_deletions WHERE id = $1", retried
            )
        )
        await pool.execute("UPDATE message_deletions SET next_attempt_at = now()")  # time passes
    # 30 s, doubling, at most an hour.
    assert [round(b.total_seconds() / 30) * 30 for b in backoffs[:8]] == [
        30, 60, 120, 240, 480, 960, 1920, 3600
    ]  # fmt: skip
    assert max(backoffs) <= timedelta(hours=1)
    [deletion] = await messages.claim_deletions(pool, only=[refused])
    await messages.gave_up(pool, deletion.id, "403 Missing Access")
    # Given up: never claimed again, kept for a moderator with the error.
    assert [d.id for d in await messages.claim_deletions(pool)] == [other]
    assert await messages.left(pool, [retried, refused]) == messages.Left(pending=0, given_up=2)
    assert await messages.left(pool) == messages.Left(pending=1, given_up=2)
    assert [(g.message_id, g.error) for g in await messages.given_up(pool)] == [
        (1, "502 Bad Gateway"),
        (2, "403 Missing Access"),
    ]
