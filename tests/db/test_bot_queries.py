"""The data layer's parts that the bot added: what rounds still need showing, the early
limit check, and which stored files nothing uses any more."""

from __future__ import annotations

from datetime import timedelta

import asyncpg
import pytest

from db import images, jobs, rounds, users
from tests.factories import queued_round, ready_round


async def test_rounds_to_show_are_those_whose_message_lags_behind(pool: asyncpg.Pool) -> None:
    shown = await ready_round(pool, requester=1)
    lagging = await ready_round(pool, requester=2)
    failed = await queued_round(pool, requester=3)
    await queued_round(pool, requester=4)  # queued: shown by /dream itself
    for round_id in (shown, lagging, failed):
        await pool.execute("UPDATE rounds SET channel_id = 5 WHERE id = $1", round_id)
    await rounds.fail_round(pool, failed, "boom")
    await rounds.set_shown(pool, shown, "ready")
    assert await rounds.rounds_to_show(pool, timedelta(days=7)) == [lagging, failed]
    await rounds.close_round(pool, shown)
    assert await rounds.rounds_to_show(pool, timedelta(days=7)) == [shown, lagging, failed]
    assert (await rounds.get_round(pool, shown)).shown_status == "ready"
    assert await rounds.rounds_to_show(pool, timedelta(days=7), limit=1) == [shown]
    # A failed round shown failed, then retried by `hps jobs retry`: its message lags too
    # (it still shows the failure), until it shows the round in flight again.
    await rounds.set_shown(pool, failed, "failed")
    assert await rounds.rounds_to_show(pool, timedelta(days=7)) == [shown, lagging]
    assert await rounds.retry_round(pool, failed) is not None
    assert await rounds.rounds_to_show(pool, timedelta(days=7)) == [shown, lagging, failed]
    await rounds.set_shown(pool, failed, "queued")
    assert await rounds.rounds_to_show(pool, timedelta(days=7)) == [shown, lagging]
    await pool.execute("UPDATE rounds SET created_at = now() - interval '8 days'")
    assert await rounds.rounds_to_show(pool, timedelta(days=7)) == []
    with pytest.raises(asyncpg.CheckViolationError):
        await rounds.set_shown(pool, shown, "exploded")


async def test_check_may_dream_refuses_like_create_round_but_writes_nothing(
    pool: asyncpg.Pool,
) -> None:
    limits = rounds.Limits(per_hour=1)
    await rounds.check_may_dream(pool, 1, limits)  # unknown user: fine, and not created
    assert await users.get_user(pool, 1) is None
    await queued_round(pool, requester=1)
    with pytest.raises(rounds.RoundRefused) as refused:
        await rounds.check_may_dream(pool, 1, limits)
    assert refused.value.code == "per_hour" and refused.value.retry_after is not None
    await users.ban(pool, 2, reason=None, actor="test")
    with pytest.raises(rounds.RoundRefused, match="not allowed to start rounds"):
        await rounds.check_may_dream(pool, 2, rounds.Limits())


async def test_files_in_use_by_images_or_pending_jobs_are_not_unreferenced(
    pool: asyncpg.Pool,
) -> None:
    round_id = await ready_round(pool, requester=1, k=2)
    shown = await images.images_of_round(pool, round_id, include_nsfw=True)
    kept = shown[0].storage_key
    scored, waiting, loose = ("aa/bb/" + c * 64 + ".png" for c in "abc")
    await jobs.enqueue(pool, "score", {"image_keys": [scored]})
    [claimed] = await jobs.claim(pool, ["score"], "w", timedelta(minutes=1))
    assert await images.unreferenced_keys(pool, [scored]) == []  # running
    assert await jobs.complete(pool, claimed, "w", {"scores": [1.0]})
    await jobs.enqueue(pool, "score", {"image_keys": [waiting]})
    assert await images.unreferenced_keys(pool, [kept, scored, waiting, loose, loose]) == [
        scored,
        loose,
    ]
