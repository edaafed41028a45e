"""Recording choices: idempotent under concurrency, refusals change nothing."""

from __future__ import annotations

import asyncio
import random

import pytest

from db import rounds, users
from db.choices import ChoiceRefused, choices_of_round, record_choice
from tests.factories import queued_round, ready_round


async def _counts(pool, round_id: int) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    choices = await pool.fetchval("SELECT count(*) FROM choices WHERE round_id = $1", round_id)
    events = await pool.fetchval("SELECT count(*) FROM choice_events WHERE round_id = $1", round_id)
    return choices, events


def _verdict(i: int) -> dict:
    """Click number i of a user: picks 1..4, then a tie, then none, cycling."""
    options = [("pick", 1), ("pick", 2), ("pick", 3), ("pick", 4), ("tie", None), ("none", None)]
    verdict, position = options[i % len(options)]
    return {"verdict": verdict, "position": position}


async def test_fifty_concurrent_clicks_from_one_user_leave_one_choice(pool) -> None:  # type: ignore[no-untyped-def]
    round_id = await ready_round(pool, requester=7)
    results = await asyncio.gather(
        *(
            record_choice(pool, round_id=round_id, discord_user_id=7, **_verdict(i))
            for i in range(50)
        )
    )
    assert await _counts(pool, round_id) == (1, 50)
    assert sum(r.outcome == "recorded" for r in results) == 1
    [choice] = await choices_of_round(pool, round_id)
    last = await pool.fetchrow(
        "SELECT verdict, chosen_position FROM choice_events WHERE round_id = $1"
        " ORDER BY id DESC LIMIT 1",
        round_id,
    )
    assert (choice.verdict, choice.chosen_position) == (last["verdict"], last["chosen_position"])
    # Each change is a revision; clicking the verdict it holds again is not.
    assert choice.revision == 1 + sum(r.outcome == "changed" for r in results)
    assert choice.is_requester


async def test_the_latest_click_wins_whatever_order_the_clicks_commit_in(pool) -> None:  # type: ignore[no-untyped-def]
    """Discord's interaction ids grow with time: a click made earlier but committed later
    (two fast clicks racing through two bot connections) is kept as a stale event only."""
    round_id = await ready_round(pool, requester=7)
    ids = list(range(1_000, 1_050))  # click i was made at time i
    order = ids[:]
    random.Random(3).shuffle(order)  # ... and committed in this order
    outcomes = []
    for interaction_id in order:
        i = interaction_id - 1_000
        result = await record_choice(
            pool, round_id=round_id, discord_user_id=7, interaction_id=interaction_id, **_verdict(i)
        )
        outcomes.append(result.outcome)
    [choice] = await choices_of_round(pool, round_id)
    latest = _verdict(49)
    assert (choice.verdict, choice.chosen_position) == (latest["verdict"], latest["position"])
    assert choice.interaction_id == 1_049
    # Every click is an event; those older than the one already held are stale.
    assert await _counts(pool, round_id) == (1, 50)
    newest_so_far, expected = -1, []
    for interaction_id in order:
        expected.append("stale" if interaction_id < newest_so_far else "fresh")
        newest_so_far = max(newest_so_far, interaction_id)
    assert [o == "stale" for o in outcomes] == [e == "stale" for e in expected]
    stale_events = await pool.fetchval(
        "SELECT count(*) FROM choice_events WHERE round_id = $1 AND outcome = 'stale'", round_id
    )
    assert stale_events == expected.count("stale") > 0


async def test_a_ready_round_takes_no_clicks_past_its_time(pool) -> None:  # type: ignore[no-untyped-def]
    """Expiry is enforced by the click itself, before (or without) the scheduled close."""
    from datetime import timedelta

    round_id = await ready_round(pool, requester=1)
    await pool.execute(
        "UPDATE rounds SET ready_at = now() - interval '61 minutes' WHERE id = $1", round_id
    )
    with pytest.raises(ChoiceRefused) as refused:
        await record_choice(
            pool, round_id=round_id, discord_user_id=1, verdict="tie", open_for=timedelta(hours=1)
        )
    assert refused.value.code == "closed"
    assert await _counts(pool, round_id) == (0, 0)
    still_open = await record_choice(
        pool, round_id=round_id, discord_user_id=1, verdict="tie", open_for=timedelta(hours=2)
    )
    assert still_open.outcome == "recorded"


async def test_many_users_clicking_concurrently_get_one_choice_each(pool) -> None:  # type: ignore[no-untyped-def]
    round_id = await ready_round(pool, requester=1)
    rng = random.Random(5)
    clicks = [(user, rng.randrange(6)) for user in range(1, 51) for _ in range(4)]
    rng.shuffle(clicks)
    await asyncio.gather(
        *(
            record_choice(pool, round_id=round_id, discord_user_id=user, **_verdict(i))
            for user, i in clicks
        )
    )
    assert await _counts(pool, round_id) == (50, 200)
    mismatched = await pool.fetchval(
        """
        SELECT count(*) FROM choices c
        CROSS JOIN LATERAL (
            SELECT e.verdict, e.chosen_position FROM choice_events e
            WHERE e.round_id = c.round_id AND e.user_id = c.user_id
            ORDER BY e.id DESC LIMIT 1) last
        WHERE (c.verdict, c.chosen_position) IS DISTINCT FROM (last.verdict, last.chosen_position)
        """
    )
    assert mismatched == 0
    requester_choices = await pool.fetchval(
        "SELECT count(*) FROM choices WHERE round_id = $1 AND is_requester", round_id
    )
    assert requester_choices == 1


