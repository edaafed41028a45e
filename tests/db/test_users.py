"""Bans and forgetting a user."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest

from db import images, jobs, locks, rounds, users
from db.choices import record_choice
from hps.store import LocalImageStore, StoreUnavailable
from tests.factories import queued_round, ready_round, stored_round


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
    # No store given: recorded, for the caller (or the bot's retry loop) to delete.
    assert (result.files_deleted, result.files_pending) == (0, 4)
    pending = await pool.fetch("SELECT storage_key FROM image_deletions ORDER BY storage_key")
    assert [r["storage_key"] for r in pending] == result.orphaned_image_keys
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


class FailingStore(LocalImageStore):
    """A store whose deletions fail (unreachable) for the keys in `failing`."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.failing: set[str] = set()
        self.asked: list[str] = []

    def delete(self, key: str) -> bool:
        self.asked.append(key)
        if key in self.failing:
            raise StoreUnavailable("cannot use the object store: connection refused")
        return super().delete(key)


async def test_files_a_failing_store_kept_stay_recorded_and_a_later_sweep_deletes_them(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    store = FailingStore(tmp_path / "images")
    mine = await stored_round(pool, store, requester=1, k=4)
    theirs = await stored_round(pool, store, requester=2, k=2)
    keys = sorted(r["storage_key"] for r in await pool.fetch(
        "SELECT storage_key FROM images WHERE round_id = $1", mine
    ))  # fmt: skip
    store.failing = {keys[1]}  # the store goes away after the first file

    result = await users.forget_user(pool, 1, delete=store.delete)

    # The rows are gone; the first file too; the failure stopped the pass (the store is
    # likely failing for the next ones too), and the three left are recorded.
    assert result.rounds_deleted == 1 and await pool.fetchval("SELECT count(*) FROM rounds") == 1
    assert (result.files_deleted, result.files_pending) == (1, 3)
    assert store.asked == keys[:2]
    assert [store.exists(k) for k in keys] == [False, True, True, True]
    rows = {r["storage_key"]: r for r in await pool.fetch("SELECT * FROM image_deletions")}
    assert sorted(rows) == keys[1:]
    failed = rows[keys[1]]
    assert failed["attempts"] == 1 and failed["error"] == (
        "StoreUnavailable: cannot use the object store: connection refused"
    )
    backoff = await pool.fetchval(
        "SELECT next_attempt_at - requested_at FROM image_deletions WHERE storage_key = $1",
        keys[1],
    )
    assert timedelta(seconds=29) < backoff < timedelta(seconds=40)
    # A rerun of the forget says the person is unknown: the record is what remembers.
    assert await users.forget_user(pool, 1, delete=store.delete) is None

    # A later sweep (the bot's, every minute): the two never tried are due and go; the one
    # that failed waits for its backoff, however the store does now.
    store.failing = set()
    sweep = await images.delete_pending(pool, store.delete)
    assert (sweep.deleted, sweep.failed) == (2, 0)
    assert [store.exists(k) for k in keys] == [False, True, False, False]
    assert await images.pending_deletions(pool, keys) == 1
    await pool.execute("UPDATE image_deletions SET next_attempt_at = now()")  # time passes
    assert (await images.delete_pending(pool, store.delete)).deleted == 1
    assert not any(store.exists(k) for k in keys)
    assert await pool.fetchval("SELECT count(*) FROM image_deletions") == 0
    # The other person's files were never touched.
    for row in await pool.fetch("SELECT storage_key FROM images WHERE round_id = $1", theirs):
        assert store.exists(row["storage_key"])


async def test_a_pending_file_named_again_is_kept_and_a_held_key_is_left_for_later(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """The sweep deletes under the keys' locks, each checked unreferenced again: a file a
    new row names since the forget stays (and is no longer pending); a key a writer holds
    now is skipped, not waited for."""
    store = LocalImageStore(tmp_path / "images")
    mine = await stored_round(pool, store, requester=1, k=2)
    shown = await images.images_of_round(pool, mine, include_nsfw=True)
    result = await users.forget_user(pool, 1)  # recorded; not deleted yet
    reused, held = sorted(result.orphaned_image_keys)
    # Someone's round has the same bytes as one of them now (a /score upload would too).
    again = await queued_round(pool, requester=2, k=1)
    await rounds.start_generating(pool, again)
    [same] = [i for i in shown if i.storage_key == reused]
    await rounds.finish_round(pool, again, [images.NewImage(1, same.sha256, same.storage_key)])
    async with pool.acquire() as writer, writer.transaction():
        await images.hold_keys(writer, [held])  # a writer naming it right now
        sweep = await asyncio.wait_for(images.delete_pending(pool, store.delete), 5)
        assert (sweep.deleted, sweep.in_use, sweep.busy) == (0, 1, 1)
    assert store.exists(reused) and store.exists(held)
    assert await images.pending_deletions(pool, [reused, held]) == 1
    # The held key is looked at again a little later (not at every sweep in between).
    assert (await images.delete_pending(pool, store.delete)).deleted == 0
    assert (await images.delete_pending(pool, store.delete, keys=[held])).deleted == 1
    assert not store.exists(held) and store.exists(reused)


async def test_forgetting_takes_no_session_lock_and_no_image_key_lock(pool: asyncpg.Pool) -> None:
    """The bot's pool skips the session reset (`reset_session=False`): a forget must leave
    no lock on its connection, whatever happens after its commit; and a foreign holder of
    one of the person's image keys cannot hold up the forget (its file waits instead)."""
    await ready_round(pool, requester=1)
    [key, *_] = await pool.fetchval(
        "SELECT array_agg(storage_key ORDER BY storage_key) FROM images"
    )
    async with pool.acquire() as holder, holder.transaction():
        await images.hold_keys(holder, [key])

        def unreachable(key: str) -> bool:
            raise StoreUnavailable("the store is down")

        result = await asyncio.wait_for(users.forget_user(pool, 1, delete=unreachable), 5)
    assert result is not None and result.files_pending == 4
    advisory = await pool.fetchval(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database ="
        " (SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    assert advisory == 0


async def test_a_forget_that_times_out_says_which_rows_were_locked(pool: asyncpg.Pool) -> None:
    mine = await ready_round(pool, requester=1)
    await record_choice(pool, round_id=mine, discord_user_id=1, verdict="tie")
    fast = timedelta(seconds=0.3)
    cases = {
        "the user's rounds": "SELECT 1 FROM rounds WHERE id = $1 FOR UPDATE",
        "the user's row": "SELECT 1 FROM users WHERE discord_id = $1 FOR UPDATE",
        "the rows to delete (choices, clicks and jobs)": (
            "SELECT 1 FROM jobs WHERE payload->>'round_id' = $1::bigint::text FOR UPDATE"
        ),
    }
    for what, sql in cases.items():
        async with pool.acquire() as holder, holder.transaction():
            await holder.execute(sql, 1 if "users" in sql else mine)
            with pytest.raises(locks.LockTimeout) as error:
                await users.forget_user(pool, 1, lock_timeout=fast)
        assert str(error.value) == (
            f"could not lock {what} within 0.3 s: another transaction is changing them. "
            "Nothing was changed; try again."
        )
        assert await pool.fetchval("SELECT count(*) FROM rounds") == 1
        assert await pool.fetchval("SELECT count(*) FROM choices") == 1
    assert (await users.forget_user(pool, 1)).rounds_deleted == 1
