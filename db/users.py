"""Users: Discord accounts (and imported dataset users), bans, and forgetting.

Imported users (`source` import) are named `import:<the dataset's user hash>`, a namespace
Discord users' pseudonyms never enter, so no import can put picks on a Discord user, live or
forgotten. A pseudonym a forgotten user held is remembered only as its sha256
(`retired_pseudonyms`, filled by a trigger), and an import leaves out records under it.

Forgetting a user (our documented choice: deletion, not pseudonymisation), in one transaction:
- every choice and choice event the user made is deleted;
- every round the user requested is deleted with its images' rows and the votes others cast
  on it (the prompt text is the user's content); prompts no other round uses are deleted;
  queued generate jobs of those rounds are cancelled; the bot's Discord messages of those
  rounds (they show the images and mention the user) are queued for the bot to delete
  (`db.messages`);
- their Discord id is scrubbed from jobs they asked for (and a /score prompt with it) and
  from the actor of bans and model events they made;
- the user row stays as a tombstone (so user counts stay right) with a fresh pseudonym,
  `forgotten_at` set and the Discord id removed, except for a banned or shadow-banned user,
  whose Discord id is kept so that forgetting cannot be used to shed a ban.
The image files that no remaining row references are returned for the caller to delete from
the image store after the commit, with `images.delete_unreferenced` (a crash in between leaves
only unreferenced files).

Locks are taken in the order a click takes them (the round, then the user): the user's rounds
first, then the user's row, so a click on one of their rounds during a forget waits for it
instead of deadlocking with it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from db import images, messages
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
    user_id: int
    choices_deleted: int
    events_deleted: int
    rounds_deleted: int
    orphaned_image_keys: list[str]
    messages_queued: int = 0  # the bot's Discord messages of those rounds, to be deleted


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

CANCEL_ROUND_JOBS_SQL = """
UPDATE jobs SET state = 'cancelled', finished_at = now()
WHERE kind = 'generate' AND state = 'queued'
  AND (payload->>'round_id')::bigint = ANY($1::bigint[])
"""

DELETE_ROUNDS_SQL = """
DELETE FROM rounds WHERE id = ANY($1::bigint[])
"""

DELETE_ORPHAN_PROMPTS_SQL = """
DELETE FROM prompts p
WHERE p.id = ANY($1::bigint[]) AND NOT EXISTS (SELECT FROM rounds r WHERE r.prompt_id = p.id)
"""

# Who asked for a job or acted on a model or a ban is recorded as `discord:<id>`: scrub it
# (and a /score prompt kept in a job's payload).
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

TOMBSTONE_SQL = """
UPDATE users
SET discord_id = CASE WHEN banned OR shadow_banned THEN discord_id END,
    pseudonym = replace(gen_random_uuid()::text, '-', ''),
    forgotten_at = now()
WHERE id = $1
"""


async def forget_user(db: Executor, discord_id: int) -> ForgetResult | None:
    """Delete the user's data as described in the module docstring; None if unknown."""
    async with transaction(db) as conn:
        await conn.execute(LOCK_ROUNDS_SQL, discord_id)
        user_id = await conn.fetchval(LOCK_USER_SQL, discord_id)
        if user_id is None:
            return None
        events = _count(await conn.execute(FORGET_EVENTS_SQL, user_id))
        choices = _count(await conn.execute(FORGET_CHOICES_SQL, user_id))
        rounds = await conn.fetch(REQUESTED_ROUNDS_SQL, user_id)
        round_ids = [r["id"] for r in rounds]
        keys = [k for r in rounds for k in r["keys"]]
        await conn.execute(CANCEL_ROUND_JOBS_SQL, round_ids)
        queued = await messages.queue_round_messages(conn, round_ids, messages.FORGOTTEN)
        await conn.execute(DELETE_ROUNDS_SQL, round_ids)
        await conn.execute(DELETE_ORPHAN_PROMPTS_SQL, list({r["prompt_id"] for r in rounds}))
        await conn.execute(SCRUB_JOBS_SQL, discord_id)
        await conn.execute(SCRUB_ACTORS_SQL, discord_id)
        orphaned = await images.unreferenced_keys(conn, keys)
        await conn.execute(TOMBSTONE_SQL, user_id)
        return ForgetResult(user_id, choices, events, len(round_ids), orphaned, queued)


def _count(status: str) -> int:
    """The row count of an asyncpg command status such as `DELETE 3`."""
    return int(status.rsplit(" ", 1)[-1])


BANNED_SQL = """
SELECT * FROM users WHERE banned OR shadow_banned ORDER BY banned_at DESC NULLS LAST, id
"""


async def banned_users(db: Executor) -> list[User]:
    """Every banned or shadow-banned user, the latest ban first."""
    return [User(**dict(r)) for r in await db.fetch(BANNED_SQL)]