async def test_outcomes_say_whether_the_choice_changed(pool) -> None:  # type: ignore[no-untyped-def]
    round_id = await ready_round(pool, requester=1)
    first = await record_choice(
        pool, round_id=round_id, discord_user_id=1, verdict="pick", position=2
    )
    same = await record_choice(
        pool, round_id=round_id, discord_user_id=1, verdict="pick", position=2
    )
    changed = await record_choice(pool, round_id=round_id, discord_user_id=1, verdict="tie")
    assert [first.outcome, same.outcome, changed.outcome] == ["recorded", "unchanged", "changed"]
    # The same verdict again is not a new choice (the retraining schedule counts changes).
    assert (same.choice.revision, same.choice.updated_at) == (1, first.choice.updated_at)
    assert changed.choice.revision == 2
    assert (changed.previous_verdict, changed.previous_position) == ("pick", 2)
    assert changed.choice.verdict == "tie" and changed.choice.chosen_position is None


@pytest.mark.parametrize(
    ("setup", "click", "code"),
    [
        ("missing", {"verdict": "tie"}, "unknown_round"),
        ("queued", {"verdict": "tie"}, "not_ready"),
        ("generating", {"verdict": "tie"}, "not_ready"),
        ("failed", {"verdict": "tie"}, "failed"),
        ("closed", {"verdict": "tie"}, "closed"),
        ("ready", {"verdict": "pick", "position": 9}, "bad_position"),
        ("ready", {"verdict": "pick", "position": 99_999}, "bad_position"),  # > smallint
        ("ready", {"verdict": "pick", "position": 3}, "bad_position"),  # safety-flagged
        ("ready", {"verdict": "pick"}, "bad_position"),
        ("ready", {"verdict": "tie", "position": 1}, "bad_position"),
        ("ready", {"verdict": "maybe"}, "bad_verdict"),
        ("banned", {"verdict": "tie"}, "banned"),
        ("requester_only", {"verdict": "tie"}, "requester_only"),
    ],
)
async def test_refused_clicks_change_nothing(pool, setup: str, click: dict, code: str) -> None:  # type: ignore[no-untyped-def]
    voter = 2
    others_may_vote = setup != "requester_only"
    if setup in ("queued", "generating", "failed", "missing"):
        round_id = await queued_round(pool, requester=1)
        if setup == "generating":
            await rounds.start_generating(pool, round_id)
        if setup == "failed":
            await rounds.fail_round(pool, round_id, "boom")
        if setup == "missing":
            round_id += 1000
    else:
        round_id = await ready_round(pool, requester=1, nsfw_positions=(3,))
        if setup == "closed":
            assert await rounds.close_round(pool, round_id)
        if setup == "banned":
            await users.ban(pool, voter, reason="spam", actor="test")
    users_before = await pool.fetchval("SELECT count(*) FROM users")
    with pytest.raises(ChoiceRefused) as refused:
        await record_choice(
            pool,
            round_id=round_id,
            discord_user_id=voter,
            others_may_vote=others_may_vote,
            **click,
        )
    assert refused.value.code == code
    assert str(refused.value)  # a sentence for the user
    assert await _counts(pool, round_id) == (0, 0)
    assert await pool.fetchval("SELECT count(*) FROM users") == users_before


async def test_the_requester_may_choose_when_others_may_not(pool) -> None:  # type: ignore[no-untyped-def]
    round_id = await ready_round(pool, requester=1)
    result = await record_choice(
        pool, round_id=round_id, discord_user_id=1, verdict="none", others_may_vote=False
    )
    assert result.choice.is_requester and result.outcome == "recorded"


async def test_shadow_banned_clicks_are_stored_flagged(pool) -> None:  # type: ignore[no-untyped-def]
    round_id = await ready_round(pool, requester=1)
    await users.ban(pool, 66, shadow=True, reason="brigading", actor="mod")
    result = await record_choice(
        pool, round_id=round_id, discord_user_id=66, verdict="pick", position=1
    )
    assert result.outcome == "recorded" and result.choice.flagged
    assert await pool.fetchval("SELECT flagged FROM choice_events") is True
    await users.unban(pool, 66)
    again = await record_choice(
        pool, round_id=round_id, discord_user_id=66, verdict="pick", position=2
    )
    assert not again.choice.flagged


async def test_a_click_and_a_close_of_the_round_never_overlap(pool) -> None:  # type: ignore[no-untyped-def]
    """The close waits for a click in flight; a click after the close is refused."""
    round_id = await ready_round(pool, requester=1)
    async with pool.acquire() as clicking:
        click = clicking.transaction()
        await click.start()
        await record_choice(clicking, round_id=round_id, discord_user_id=1, verdict="tie")
        closing = asyncio.create_task(rounds.close_round(pool, round_id))
        await asyncio.sleep(0.3)
        assert not closing.done()
        await click.commit()
    assert await asyncio.wait_for(closing, 5)
    with pytest.raises(ChoiceRefused) as refused:
        await record_choice(pool, round_id=round_id, discord_user_id=2, verdict="tie")
    assert refused.value.code == "closed"
    assert await _counts(pool, round_id) == (1, 1)
