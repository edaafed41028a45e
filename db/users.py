"""Users: Discord accounts (and imported dataset users), bans, and forgetting.

Imported users (`source` import) are named `import:<the dataset's user hash>`, a namespace
Discord users' pseudonyms never enter, so no import can put picks on a Discord user, live or
forgotten. A pseudonym a forgotten user held is remembered only as its sha256
(`retired_pseudonyms`, filled by a trigger), and an import leaves out records under it.

Forgetting a user (our documented choice: deletion, not pseudonymisation), in one transaction:
- every choice and choice event the user made is deleted;
- every round the user requested is deleted with its images' rows and the votes others cast
  on it (the prompt text is the user's content); prompts no other round uses are deleted;
- the jobs that describe the person are deleted, whatever their state: the generate jobs of
  those rounds (their result held the round id, the A/B plan, the seeds and the images'
  hashes, their dedupe key the round id, their times the round's) and every job they asked
  for (a /score of their upload), except training runs, which are the platform's history:
  those, like the bans and model events they acted on, keep no trace of who asked;
- the bot's Discord messages of those rounds (they show the images and mention the user)
  are queued for the bot to delete (`db.messages`);
- the user row stays as a tombstone (so user counts stay right) that links to nothing: a
  fresh pseudonym, no Discord id, no ban, and every time on it (first and last seen,
  forgotten) set to the UTC midnight of the day of forgetting, so that no time joins it to
  anything the person did. A banned or shadow-banned user's ban is not shed: it moves to a
  fresh row with the Discord id (a new pseudonym, first seen and banned now), so their
  later clicks are that row's activity, flagged as a shadow-banned user's are, never the
  tombstone's.
The image files that no remaining row references are deleted after the commit (with
`delete`, e.g. `ImageStore.delete`), under exclusive locks on their keys that the forget
takes before it deletes anything and holds across its commit: no writer can name one of
them in between. If the keys (or the user's rounds) stay locked for `FORGET_LOCK_TIMEOUT`,
the forget stops with `db.locks.LockTimeout` and nothing is deleted, rows or files.

Locks are taken in the order a click takes them (the round, then the user): the user's rounds
first, then the user's row, so a click on one of their rounds during a forget waits for it
instead of deadlocking with it.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

import asyncpg

from db import images, locks, messages
from db.connect import Executor, transaction


@dataclass(frozen=True)
class User:
    id: int
    discord_id: int | None
    pseudonym: str
    source: str
    first_seen_at: datetime
    last_seen_at: datetime
    banned: bool
    shadow_banned: bool
    ban_reason: str | None
    banned_at: datetime | None
    banned_by: str | None
    forgotten_at: datetime | None


ENSURE_DISCORD_USER_SQL = """
INSERT INTO users (discord_id) VALUES ($1)
ON CONFLICT (discord_id) DO UPDATE SET last_seen_at = now()
RETURNING *
"""


async def ensure_user(db: Executor, discord_id: int) -> User:
    """The user with this Discord id, created on first sight. Inside a transaction the row
    stays locked until commit, which serialises one user's concurrent actions."""
    return User(**dict(await db.fetchrow(ENSURE_DISCORD_USER_SQL, discord_id)))


GET_BY_DISCORD_ID_SQL = """
SELECT * FROM users WHERE discord_id = $1
"""


async def get_user(db: Executor, discord_id: int) -> User | None:
    record = await db.fetchrow(GET_BY_DISCORD_ID_SQL, discord_id)
    return User(**dict(record)) if record else None


# Imported users' pseudonyms are this prefix + the dataset's user hash: a namespace of their
# own (a CHECK constraint keeps it to them), so that an import never meets a Discord user's
# pseudonym, live or forgotten, whatever hash a dataset holds.
IMPORTED_PREFIX = "import:"

