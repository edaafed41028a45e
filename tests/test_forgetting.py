"""Forgetting that forgets: after /forget-me, nothing `hps_analyst` can read joins to the
person, by id, by time or by hash. The attacker's queries are the ones of issue 11.

The example: the person (Discord user 7) asked for two rounds that were generated (their
generate jobs completed with results as the worker writes them: the round id, the A/B plan,
the seeds, the images' hashes), one that still waits, voted on someone else's round, scored
an upload with /score; other people did the same around them. Everything is stamped by the
database's clock in separate transactions, so that a time equal to one of the person's is
one of the person's.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import asyncpg
import pytest

from db import jobs, users
from db.choices import record_choice
from tests.factories import fake_image, queued_round, ready_round

PERSON, OTHER, VOTER = 7, 8, 9

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


async def _person_and_neighbours(pool: asyncpg.Pool) -> dict[str, object]:
    """The example of the module docstring; returns the person's round ids."""
    await ready_round(pool, requester=OTHER, prompt="someone else's castle")
    mine = [
        await ready_round(pool, requester=PERSON, prompt="my secret garden"),
        await ready_round(pool, requester=PERSON, prompt="my secret garden, at night"),
    ]
    waiting = await queued_round(pool, requester=PERSON, prompt="my third secret")
    theirs = await ready_round(pool, requester=OTHER, prompt="a lighthouse")
    # The generate jobs of the ready rounds, completed as the worker completes them.
    for round_id in [*mine, theirs]:
        [job] = await jobs.claim_matching(
            pool, "generate", {"round_id": round_id}, "w", timedelta(minutes=1), limit=1
        )
        images = [fake_image(round_id, p) for p in range(1, 5)]
        result = {
            "round_id": round_id,
            "plan": {"versions": [None] * 4, "candidates": []},
            "images": [{"position": i.position, "seed": i.seed, "sha256": i.sha256}
                       for i in images],
            "status": "ready",
        }  # fmt: skip
        assert await jobs.complete(pool, job, "w", result)
    await record_choice(pool, round_id=mine[0], discord_user_id=PERSON, verdict="pick", position=2)
    await record_choice(pool, round_id=mine[0], discord_user_id=VOTER, verdict="pick", position=2)
    await record_choice(pool, round_id=theirs, discord_user_id=PERSON, verdict="pick", position=3)
    await record_choice(pool, round_id=theirs, discord_user_id=OTHER, verdict="pick", position=1)
    await record_choice(pool, round_id=theirs, discord_user_id=VOTER, verdict="tie")
    upload, _ = await jobs.enqueue(
        pool, "score", {"prompt": "my secret upload", "image_keys": ["ab/cd/upload.png"]},
        requested_by=f"discord:{PERSON}",
    )  # fmt: skip
    [claimed] = await jobs.claim(pool, ["score"], "w", timedelta(minutes=1))
    await jobs.complete(pool, claimed, "w", {"scores": [21.25], "scale": "hps", "model": "m"})
    return {"mine": [*mine, waiting], "theirs": theirs, "score_job": upload.id}


async def test_after_forgetting_nothing_the_analyst_reads_joins_to_the_person(pool) -> None:  # type: ignore[no-untyped-def]
    example = await _person_and_neighbours(pool)
    mine: list[int] = example["mine"]  # type: ignore[assignment]
    # The fingerprints an attacker would join on, and an analyst's extract made before.
    times = {r["t"] for r in await pool.fetch(PERSON_TIMES_SQL, PERSON) if r["t"] is not None}
    hashes = {v for r in await pool.fetch(PERSON_HASHES_SQL, PERSON) for v in r.values()}
    assert len(hashes) == 16 and len(times) >= 12
    old_pseudonym = (await users.get_user(pool, PERSON)).pseudonym
    extract = await _as_analyst(
        pool, "SELECT pseudonym, first_seen_at, last_seen_at FROM users WHERE pseudonym = $1",
        old_pseudonym,
    )  # fmt: skip
    # The attack works before forgetting: the person's first round's job was made
    # in the transaction that first saw them.
    assert len(await _as_analyst(pool, f"{ATTACK} WHERE u.pseudonym = $1", old_pseudonym)) == 1

    result = await users.forget_user(pool, PERSON)
    assert (result.rounds_deleted, result.jobs_deleted) == (3, 4)

    # The query finds nothing, for any forgotten user.
    assert await _as_analyst(pool, f"{ATTACK} WHERE u.forgotten_at IS NOT NULL") == []
    # By id: the internal ids an old extract could hold are not readable at all.
    for sql in (
        "SELECT id FROM users",
        "SELECT user_id FROM choices",
        "SELECT user_id FROM choice_events",
        "SELECT requester_id FROM rounds",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await _as_analyst(pool, sql)
    seen = await _everything_the_analyst_reads(pool)
    # By round id: no row names one of the person's rounds (rows, jobs' results and keys).
    for (table, column), values in seen.items():
        if column in ("round_id", "id") and table in ("rounds", "images", "choices",
                                                      "choice_events", "choices_flat",
                                                      "ab_rounds", "ab_decisions"):  # fmt: skip
            if column == "id" and table != "rounds":
                continue
            assert not set(values) & set(mine), (table, column)
    job_text = " ".join(str(v) for v in seen[("jobs", "result")] + seen[("jobs", "dedupe_key")])
    for round_id in mine:
        assert f"generate:round:{round_id}" not in job_text
        assert f"'round_id': {round_id}," not in job_text
    # By hash, prompt or pseudonym: no readable text holds one.
    dump = " ".join(str(v) for values in seen.values() for v in values)
    leaked = [h for h in hashes if h in dump]
    assert not leaked
    for secret in ("my secret", old_pseudonym, "upload.png"):
        assert secret not in dump
    # By time: no readable time is one of the person's.
    for (table, column), values in seen.items():
        stamped = {v for v in values if isinstance(v, datetime)}
        assert not stamped & times, (table, column, sorted(stamped & times))
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
    # The user activity of the forgotten user: none.
    [forgotten] = await _as_analyst(pool, "SELECT * FROM user_activity WHERE forgotten")
    assert (forgotten["rounds_requested"], forgotten["choices"]) == (0, 0)
    assert forgotten["last_choice_at"] is None


async def test_others_data_stays(pool) -> None:  # type: ignore[no-untyped-def]
    example = await _person_and_neighbours(pool)
    await users.forget_user(pool, PERSON)
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
    assert await pool.fetchval("SELECT count(*) FROM rounds") == 2
