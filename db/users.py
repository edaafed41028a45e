"""Users: Discord accounts (and imported dataset users), bans, and forgetting.

Imported users (`source` import) are named `import:<the dataset's user hash>`, a namespace
Discord users' pseudonyms never enter, so no import can put picks on a Discord user, live or
forgotten. A pseudonym a forgotten user held is remembered only as its sha256
(`retired_pseudonyms`, filled by a trigger), and an import leaves out records under it.

Forgetting a user (our documented choice: deletion, not pseudonymisation), in one transaction:
- every choice and choice event the user made is deleted;
- every round the user requested is deleted with its images' rows and the votes others cast
  on it (the prompt text is the user's content); prompts no other round uses are deleted,
  and those others still use take the time of the earliest round left;
- their imported copy goes the same way: an HPD export of their rounds imported back into
  this database made them the user `import:<their pseudonym>`, whose rounds, choices and row
  are deleted too (an import after the forget leaves them out: `retired_hashes`);
- the jobs that describe the person are deleted, whatever their state: the generate jobs of
  those rounds (their result held the round id, the A/B plan, the seeds and the images'
  hashes, their dedupe key the round id, their times the round's) and every job they asked
  for (a /score of their upload), except training runs, which are the platform's history:
  those, like the bans and model events (and their notices) they acted on, keep no trace of
  who asked;
- the bot's Discord messages of those rounds (they show the images and mention the user)
  are queued for the bot to delete (`db.messages`);
- the image files no remaining row references are recorded in `image_deletions`, to be
  deleted once the forget has committed (`images.delete_pending`, under their keys' locks,
  each checked unreferenced again); one whose deletion fails stays recorded and the bot
  tries it again, so that a store outage cannot leave a forgotten person's image behind;
- the user row stays as a tombstone (so user counts stay right) that links to nothing: a
  fresh pseudonym, no Discord id, no ban, and every time on it (first and last seen,
  forgotten) set to the UTC midnight of the day of forgetting, so that no time joins it to
  anything the person did. A banned or shadow-banned user's ban is not shed: it moves to a
  fresh row with the Discord id (a new pseudonym; first seen, last seen and banned at that
  same midnight), so their later clicks are that row's activity, flagged as a shadow-banned
  user's are, never the tombstone's.
If the rows to delete (the user's rounds, their row, their choices and jobs) stay locked for
`FORGET_LOCK_TIMEOUT`, the forget stops with `db.locks.LockTimeout` naming which, and
nothing is deleted. The forget takes no lock on image keys and no session-level lock.

Locks are taken in the order a click takes them (the round, then the user): the user's rounds
first, then the user's row, so a click on one of their rounds during a forget waits for it
instead of deadlocking with it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
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
    files_deleted: int = 0  # of those, deleted from the store (0 without `delete`)
    files_pending: int = 0  # of those, recorded and still to be deleted (`image_deletions`)
    message_deletions: tuple[int, ...] = ()  # the queued deletions of the bot's messages
    imported_rounds_deleted: int = 0  # rounds of their imported copy (`import:<pseudonym>`)

    @property
    def messages_queued(self) -> int:
        """The bot's Discord messages of those rounds, queued to be deleted."""
        return len(self.message_deletions)


FORGET_LOCK_TIMEOUT = timedelta(seconds=10)

# Jobs a forgotten person asked for that stay (scrubbed of who asked): training runs, the
# platform's history. `db.jobs.TRAINING_KINDS`, named here since db.jobs already imports
# (through db.rounds) this module; a test keeps the two equal.
KEPT_JOB_KINDS = ("adapt_sd", "train_classifier")

# The rounds of the person and of their imported copy (`import:<their pseudonym>`: an HPD
# export of their rounds imported back into this database).
LOCK_ROUNDS_SQL = f"""
SELECT r.id FROM rounds r JOIN users u ON u.id = r.requester_id
WHERE u.discord_id = $1
   OR u.pseudonym = '{IMPORTED_PREFIX}' || (SELECT pseudonym FROM users WHERE discord_id = $1)
ORDER BY r.id
FOR UPDATE OF r
"""

LOCK_USER_SQL = """
SELECT id, pseudonym FROM users WHERE discord_id = $1 FOR UPDATE
"""