# Nothing is created for a retired hash (see `retired_hashes`).
ENSURE_IMPORTED_USER_SQL = f"""
INSERT INTO users (pseudonym, source)
SELECT '{IMPORTED_PREFIX}' || $1, 'import'
WHERE NOT EXISTS (
    SELECT FROM retired_pseudonyms
    WHERE sha256 = encode(sha256(convert_to($1, 'UTF8')), 'hex')
)
ON CONFLICT (pseudonym) DO UPDATE SET last_seen_at = users.last_seen_at
RETURNING *
"""


async def ensure_imported_user(db: Executor, user_hash: str) -> User | None:
    """The imported user of a dataset's pseudonymous user id (e.g. HPD's `user_hash`): the
    user `import:<user_hash>`, created on first sight; never a Discord user. None if the
    hash is a pseudonym a forgotten user held (`retired_hashes`): their records stay out."""
    record = await db.fetchrow(ENSURE_IMPORTED_USER_SQL, user_hash)
    return User(**dict(record)) if record else None


def imported_hash(pseudonym: str) -> str | None:
    """The dataset's user hash of an imported user's pseudonym (None for a Discord user's)."""
    if not pseudonym.startswith(IMPORTED_PREFIX):
        return None
    return pseudonym.removeprefix(IMPORTED_PREFIX)


RETIRED_HASHES_SQL = """
SELECT sha256 FROM retired_pseudonyms WHERE sha256 = ANY($1::text[])
"""


async def retired_hashes(db: Executor, user_hashes: Iterable[str]) -> set[str]:
    """Which of these user hashes are pseudonyms that forgotten users held: a trigger
    (migration 0010) records the sha256 of every pseudonym a Discord user stops holding, so
    an export made before someone was forgotten, imported again, leaves their records out.
    (Users forgotten before migration 0010 left no record.)"""
    digests = {_sha256(h): h for h in user_hashes}
    return {digests[r["sha256"]] for r in await db.fetch(RETIRED_HASHES_SQL, list(digests))}


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


SET_BAN_SQL = """
INSERT INTO users (discord_id, banned, shadow_banned, ban_reason, banned_at, banned_by)
VALUES ($1, NOT $2, $2, $3, now(), $4)
ON CONFLICT (discord_id) DO UPDATE
SET banned = NOT $2, shadow_banned = $2, ban_reason = $3, banned_at = now(), banned_by = $4
RETURNING *
"""


async def ban(
    db: Executor, discord_id: int, *, shadow: bool = False, reason: str | None, actor: str
) -> User:
    """Ban a user (created if never seen). A shadow-banned user's actions look normal to
    them but their choices are stored flagged and left out of training and exports."""
    return User(**dict(await db.fetchrow(SET_BAN_SQL, discord_id, shadow, reason, actor)))


UNBAN_SQL = """
UPDATE users
SET banned = false, shadow_banned = false, ban_reason = NULL, banned_at = NULL, banned_by = NULL
WHERE discord_id = $1
RETURNING *
"""


async def unban(db: Executor, discord_id: int) -> User | None:
    """Lift any ban; None if the user is unknown. Past flagged choices stay flagged."""
    record = await db.fetchrow(UNBAN_SQL, discord_id)
    return User(**dict(record)) if record else None


@dataclass(frozen=True)
class ForgetResult:
    user_id: int  # the tombstone's
    choices_deleted: int
    events_deleted: int
    rounds_deleted: int
    jobs_deleted: int
    orphaned_image_keys: list[str]  # the files no row references any more
    files_deleted: int  # of those, deleted from the store (0 without `delete`)
    messages_queued: int = 0  # the bot's Discord messages of those rounds, to be deleted


FORGET_LOCK_TIMEOUT = timedelta(seconds=10)

# Jobs a forgotten person asked for that stay (scrubbed of who asked): training runs, the
# platform's history. `db.jobs.TRAINING_KINDS`, named here since db.jobs already imports
# (through db.rounds) this module; a test keeps the two equal.
KEPT_JOB_KINDS = ("adapt_sd", "train_classifier")

LOCK_USER_SQL = """
SELECT id FROM users WHERE discord_id = $1 FOR UPDATE
"""

