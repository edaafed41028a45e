"""Rounds: limits, the status lifecycle, and NOTIFY on every change."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import pytest

from db import jobs, rounds, users
from db.connect import connect
from db.rounds import Limits, RoundRefused
from tests.factories import fake_image, queued_round, ready_round


class Listener:
    """Collects NOTIFY payloads of one channel on a dedicated connection."""

    def __init__(self, url: str, channel: str) -> None:
        self.url, self.channel = url, channel
        self.payloads: asyncio.Queue = asyncio.Queue()

    async def __aenter__(self) -> Listener:
        self.conn = await connect(self.url)
        await self.conn.add_listener(
            self.channel, lambda *args: self.payloads.put_nowait(json.loads(args[3]))
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.conn.close()

    async def next(self) -> dict:
        return await asyncio.wait_for(self.payloads.get(), 5)


async def test_create_round_enqueues_one_generate_job(pool) -> None:  # type: ignore[no-untyped-def]
    first = await rounds.create_round(
        pool, requester_discord_id=1, prompt="a cat", k=4, params={"seed": 3}
    )
    second = await rounds.create_round(pool, requester_discord_id=2, prompt="A  cat ", k=4)
    assert first.round.status == "queued" and first.round.params == {"seed": 3}
    assert first.job.kind == "generate"
    # Rounds with equal parameters share a batch key: a worker generates them together.
    assert first.job.payload == {"round_id": first.round.id, "batch": '{"seed": 3}'}
    assert second.job.payload == {"round_id": second.round.id, "batch": "{}"}
    assert (first.queue_position, second.queue_position) == (1, 2)
    # Same prompt after normalisation: one prompt row (its first spelling kept), and each
    # round shows its requester's own spelling.
    assert first.round.prompt_id == second.round.prompt_id
    assert await pool.fetchval("SELECT text FROM prompts") == "a cat"
    view = await rounds.get_round_view(pool, second.round.id)
    assert view is not None and view.prompt == "A  cat " and view.requester_discord_id == 2
    assert (await rounds.get_round_view(pool, first.round.id)).prompt == "a cat"


async def test_limits_refuse_and_change_nothing(pool) -> None:  # type: ignore[no-untyped-def]
    limits = Limits(per_hour=3, in_flight=2, per_week=10)
    for _ in range(2):
        await rounds.create_round(pool, requester_discord_id=1, prompt="x", k=2, limits=limits)
    with pytest.raises(RoundRefused) as refused:
        await rounds.create_round(pool, requester_discord_id=1, prompt="x", k=2, limits=limits)
    assert refused.value.code == "in_flight"
    # Finish both: the in-flight limit frees up, the hourly one bites at 3.
    for round_id in await pool.fetch("SELECT id FROM rounds"):
        await rounds.start_generating(pool, round_id["id"])
        await rounds.finish_round(pool, round_id["id"], [fake_image(round_id["id"], 1)])
    await rounds.create_round(pool, requester_discord_id=1, prompt="x", k=2, limits=limits)
    await pool.execute("UPDATE rounds SET status = 'closed'")
    with pytest.raises(RoundRefused) as refused:
        await rounds.create_round(pool, requester_discord_id=1, prompt="x", k=2, limits=limits)
    assert refused.value.code == "per_hour"
    assert timedelta(minutes=59) < refused.value.retry_after <= timedelta(hours=1)
    assert await pool.fetchval("SELECT count(*) FROM rounds") == 3
    assert await pool.fetchval("SELECT count(*) FROM jobs") == 3
    # Another user is not affected.
    await rounds.create_round(pool, requester_discord_id=2, prompt="x", k=2, limits=limits)


async def test_limits_hold_under_concurrent_requests(pool) -> None:  # type: ignore[no-untyped-def]
    limits = Limits(per_hour=5, in_flight=5, per_week=5)
    outcomes = await asyncio.gather(
        *(
            rounds.create_round(pool, requester_discord_id=9, prompt=f"p{i}", k=2, limits=limits)
            for i in range(20)
        ),
        return_exceptions=True,
    )
    assert sum(isinstance(o, rounds.CreatedRound) for o in outcomes) == 5
    assert all(isinstance(o, (rounds.CreatedRound, RoundRefused)) for o in outcomes)
    assert await pool.fetchval("SELECT count(*) FROM rounds") == 5


async def test_banned_users_cannot_dream(pool) -> None:  # type: ignore[no-untyped-def]
    await users.ban(pool, 5, reason="abuse", actor="mod")
    with pytest.raises(RoundRefused) as refused:
        await rounds.create_round(pool, requester_discord_id=5, prompt="x", k=2)
    assert refused.value.code == "banned"
    assert await pool.fetchval("SELECT count(*) FROM rounds") == 0


async def test_lifecycle_notifies_each_change(pool, database_url: str) -> None:  # type: ignore[no-untyped-def]
    async with Listener(database_url, rounds.ROUNDS_CHANNEL) as heard:
        round_id = await queued_round(pool)
        assert await heard.next() == {"round_id": round_id, "status": "queued"}
        view = await rounds.start_generating(pool, round_id)
        assert view is not None and view.round.status == "generating"
        assert await heard.next() == {"round_id": round_id, "status": "generating"}
        images = [fake_image(round_id, p, nsfw=p == 2) for p in (1, 2, 3, 4)]
        assert await rounds.finish_round(pool, round_id, images)
        assert await heard.next() == {"round_id": round_id, "status": "ready"}
        # A retried job finds the round ready: nothing is written twice.
        assert not await rounds.finish_round(pool, round_id, images)
        assert await rounds.start_generating(pool, round_id) is None
        view = await rounds.get_round_view(pool, round_id)
        assert [i.position for i in view.images] == [1, 3, 4]
        assert await pool.fetchval("SELECT count(*) FROM images") == 4
        assert await rounds.close_round(pool, round_id)
        assert await heard.next() == {"round_id": round_id, "status": "closed"}


async def test_failed_round_can_be_retried(pool) -> None:  # type: ignore[no-untyped-def]
    round_id = await queued_round(pool)
    [job] = await jobs.claim(pool, ["generate"], "w1", timedelta(minutes=1))
    await rounds.start_generating(pool, round_id)
    assert await rounds.fail_round(pool, round_id, "the GPU caught fire")
    await jobs.complete(pool, job, "w1", {"failed": True})
    assert (await rounds.get_round(pool, round_id)).error == "the GPU caught fire"
    assert await rounds.retry_round(pool, round_id + 99) is None
    again = await rounds.retry_round(pool, round_id)
    assert again is not None and again.state == "queued" and again.id != job.id
    assert (await rounds.get_round(pool, round_id)).status == "queued"
    # A dead job is revived instead of a new one being added.
    [claimed] = await jobs.claim(pool, ["generate"], "w1", timedelta(minutes=1))
    await jobs.fail(pool, claimed, "w1", "boom", retry=False)
    await rounds.start_generating(pool, round_id)
    await rounds.fail_round(pool, round_id, "boom")
    revived = await rounds.retry_round(pool, round_id)
    assert revived.id == claimed.id and revived.state == "queued"
    assert await pool.fetchval("SELECT count(*) FROM jobs") == 2


async def test_concurrent_retries_cannot_both_slip_under_the_in_flight_limit(pool) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    failed = []
    for prompt in ("a red cube", "a blue cone"):
        round_id = await queued_round(pool, requester=1, prompt=prompt)
        await rounds.start_generating(pool, round_id)
        assert await rounds.fail_round(pool, round_id, "boom")
        failed.append(round_id)
    limits = rounds.Limits(in_flight=1)
    outcomes = await asyncio.gather(
        *(rounds.retry_round(pool, r, limits=limits) for r in failed), return_exceptions=True
    )
    refused = [o for o in outcomes if isinstance(o, rounds.RoundRefused)]
    assert len(refused) == 1 and refused[0].code == "in_flight"
    assert str(refused[0]) == (
        "You already have 1 round(s) being generated (limit 1); wait for them to finish."
    )
    statuses = sorted([(await rounds.get_round(pool, r)).status for r in failed])
    assert statuses == ["failed", "queued"]  # the refused retry changed nothing
    # A maintainer's retry (no limits) goes through.
    [still_failed] = [r for r in failed if (await rounds.get_round(pool, r)).status == "failed"]
    assert await rounds.retry_round(pool, still_failed) is not None


async def test_stale_rounds_close(pool) -> None:  # type: ignore[no-untyped-def]
    old = await ready_round(pool, requester=1)
    fresh = await ready_round(pool, requester=2)
    await pool.execute("UPDATE rounds SET ready_at = now() - interval '2 hours' WHERE id = $1", old)
    assert await rounds.close_stale_rounds(pool, timedelta(hours=1)) == [old]
    assert (await rounds.get_round(pool, fresh)).status == "ready"
