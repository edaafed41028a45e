"""Bans and forgetting a user."""

from __future__ import annotations

from db import jobs, rounds, users
from db.choices import record_choice
from tests.factories import queued_round, ready_round


async def test_forgetting_deletes_the_users_data_and_keeps_others(pool) -> None:  # type: ignore[no-untyped-def]
    mine = await ready_round(pool, requester=1, prompt="my private prompt")
    theirs = await ready_round(pool, requester=2, prompt="their prompt")
    pending = await queued_round(pool, requester=1, prompt="my queued prompt")
    await record_choice(pool, round_id=mine, discord_user_id=1, verdict="pick", position=1)
    await record_choice(pool, round_id=mine, discord_user_id=2, verdict="tie")
    await record_choice(pool, round_id=theirs, discord_user_id=1, verdict="pick", position=2)
    await record_choice(pool, round_id=theirs, discord_user_id=1, verdict="pick", position=3)
    await record_choice(pool, round_id=theirs, discord_user_id=2, verdict="none")
    pseudonym = (await users.get_user(pool, 1)).pseudonym

    result = await users.forget_user(pool, 1)

    assert result is not None
    assert (result.choices_deleted, result.events_deleted, result.rounds_deleted) == (2, 3, 2)
    assert result.jobs_deleted == 2  # the generate jobs of both rounds, the queued one too
    assert len(result.orphaned_image_keys) == 4  # the images of the round they asked for
    assert result.files_deleted == 0  # no store given: the caller deletes them
    assert await users.get_user(pool, 1) is None
    tombstone = await pool.fetchrow("SELECT * FROM users WHERE id = $1", result.user_id)
    assert tombstone["discord_id"] is None and tombstone["forgotten_at"] is not None
    assert tombstone["pseudonym"] != pseudonym
    # Every time on the tombstone is the day's midnight (UTC): none joins to the person.
    midnight = await pool.fetchval("SELECT date_trunc('day', now(), 'UTC')")
    times = (tombstone["first_seen_at"], tombstone["last_seen_at"], tombstone["forgotten_at"])
    assert times == (midnight, midnight, midnight)
    assert await pool.fetchval("SELECT count(*) FROM rounds") == 1
    assert await pool.fetchval("SELECT count(*) FROM choices") == 1  # user 2 on their round
    assert await pool.fetchval("SELECT count(*) FROM choice_events") == 1
    assert await pool.fetchval("SELECT count(*) FROM prompts") == 1
    assert await jobs.get_by_dedupe_key(pool, f"generate:round:{pending}") is None
    assert await jobs.get_by_dedupe_key(pool, f"generate:round:{mine}") is None
    assert await jobs.get_by_dedupe_key(pool, f"generate:round:{theirs}") is not None
    assert await pool.fetchval("SELECT count(*) FROM choices_flat") == 1
    assert await users.forget_user(pool, 1) is None  # unknown now


async def test_a_banned_user_stays_banned_after_forgetting_on_a_fresh_row(pool) -> None:  # type: ignore[no-untyped-def]
    """The ban moves to a fresh row with the Discord id; the tombstone keeps nothing, and
    the user's later clicks are the fresh row's activity (flagged), never the tombstone's."""
    theirs = await ready_round(pool, requester=2)
    await record_choice(pool, round_id=theirs, discord_user_id=3, verdict="pick", position=1)
    await users.ban(pool, 3, shadow=True, reason="sockpuppet", actor="mod")
    before = await users.get_user(pool, 3)

    forgotten = await users.forget_user(pool, 3)

    user = await users.get_user(pool, 3)
    assert user is not None and user.id != forgotten.user_id and user.id != before.id
    assert user.shadow_banned and not user.banned and user.forgotten_at is None
    assert (user.ban_reason, user.banned_by) == ("sockpuppet", "mod")
    assert user.pseudonym != before.pseudonym
    tombstone = await pool.fetchrow("SELECT * FROM users WHERE id = $1", forgotten.user_id)
    # Every time of the fresh row is the tombstone's midnight: none says when in the day
    # the person was forgotten (an analyst with an old list of banned pseudonyms would
    # otherwise see one vanish and another appear at that moment).
    midnight = tombstone["first_seen_at"]
    assert (user.first_seen_at, user.last_seen_at, user.banned_at) == (midnight,) * 3
    assert tombstone["discord_id"] is None and tombstone["forgotten_at"] is not None
    assert not tombstone["shadow_banned"] and tombstone["ban_reason"] is None
    assert tombstone["banned_at"] is None and tombstone["banned_by"] is None

    later = await record_choice(pool, round_id=theirs, discord_user_id=3, verdict="tie")
    assert later.outcome == "recorded" and later.choice.flagged
    assert later.choice.user_id == user.id
    activity = {
        r["forgotten"]: (r["shadow_banned"], r["choices"], r["first_seen_at"])
        for r in await pool.fetch(
            "SELECT * FROM user_activity WHERE pseudonym IN ($1, $2)",
            tombstone["pseudonym"],
            user.pseudonym,
        )
    }
    assert activity == {
        True: (False, 0, tombstone["first_seen_at"]),
        False: (True, 1, user.first_seen_at),
    }
    # Forgetting again forgets the fresh row the same way, and the ban still holds.
    again = await users.forget_user(pool, 3)
    assert again.choices_deleted == 1
    assert (await users.get_user(pool, 3)).shadow_banned


