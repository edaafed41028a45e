"""Forgetting that forgets: after /forget-me, nothing `hps_analyst` can read joins to the
person, by id, by time or by hash. The attacker's queries are the ones of issue 11.

The example: the person (Discord user 7) asked for three rounds that were generated (their
generate jobs completed with results as the worker writes them: the round id, the A/B plan,
the seeds, the images' hashes), one of them for a prompt someone else asked for later, and one
that still waits; the bot posted the rounds' messages and the image they chose; they voted on
someone else's round, scored an upload with /score, and, as a maintainer, promoted a model
(its notice names them). The images are in an S3 bucket (moto on loopback). An HPD export
of everything was imported back into the same database (the person's picks came back as the
user `import:<their pseudonym>`). Other people did the same around them; the bot and the
scheduler heartbeat, a scorer evaluation was stored, and an earlier forget left a message
to delete. Everything is stamped by the database's clock in separate transactions, so that
a time equal to one of the person's is one of the person's.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from db import jobs, messages, models, scorers, services, users
from db.choices import record_choice
from db.images import images_of_round
from hps.settings import load_settings
from hps.storage import storage
from hps.store import ImageStore
from pipeline.datasets import export_dataset, import_hpd
from tests.factories import queued_round, stored_round

PERSON, OTHER, VOTER = 7, 8, 9
GUILD, CHANNEL = 810000000000000001, 810000000000000011
SHARED = "a lighthouse at dawn"  # asked for by the person first, then by someone else

# Every column the analysts' role may read, in every table and view.
READABLE_COLUMNS_SQL = """
SELECT c.table_name, c.column_name, c.data_type
FROM information_schema.columns c
WHERE c.table_schema = 'public'
  AND has_column_privilege('hps_analyst', format('%I', c.table_name), c.column_name, 'SELECT')
ORDER BY c.table_name, c.ordinal_position
"""

# The person's fingerprints, read as the owner before forgetting: the times of their own rows
# (another voter's click on one of their rounds is that voter's: it may stay as the voter's
# first or last sight).
PERSON_TIMES_SQL = """
WITH me AS (SELECT * FROM users WHERE discord_id = $1),
     mine AS (SELECT r.* FROM rounds r JOIN me ON r.requester_id = me.id)
SELECT unnest(ARRAY[me.first_seen_at, me.last_seen_at]) AS t FROM me
UNION SELECT unnest(ARRAY[created_at, started_at, ready_at, closed_at]) FROM mine
UNION SELECT i.created_at FROM images i JOIN mine ON mine.id = i.round_id
UNION SELECT m.created_at FROM round_messages m JOIN mine ON mine.id = m.round_id
UNION SELECT unnest(ARRAY[c.created_at, c.updated_at]) FROM choices c
      WHERE c.user_id = (SELECT id FROM me)
UNION SELECT e.created_at FROM choice_events e WHERE e.user_id = (SELECT id FROM me)
UNION SELECT unnest(ARRAY[j.created_at, j.started_at, j.finished_at, j.run_after,
                          j.heartbeat_at, j.lease_expires_at])
      FROM jobs j
      WHERE j.payload->>'round_id' IN (SELECT id::text FROM mine)
         OR j.requested_by = 'discord:' || $1::bigint
"""

# The attack: a job made in the transaction that first saw a user.
ATTACK = "SELECT u.pseudonym, j.result FROM users u JOIN jobs j ON j.created_at = u.first_seen_at"

PERSON_HASHES_SQL = """
SELECT i.sha256, i.storage_key FROM images i
JOIN rounds r ON r.id = i.round_id JOIN users u ON u.id = r.requester_id
WHERE u.discord_id = $1
"""

# Where the person's Discord id could be written down (as the owner sees it).
DISCORD_ID_DUMP_SQL = """
SELECT concat_ws(' ',
    (SELECT string_agg(coalesce(actor, '') || ' ' || coalesce(notice::text, ''), ' ')
     FROM model_events),
    (SELECT string_agg(coalesce(requested_by, '') || payload::text, ' ') FROM jobs),
    (SELECT string_agg(coalesce(banned_by, ''), ' ') FROM users))