LOCK_IMPORTED_COPY_SQL = f"""
SELECT id FROM users WHERE pseudonym = '{IMPORTED_PREFIX}' || $1 FOR UPDATE
"""

FORGET_EVENTS_SQL = """
DELETE FROM choice_events WHERE user_id = $1
"""

FORGET_CHOICES_SQL = """
DELETE FROM choices WHERE user_id = $1
"""

REQUESTED_ROUNDS_SQL = """
SELECT r.id, r.prompt_id, r.requester_id,
       coalesce(array_agg(i.storage_key) FILTER (WHERE i.id IS NOT NULL), '{}') AS keys
FROM rounds r LEFT JOIN images i ON i.round_id = r.id
WHERE r.requester_id = ANY($1::bigint[])
GROUP BY r.id
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

# A prompt kept because others use it keeps no time of the person's: its creation becomes
# that of the earliest round left (readable in full by analysts, it would otherwise still
# say when the person first asked for it).
REDATE_KEPT_PROMPTS_SQL = """
UPDATE prompts p SET created_at = first.created_at
FROM (SELECT r.prompt_id, min(r.created_at) AS created_at FROM rounds r
      WHERE r.prompt_id = ANY($1::bigint[]) GROUP BY r.prompt_id) AS first
WHERE p.id = first.prompt_id AND p.created_at IS DISTINCT FROM first.created_at
"""

DELETE_IMPORTED_COPY_SQL = """
DELETE FROM users WHERE id = $1
"""

# Who asked for a job or acted on a model or a ban is recorded as `discord:<id>`: scrub it
# from what stays (training runs; a /score prompt, should one remain, goes too).
SCRUB_JOBS_SQL = """
UPDATE jobs SET requested_by = NULL, payload = payload - 'prompt' - 'requested_by'
WHERE requested_by = 'discord:' || $1::bigint OR payload->>'requested_by' = 'discord:' || $1::bigint
"""

# A model event's notice (the announcement the bot posts) names the actor too.
SCRUB_ACTORS_SQL = """
WITH bans AS (
    UPDATE users SET banned_by = 'a forgotten user' WHERE banned_by = 'discord:' || $1::bigint
)
UPDATE model_events
SET actor = CASE WHEN actor = 'discord:' || $1::bigint THEN 'a forgotten user' ELSE actor END,
    notice = CASE WHEN notice->>'actor' = 'discord:' || $1::bigint
                  THEN jsonb_set(notice, '{actor}', '"a forgotten user"') ELSE notice END
WHERE actor = 'discord:' || $1::bigint OR notice->>'actor' = 'discord:' || $1::bigint
"""

BAN_OF_SQL = """
SELECT discord_id, banned, shadow_banned, ban_reason, banned_by FROM users
WHERE id = $1 AND (banned OR shadow_banned)
"""

# Every time on the tombstone is the UTC midnight of the day: no time joins it to anything.
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

# The carried ban's row has the tombstone's times (first and last seen, banned: analysts read
# them all): nothing in it says when in the day the person was forgotten.
CARRY_BAN_SQL = """
INSERT INTO users (discord_id, banned, shadow_banned, ban_reason, banned_by,
                   banned_at, first_seen_at, last_seen_at)
VALUES ($1, $2, $3, $4, $5, date_trunc('day', now(), 'UTC'), date_trunc('day', now(), 'UTC'),
        date_trunc('day', now(), 'UTC'))