FORGET_EVENTS_SQL = """
DELETE FROM choice_events WHERE user_id = $1
"""

FORGET_CHOICES_SQL = """
DELETE FROM choices WHERE user_id = $1
"""

REQUESTED_ROUNDS_SQL = """
SELECT r.id, r.prompt_id,
       coalesce(array_agg(i.storage_key) FILTER (WHERE i.id IS NOT NULL), '{}') AS keys
FROM rounds r LEFT JOIN images i ON i.round_id = r.id
WHERE r.requester_id = $1
GROUP BY r.id
"""

LOCK_ROUNDS_SQL = """
SELECT r.id FROM rounds r JOIN users u ON u.id = r.requester_id
WHERE u.discord_id = $1
ORDER BY r.id
FOR UPDATE OF r
"""

# The generate jobs of the rounds (round ids compared as text: a malformed payload must not
# stop a forget), and the jobs the person asked for, except training runs ($3).
PERSONS_JOBS_WHERE = """
    (kind = 'generate' AND payload->>'round_id' = ANY($1::bigint[]::text[]))
    OR (requested_by = 'discord:' || $2::bigint AND kind <> ALL($3::text[]))
"""

PERSONS_JOB_KEYS_SQL = f"""
SELECT coalesce(array_agg(DISTINCT k), '{{}}') FROM jobs
CROSS JOIN LATERAL jsonb_array_elements_text(
    CASE WHEN jsonb_typeof(payload->'image_keys') = 'array' THEN payload->'image_keys'
         ELSE '[]'::jsonb END) AS k
WHERE {PERSONS_JOBS_WHERE}
"""

DELETE_PERSONS_JOBS_SQL = f"""
DELETE FROM jobs WHERE {PERSONS_JOBS_WHERE}
"""

DELETE_ROUNDS_SQL = """
DELETE FROM rounds WHERE id = ANY($1::bigint[])
"""

DELETE_ORPHAN_PROMPTS_SQL = """
DELETE FROM prompts p
WHERE p.id = ANY($1::bigint[]) AND NOT EXISTS (SELECT FROM rounds r WHERE r.prompt_id = p.id)
"""

# Who asked for a job or acted on a model or a ban is recorded as `discord:<id>`: scrub it
# from what stays (training runs; a /score prompt, should one remain, goes too).
SCRUB_JOBS_SQL = """
UPDATE jobs SET requested_by = NULL, payload = payload - 'prompt' - 'requested_by'
WHERE requested_by = 'discord:' || $1::bigint OR payload->>'requested_by' = 'discord:' || $1::bigint
"""

SCRUB_ACTORS_SQL = """
WITH bans AS (
    UPDATE users SET banned_by = 'a forgotten user' WHERE banned_by = 'discord:' || $1::bigint
)
UPDATE model_events SET actor = 'a forgotten user' WHERE actor = 'discord:' || $1::bigint
"""

BAN_OF_SQL = """
SELECT discord_id, banned, shadow_banned, ban_reason, banned_by FROM users
WHERE id = $1 AND (banned OR shadow_banned)
"""

TOMBSTONE_SQL = """
UPDATE users
SET discord_id = NULL,
    pseudonym = replace(gen_random_uuid()::text, '-', ''),
    first_seen_at = date_trunc('day', now(), 'UTC'),
    last_seen_at = date_trunc('day', now(), 'UTC'),
    forgotten_at = date_trunc('day', now(), 'UTC'),
    banned = false, shadow_banned = false, ban_reason = NULL, banned_at = NULL, banned_by = NULL
WHERE id = $1
"""

CARRY_BAN_SQL = """
INSERT INTO users (discord_id, banned, shadow_banned, ban_reason, banned_at, banned_by)
VALUES ($1, $2, $3, $4, now(), $5)
"""