async def test_ban_unban(pool) -> None:  # type: ignore[no-untyped-def]
    banned = await users.ban(pool, 4, reason="spam", actor="mod")
    assert banned.banned and not banned.shadow_banned and banned.banned_by == "mod"
    shadow = await users.ban(pool, 4, shadow=True, reason="spam", actor="mod")
    assert shadow.shadow_banned and not shadow.banned
    lifted = await users.unban(pool, 4)
    assert not lifted.banned and not lifted.shadow_banned and lifted.ban_reason is None
    assert await users.unban(pool, 999) is None
    round_id = await rounds.create_round(pool, requester_discord_id=4, prompt="ok", k=2)
    assert round_id.round.requester_id == lifted.id


async def test_forgetting_scrubs_the_users_id_from_jobs_bans_and_model_events(pool) -> None:  # type: ignore[no-untyped-def]
    from db import models

    await ready_round(pool, requester=1)
    await jobs.enqueue(
        pool, "score", {"prompt": "my private idea", "image_keys": ["k"]}, requested_by="discord:1"
    )
    await jobs.enqueue_training(pool, "classifier", requested_by="discord:1")
    await users.ban(pool, 9, reason="spam", actor="discord:1")  # user 1 is a maintainer
    version = await models.register(pool, kind="classifier", artifact="/m", actor="discord:1")
    await models.promote(pool, version.id, actor="discord:1")

    await users.forget_user(pool, 1)

    dump = await pool.fetchval(
        "SELECT concat_ws(' ', (SELECT string_agg(coalesce(requested_by, '') || payload::text, ' ')"
        " FROM jobs), (SELECT string_agg(coalesce(banned_by, ''), ' ') FROM users),"
        " (SELECT string_agg(coalesce(actor, ''), ' ') FROM model_events))"
    )
    assert "discord:1" not in dump and "my private idea" not in dump
    assert "a forgotten user" in dump
    # Their /score job (their upload, their prompt) is gone; the training run they asked
    # for as a maintainer stays, with no trace of who asked.
    assert await pool.fetchval("SELECT count(*) FROM jobs WHERE kind = 'score'") == 0
    training = await pool.fetchrow("SELECT * FROM jobs WHERE kind = 'train_classifier'")
    assert training["requested_by"] is None and training["payload"] == {}


def test_the_jobs_forgetting_keeps_are_the_training_kinds() -> None:
    assert sorted(users.KEPT_JOB_KINDS) == sorted(jobs.TRAINING_KINDS.values())


async def test_a_click_in_flight_on_their_own_round_does_not_deadlock_a_forget(pool) -> None:  # type: ignore[no-untyped-def]
    """A click locks the round, then the user: forgetting takes them in that order too, so
    it waits for the click (whose choice it then deletes) instead of deadlocking with it."""
    import asyncio

    mine = await ready_round(pool, requester=1)
    async with pool.acquire() as clicking:
        click = clicking.transaction()
        await click.start()
        # A click that has read (and so share-locked) the round, not yet the user's row.
        await clicking.execute("SELECT 1 FROM rounds WHERE id = $1 FOR SHARE", mine)
        forgetting = asyncio.create_task(users.forget_user(pool, 1))
        await asyncio.sleep(0.3)
        assert not forgetting.done()  # it waits for the round, holding nothing the click needs
        result = await record_choice(clicking, round_id=mine, discord_user_id=1, verdict="tie")
        assert result.outcome == "recorded"
        await click.commit()
    forgotten = await asyncio.wait_for(forgetting, 10)
    assert forgotten is not None and forgotten.rounds_deleted == 1
    assert forgotten.choices_deleted == 1 and forgotten.events_deleted == 1
    assert await pool.fetchval("SELECT count(*) FROM choices") == 0