"""


async def forget_user(
    db: Executor,
    discord_id: int,
    *,
    delete: Callable[[str], bool] | None = None,
    lock_timeout: timedelta = FORGET_LOCK_TIMEOUT,
) -> ForgetResult | None:
    """Delete the user's data as described in the module docstring; None if unknown. The
    image files no row references any more are recorded (`image_deletions`) in the same
    transaction; with `delete` (the image store's), they are deleted right after the commit
    (`images.delete_pending`: call it outside a transaction), and those that could not be
    are counted in `files_pending`; without, the caller (or the bot's retry loop) deletes
    them with `images.delete_pending`. `locks.LockTimeout` (nothing deleted) if the rows to
    delete stay locked for `lock_timeout`."""
    if delete is not None and isinstance(db, asyncpg.Connection) and db.is_in_transaction():
        raise ValueError("forget_user(delete=...) deletes files after its commit: no transaction")
    waiting_for = ["the user's rounds"]
    try:
        result = await _forget(db, discord_id, waiting_for, lock_timeout)
    except asyncpg.LockNotAvailableError:
        raise locks.row_lock_timed_out(waiting_for[-1], lock_timeout) from None
    if result is None:
        return None
    keys = result.orphaned_image_keys
    if delete is None or not keys:
        return replace(result, files_pending=len(keys))
    sweep = await images.delete_pending(db, delete, keys=keys)
    pending = await images.pending_deletions(db, keys)
    return replace(result, files_deleted=sweep.deleted, files_pending=pending)


async def _forget(
    db: Executor, discord_id: int, waiting_for: list[str], lock_timeout: timedelta
) -> ForgetResult | None:
    """The forget's transaction; `waiting_for` ends with what it is locking now (a lock
    timeout names it)."""
    async with transaction(db) as conn, locks.waiting_at_most(conn, lock_timeout):
        await conn.execute(LOCK_ROUNDS_SQL, discord_id)
        waiting_for.append("the user's row")
        user = await conn.fetchrow(LOCK_USER_SQL, discord_id)
        if user is None:
            return None
        user_id = user["id"]
        copy_id = await conn.fetchval(LOCK_IMPORTED_COPY_SQL, user["pseudonym"])
        waiting_for.append("the rows to delete (choices, clicks and jobs)")
        people = [user_id] if copy_id is None else [user_id, copy_id]
        rounds = await conn.fetch(REQUESTED_ROUNDS_SQL, people)
        round_ids = [r["id"] for r in rounds]
        own = sum(r["requester_id"] == user_id for r in rounds)
        kept = list(KEPT_JOB_KINDS)
        job_keys = await conn.fetchval(PERSONS_JOB_KEYS_SQL, round_ids, discord_id, kept)
        keys = sorted({k for r in rounds for k in r["keys"]} | set(job_keys))
        events = _count(await conn.execute(FORGET_EVENTS_SQL, user_id))
        choices = _count(await conn.execute(FORGET_CHOICES_SQL, user_id))
        if copy_id is not None:
            await conn.execute(FORGET_EVENTS_SQL, copy_id)
            await conn.execute(FORGET_CHOICES_SQL, copy_id)
        removed_jobs = _count(
            await conn.execute(DELETE_PERSONS_JOBS_SQL, round_ids, discord_id, kept)
        )
        queued = await messages.queue_round_messages(conn, round_ids, messages.FORGOTTEN)
        await conn.execute(DELETE_ROUNDS_SQL, round_ids)
        prompt_ids = list({r["prompt_id"] for r in rounds})
        await conn.execute(DELETE_ORPHAN_PROMPTS_SQL, prompt_ids)
        await conn.execute(REDATE_KEPT_PROMPTS_SQL, prompt_ids)
        if copy_id is not None:
            await conn.execute(DELETE_IMPORTED_COPY_SQL, copy_id)
        await conn.execute(SCRUB_JOBS_SQL, discord_id)
        await conn.execute(SCRUB_ACTORS_SQL, discord_id)
        # Unreferenced now, in this transaction: recorded here, so that the files go even
        # if deleting them after the commit fails (`delete_pending` checks them again).
        orphaned = await images.unreferenced_keys(conn, keys)
        await images.queue_deletions(conn, orphaned)
        ban = await conn.fetchrow(BAN_OF_SQL, user_id)
        await conn.execute(TOMBSTONE_SQL, user_id)
        if ban is not None:
            await conn.execute(CARRY_BAN_SQL, *ban.values())
        return ForgetResult(
            user_id,
            choices,
            events,
            own,
            removed_jobs,
            orphaned,
            message_deletions=tuple(queued),
            imported_rounds_deleted=len(round_ids) - own,
        )


def _count(status: str) -> int:
    """The row count of an asyncpg command status such as `DELETE 3`."""
    return int(status.rsplit(" ", 1)[-1])


BANNED_SQL = """
SELECT * FROM users WHERE banned OR shadow_banned ORDER BY banned_at DESC NULLS LAST, id
"""


async def banned_users(db: Executor) -> list[User]:
    """Every banned or shadow-banned user, the latest ban first."""
    return [User(**dict(r)) for r in await db.fetch(BANNED_SQL)]