async def forget_user(
    db: Executor,
    discord_id: int,
    *,
    delete: Callable[[str], bool] | None = None,
    lock_timeout: timedelta = FORGET_LOCK_TIMEOUT,
) -> ForgetResult | None:
    """Delete the user's data as described in the module docstring; None if unknown. With
    `delete` (the image store's), the files no row references any more are deleted too
    (then call it outside a transaction: the files go once the forget has committed);
    without, their keys are returned for `images.delete_unreferenced`."""
    async with _session(db) as conn:
        keys: list[str] = []
        try:
            result = await _forget(
                conn, discord_id, keys, lock_files=delete is not None, lock_timeout=lock_timeout
            )
            if result is None or delete is None:
                return result
            deleted = 0
            for key in result.orphaned_image_keys:  # still locked: nobody names them now
                deleted += await asyncio.to_thread(delete, key)
            return replace(result, files_deleted=deleted)
        except asyncpg.LockNotAvailableError:
            if keys:
                raise await images.key_lock_timed_out(conn, keys, lock_timeout) from None
            raise locks.timed_out("the user's rounds", lock_timeout, []) from None
        finally:
            if delete is not None:
                await conn.execute(images.UNLOCK_ALL_SQL)


async def _forget(
    conn: asyncpg.Connection,
    discord_id: int,
    keys: list[str],
    *,
    lock_files: bool,
    lock_timeout: timedelta,
) -> ForgetResult | None:
    """The forget's transaction; `keys` gets the image keys it locks (for the error)."""
    async with transaction(conn), locks.waiting_at_most(conn, lock_timeout):
        await conn.execute(LOCK_ROUNDS_SQL, discord_id)
        user_id = await conn.fetchval(LOCK_USER_SQL, discord_id)
        if user_id is None:
            return None
        rounds = await conn.fetch(REQUESTED_ROUNDS_SQL, user_id)
        round_ids = [r["id"] for r in rounds]
        kept = list(KEPT_JOB_KINDS)
        job_keys = await conn.fetchval(PERSONS_JOB_KEYS_SQL, round_ids, discord_id, kept)
        keys.extend(sorted({k for r in rounds for k in r["keys"]} | set(job_keys)))
        if lock_files:
            await conn.execute(images.LOCK_KEYS_FOR_SESSION_SQL, keys)
        events = _count(await conn.execute(FORGET_EVENTS_SQL, user_id))
        choices = _count(await conn.execute(FORGET_CHOICES_SQL, user_id))
        removed_jobs = _count(
            await conn.execute(DELETE_PERSONS_JOBS_SQL, round_ids, discord_id, kept)
        )
        queued = await messages.queue_round_messages(conn, round_ids, messages.FORGOTTEN)
        await conn.execute(DELETE_ROUNDS_SQL, round_ids)
        await conn.execute(DELETE_ORPHAN_PROMPTS_SQL, list({r["prompt_id"] for r in rounds}))
        await conn.execute(SCRUB_JOBS_SQL, discord_id)
        await conn.execute(SCRUB_ACTORS_SQL, discord_id)
        orphaned = await images.unreferenced_keys(conn, keys)
        ban = await conn.fetchrow(BAN_OF_SQL, user_id)
        await conn.execute(TOMBSTONE_SQL, user_id)
        if ban is not None:
            await conn.execute(CARRY_BAN_SQL, *ban.values())
        return ForgetResult(
            user_id, choices, events, len(round_ids), removed_jobs, orphaned, 0, queued
        )


@asynccontextmanager
async def _session(db: Executor) -> AsyncIterator[asyncpg.Connection]:
    """One connection for the whole forget (its session locks outlive the transaction)."""
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn:
            yield conn
    else:
        yield db


def _count(status: str) -> int:
    """The row count of an asyncpg command status such as `DELETE 3`."""
    return int(status.rsplit(" ", 1)[-1])


BANNED_SQL = """
SELECT * FROM users WHERE banned OR shadow_banned ORDER BY banned_at DESC NULLS LAST, id
"""


async def banned_users(db: Executor) -> list[User]:
    """Every banned or shadow-banned user, the latest ban first."""
    return [User(**dict(r)) for r in await db.fetch(BANNED_SQL)]