"""


async def _as_analyst(pool: asyncpg.Pool, sql: str, *args: object) -> list[asyncpg.Record]:
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL ROLE hps_analyst")
        return await conn.fetch(sql, *args)


async def _everything_the_analyst_reads(pool: asyncpg.Pool) -> dict[tuple[str, str], list]:
    """(table, column) -> its values, for every column hps_analyst may read."""
    columns = await pool.fetch(READABLE_COLUMNS_SQL)
    seen = {}
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL ROLE hps_analyst")
        for table, column, _ in columns:
            rows = await conn.fetch(f'SELECT "{column}" AS v FROM "{table}"')
            seen[(table, column)] = [r["v"] for r in rows]
    return seen


@pytest.fixture
def bucket(s3_store: dict[str, Any], tmp_path: Path) -> ImageStore:
    """The image store: a bucket on the test S3 server."""
    return storage(load_settings(data_dir=tmp_path / "data", store=s3_store)).images


async def _generated(pool: asyncpg.Pool, round_id: int) -> None:
    """Complete the round's generate job as the worker does (its result names the round,
    the A/B plan, the seeds and the images' hashes)."""
    [job] = await jobs.claim_matching(
        pool, "generate", {"round_id": round_id}, "w", timedelta(minutes=1), limit=1
    )
    images = await images_of_round(pool, round_id, include_nsfw=True)
    result = {
        "round_id": round_id,
        "plan": {"versions": [None] * len(images), "candidates": []},
        "images": [{"position": i.position, "seed": i.seed, "sha256": i.sha256} for i in images],
        "status": "ready",
    }
    assert await jobs.complete(pool, job, "w", result)


async def _posted(pool: asyncpg.Pool, round_id: int, chosen: bool = False) -> None:
    """The bot's messages of a round: its own, and the requester's chosen image."""
    await messages.record_message(pool, round_id, GUILD, CHANNEL, 5_000_000 + round_id)
    if chosen:
        await messages.record_round_message(
            pool, round_id, GUILD, CHANNEL, 6_000_000 + round_id, "chosen"
        )


async def _person_and_neighbours(
    pool: asyncpg.Pool, store: ImageStore, tmp_path: Path
) -> dict[str, Any]:
    """The example of the module docstring; returns the person's round ids and others'."""

    async def posted_round(requester: int, prompt: str) -> int:
        return await stored_round(
            pool, store, requester=requester, prompt=prompt, k=4, channel_id=CHANNEL
        )

    castle = await posted_round(OTHER, "someone else's castle")
    mine = [
        await posted_round(PERSON, "my secret garden"),
        await posted_round(PERSON, "my secret garden, at night"),
        await posted_round(PERSON, SHARED),
    ]
    waiting = await queued_round(pool, requester=PERSON, prompt="my third secret")
    theirs = await posted_round(OTHER, "a lighthouse")
    shared = await posted_round(OTHER, SHARED)
    for round_id in [castle, *mine, theirs, shared]:
        await _generated(pool, round_id)
        await _posted(pool, round_id, chosen=round_id in (mine[0], theirs))
    await record_choice(pool, round_id=mine[0], discord_user_id=PERSON, verdict="pick", position=2)
    await record_choice(pool, round_id=mine[0], discord_user_id=VOTER, verdict="pick", position=2)
    await record_choice(pool, round_id=mine[2], discord_user_id=PERSON, verdict="pick", position=1)
    await record_choice(pool, round_id=theirs, discord_user_id=PERSON, verdict="pick", position=3)
    await record_choice(pool, round_id=theirs, discord_user_id=OTHER, verdict="pick", position=1)
    await record_choice(pool, round_id=theirs, discord_user_id=VOTER, verdict="tie")
    await record_choice(pool, round_id=shared, discord_user_id=OTHER, verdict="pick", position=4)
    bucket_upload = store.put(b"the bytes of my upload, scored with /score").key
    await jobs.enqueue(
        pool, "score", {"prompt": "my secret upload", "image_keys": [bucket_upload]},
        requested_by=f"discord:{PERSON}",
    )  # fmt: skip
    [claimed] = await jobs.claim(pool, ["score"], "w", timedelta(minutes=1))
    await jobs.complete(pool, claimed, "w", {"scores": [21.25], "scale": "hps", "model": "m"})
    # The person is a maintainer: they promoted a classifier (its notice names them).
    version = await models.register(
        pool, kind="classifier", artifact="models/c/1", actor=f"discord:{PERSON}"
    )
    await models.promote(pool, version.id, actor=f"discord:{PERSON}", reason="better")
    # The platform around them.
    await services.heartbeat(pool, "bot", {"gateway": True, "guilds": 1})
    await services.heartbeat(pool, "scheduler", {"schedules": ["close_stale_rounds"]})
    report = {"examples": "f" * 16, "model": "hps v1", "scale": "hps", "n": 3, "ties": 1,
              "top1": 0.5, "top1_ci": [0.1, 0.9], "chance": 0.25, "pairwise": 0.6,
              "pairwise_ci": [0.2, 0.9], "pairwise_n": 9}  # fmt: skip
    await scorers.record_agreement(pool, source="choices", split="test", reports={"hps": report})
    await messages.record_message(pool, 10**9, GUILD, CHANNEL, 7_000_000)  # an earlier forget's
    # An HPD export of the picks, imported back into this database.
    async with pool.acquire() as conn:
        await export_dataset(conn, store, tmp_path / "export", "hpd", progress=False)
        imported = await import_hpd(conn, store, tmp_path / "export", progress=False)
    assert imported.imported == 4  # the person's two picks, the other's two
    return {
        "mine": [*mine, waiting],
        "theirs": theirs,
        "shared": shared,
        "castle": castle,
        "upload": bucket_upload,
    }


async def test_after_forgetting_nothing_the_analyst_reads_joins_to_the_person(
    pool: asyncpg.Pool, bucket: ImageStore, tmp_path: Path
) -> None:
    example = await _person_and_neighbours(pool, bucket, tmp_path)
    mine: list[int] = example["mine"]
    # The fingerprints an attacker would join on, and an analyst's extract made before.
    times = {r["t"] for r in await pool.fetch(PERSON_TIMES_SQL, PERSON) if r["t"] is not None}
    hashes = {v for r in await pool.fetch(PERSON_HASHES_SQL, PERSON) for v in r.values()}
    assert len(hashes) == 24 and len(times) >= 20
    old_pseudonym = (await users.get_user(pool, PERSON)).pseudonym
    extract = await _as_analyst(
        pool, "SELECT pseudonym, first_seen_at, last_seen_at FROM users WHERE pseudonym = $1",
        old_pseudonym,
    )  # fmt: skip
    # The attack works before forgetting: the person's first round's job was made
    # in the transaction that first saw them.
    assert len(await _as_analyst(pool, f"{ATTACK} WHERE u.pseudonym = $1", old_pseudonym)) == 1
    # Their imported copy shows their prompts and picks under their pseudonym; the shared
    # prompt is dated by their round; their Discord id is on the model's notice.
    [copy] = await _as_analyst(
        pool, "SELECT * FROM user_activity WHERE pseudonym = $1", f"import:{old_pseudonym}"
    )
    assert (copy["rounds_requested"], copy["picks"]) == (2, 2)
    shared_created = await pool.fetchval("SELECT created_at FROM prompts WHERE text = $1", SHARED)
    assert shared_created in times
    assert f"discord:{PERSON}" in await pool.fetchval(DISCORD_ID_DUMP_SQL)
    keys_before = {k for k, _ in bucket.objects.listing()}

    result = await users.forget_user(pool, PERSON, delete=bucket.delete)
    assert (result.rounds_deleted, result.jobs_deleted) == (4, 5)
    assert (result.imported_rounds_deleted, result.messages_queued) == (2, 4)
    # Their files are gone from the bucket (and nothing is left to delete); others' stay.
    assert (result.files_deleted, result.files_pending) == (13, 0)  # 12 images, the upload
    assert await pool.fetchval("SELECT count(*) FROM image_deletions") == 0
    keys_after = {k for k, _ in bucket.objects.listing()}
    gone = {h for h in hashes if h.endswith(".png")} | {example["upload"]}
    assert keys_after == keys_before - gone
    assert keys_after == {r["storage_key"] for r in await pool.fetch("SELECT * FROM images")}

    # The query finds nothing, for any forgotten user.
    assert await _as_analyst(pool, f"{ATTACK} WHERE u.forgotten_at IS NOT NULL") == []
    # By id: the internal ids an old extract could hold are not readable at all, nor the
    # queue of messages to delete (forgetting's times, Discord ids), nor the files to delete
    # (the person's images' hashes), nor who acted on a model.
    for sql in (
        "SELECT id FROM users",
        "SELECT user_id FROM choices",
        "SELECT user_id FROM choice_events",
        "SELECT requester_id FROM rounds",
        "SELECT * FROM message_deletions",
        "SELECT * FROM image_deletions",
        "SELECT message_id FROM round_messages",
        "SELECT notice FROM model_events",
        "SELECT actor FROM model_events",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await _as_analyst(pool, sql)
    # Nor does the owner's copy keep their Discord id anywhere (a maintainer's notices too).
    dump = await pool.fetchval(DISCORD_ID_DUMP_SQL)
    assert f"discord:{PERSON}" not in dump and "a forgotten user" in dump
    seen = await _everything_the_analyst_reads(pool)
    # Every table of the example has rows, so that no check below passes on emptiness.
    for table in ("round_messages", "services", "scorer_agreement", "prompts", "model_events",
                  "jobs", "choices_flat", "user_activity", "images"):  # fmt: skip
        assert any(values for (t, _), values in seen.items() if t == table), table
    # By round id: no row names one of the person's rounds (rows, jobs' results and keys).
    for (table, column), values in seen.items():
        if column in ("round_id", "id") and table in ("rounds", "images", "choices",
                                                      "choice_events", "choices_flat",
                                                      "ab_rounds", "ab_decisions",
                                                      "round_messages"):  # fmt: skip
            if column == "id" and table != "rounds":
                continue
            assert not set(values) & set(mine), (table, column)
    job_text = " ".join(str(v) for v in seen[("jobs", "result")] + seen[("jobs", "dedupe_key")])
    for round_id in mine:
        assert f"generate:round:{round_id}" not in job_text
        assert f"'round_id': {round_id}," not in job_text
    # By hash, prompt or pseudonym (their own, or that of their imported copy): no readable
    # text holds one.
    dump = " ".join(str(v) for values in seen.values() for v in values)
    leaked = [h for h in hashes if h in dump]
    assert not leaked
    for secret in ("my secret", old_pseudonym, example["upload"]):
        assert secret not in dump
    # By time: no readable time is one of the person's (a prompt kept for someone else is
    # dated by their round now).
    for (table, column), values in seen.items():
        stamped = {v for v in values if isinstance(v, datetime)}
        assert not stamped & times, (table, column, sorted(stamped & times))
    assert await pool.fetchval(
        "SELECT p.created_at = r.created_at FROM prompts p JOIN rounds r ON r.prompt_id = p.id"
        " WHERE r.id = $1", example["shared"],
    )  # fmt: skip
    # The tombstone's times join nothing but other tombstones.
    tombstone = await _as_analyst(
        pool, "SELECT first_seen_at, last_seen_at, forgotten_at FROM users"
        " WHERE forgotten_at IS NOT NULL"
    )  # fmt: skip
    own = set(tombstone[0].values())
    assert len(own) == 1  # all three: the day's midnight
    for (table, column), values in seen.items():
        if table in ("users", "user_activity") and column in (
            "first_seen_at", "last_seen_at", "forgotten_at"
        ):  # fmt: skip
            continue
        assert not own & {v for v in values if isinstance(v, datetime)}, (table, column)
    # The old extract matches no row any more.
    [old] = extract
    now_users = await _as_analyst(pool, "SELECT pseudonym, first_seen_at, last_seen_at FROM users")
    for row in now_users:
        assert row["pseudonym"] != old["pseudonym"]
        assert row["first_seen_at"] != old["first_seen_at"]
        assert row["last_seen_at"] != old["last_seen_at"]
    # The user activity of the forgotten user: none; of their imported copy: no row at all.
    [forgotten] = await _as_analyst(pool, "SELECT * FROM user_activity WHERE forgotten")
    assert (forgotten["rounds_requested"], forgotten["choices"]) == (0, 0)
    assert forgotten["last_choice_at"] is None
    assert await _as_analyst(
        pool, "SELECT * FROM user_activity WHERE pseudonym LIKE $1", f"%{old_pseudonym}%"
    ) == []  # fmt: skip
    # Importing the export again brings none of it back.
    async with pool.acquire() as conn:
        again = await import_hpd(conn, bucket, tmp_path / "export", progress=False)
    assert (again.imported, again.forgotten) == (0, 2)


async def test_others_data_stays(pool: asyncpg.Pool, bucket: ImageStore, tmp_path: Path) -> None:
    example = await _person_and_neighbours(pool, bucket, tmp_path)
    await users.forget_user(pool, PERSON, delete=bucket.delete)
    theirs = example["theirs"]
    rows = await _as_analyst(
        pool, "SELECT chooser, verdict, chosen_position FROM choices_flat WHERE round_id = $1",
        theirs,
    )  # fmt: skip
    assert sorted((r["verdict"], r["chosen_position"]) for r in rows) == [
        ("pick", 1), ("tie", None)
    ]  # fmt: skip
    job = await jobs.get_by_dedupe_key(pool, f"generate:round:{theirs}")
    assert job is not None and job.result["round_id"] == theirs
    # Their three rounds and the two imported copies of their picks; their messages.
    assert await pool.fetchval("SELECT count(*) FROM rounds") == 5
    other = (await users.get_user(pool, OTHER)).pseudonym
    [copy] = await _as_analyst(
        pool, "SELECT * FROM user_activity WHERE pseudonym = $1", f"import:{other}"
    )
    assert (copy["rounds_requested"], copy["picks"]) == (2, 2)
    assert await pool.fetchval("SELECT count(*) FROM round_messages") == 1  # the chosen one
    assert await pool.fetchval("SELECT count(*) FROM rounds WHERE message_id IS NOT NULL") == 3
    for round_id in (theirs, example["shared"], example["castle"]):
        assert len(await images_of_round(pool, round_id, include_nsfw=True)) == 4


async def test_a_carried_ban_joins_nothing_by_time(pool: asyncpg.Pool) -> None:
    """An analyst keeps a list of banned pseudonyms with their times. After a banned person is
    forgotten, their old pseudonym is gone and a banned row appears (the ban, carried): none
    of its times is the moment of the forget, nor one of the person's; all are the day's
    midnight, as the tombstone's are."""
    theirs = await queued_round(pool, requester=OTHER, prompt="a quiet harbour")
    await queued_round(pool, requester=PERSON, prompt="my secret harbour")
    await users.ban(pool, PERSON, reason="spam", actor="mod")
    await users.ban(pool, VOTER, shadow=True, reason="sockpuppet", actor="mod")
    banned_list = "SELECT pseudonym, first_seen_at, last_seen_at, banned_at FROM users" \
        " WHERE banned OR shadow_banned"  # fmt: skip
    before = {r["pseudonym"]: r for r in await _as_analyst(pool, banned_list)}
    times = {r["t"] for r in await pool.fetch(PERSON_TIMES_SQL, PERSON) if r["t"] is not None}
    forgetting_at = await pool.fetchval("SELECT now()")

    await users.forget_user(pool, PERSON)

    after = {r["pseudonym"]: r for r in await _as_analyst(pool, banned_list)}
    [carried] = [r for p, r in after.items() if p not in before]
    [tombstone] = await _as_analyst(
        pool, "SELECT first_seen_at FROM users WHERE forgotten_at IS NOT NULL"
    )
    midnight = tombstone["first_seen_at"]
    assert (carried["first_seen_at"], carried["last_seen_at"], carried["banned_at"]) == (
        midnight, midnight, midnight
    )  # fmt: skip
    assert midnight <= forgetting_at and not {midnight} & times
    old_times = {t for r in before.values() for t in tuple(r)[1:]}
    assert not set(tuple(carried)[1:]) & old_times
    assert await pool.fetchval("SELECT count(*) FROM rounds WHERE id = $1", theirs) == 1
