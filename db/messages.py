"""The bot's own Discord messages about rounds, and deleting those of forgotten users.

A round's main message is `rounds.message_id`; its other messages (the requester's chosen
image) are recorded in `round_messages`. The bot records a message it posted with
`record_message` / `record_round_message`, which queue it for deletion instead when its round
is gone (forgotten while the message was being posted), in the same statement: no message
about a round escapes forgetting by being posted at the wrong moment.

Forgetting a user (`db.users.forget_user`, from /forget-me or `hps users forget`) calls
`queue_round_messages` in its transaction: the messages of the rounds it deletes go to
`message_deletions` and `hps_messages` is NOTIFYed. The bot claims them (`claim_deletions`),
deletes them on Discord, then `deleted` removes the row; a failure Discord may get over
(a server error, a network failure) puts the row back with a backoff (`failed`), so rows
that keep failing never hold up the others, and after `MAX_ATTEMPTS` it is given up; one
Discord refuses for good (no access to the channel any more, an archived thread) is given up
at once (`gave_up`). Given-up rows stay, with the error, for a moderator to delete by hand
(`given_up`). A forget done while no bot runs is carried out when one starts, and each message
is deleted by one bot process.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from db.connect import Executor

MESSAGES_CHANNEL = "hps_messages"
FORGOTTEN = "forgotten"
# A claim not settled within this long (its bot died) may be taken again.
CLAIM_TIMEOUT = timedelta(minutes=5)
# A failed deletion waits 30 s, doubling up to an hour; after this many tries it is given
# up (about 9 hours of trying).
MAX_ATTEMPTS = 15
BACKOFF_FIRST = timedelta(seconds=30)
BACKOFF_MAX = timedelta(hours=1)


@dataclass(frozen=True)
class Deletion:
    id: int
    guild_id: int | None
    channel_id: int
    message_id: int
    attempts: int


# A message about a round that is gone (`$1`) is queued for deletion instead (reason `$5`).
# The round is locked (the UPDATE's row lock, or KEY SHARE as the foreign key would take)
# before the message is recorded, so a forget (which locks its rounds first) either comes
# after and queues the recorded message with the round's, or came before and the message
# is queued here.
RECORD_MAIN_SQL = """
WITH recorded AS (
    UPDATE rounds SET message_id = $4 WHERE id = $1 RETURNING id
), queued AS (
    INSERT INTO message_deletions (guild_id, channel_id, message_id, reason)
    SELECT $2, $3, $4, $5 WHERE NOT EXISTS (SELECT FROM recorded)
    ON CONFLICT (message_id) DO NOTHING
)
SELECT EXISTS (SELECT FROM recorded)
"""

RECORD_SQL = """
WITH live AS (
    SELECT id FROM rounds WHERE id = $1 FOR KEY SHARE
), recorded AS (
    INSERT INTO round_messages (message_id, round_id, channel_id, kind)
    SELECT $4, id, $3, $6 FROM live
    ON CONFLICT (message_id) DO NOTHING
), queued AS (
    INSERT INTO message_deletions (guild_id, channel_id, message_id, reason)
    SELECT $2, $3, $4, $5 WHERE NOT EXISTS (SELECT FROM live)
    ON CONFLICT (message_id) DO NOTHING
)
SELECT EXISTS (SELECT FROM live)
"""

NOTIFY_SQL = """
SELECT pg_notify($1, '')
"""


async def record_message(
    db: Executor, round_id: int, guild_id: int | None, channel_id: int, message_id: int
) -> bool:
    """Remember the Discord message that shows the round (`rounds.message_id`); False if
    the round is gone (forgotten meanwhile): the message is queued for deletion instead."""
    recorded = await db.fetchval(
        RECORD_MAIN_SQL, round_id, guild_id, channel_id, message_id, FORGOTTEN
    )
    if not recorded:
        await db.execute(NOTIFY_SQL, MESSAGES_CHANNEL)
    return recorded


async def record_round_message(
    db: Executor,
    round_id: int,
    guild_id: int | None,
    channel_id: int,
    message_id: int,
    kind: str,
) -> bool:
    """Remember a message the bot posted about a round (besides its main message); False
    if the round is gone (forgotten meanwhile): the message is queued for deletion instead."""
    recorded = await db.fetchval(
        RECORD_SQL, round_id, guild_id, channel_id, message_id, FORGOTTEN, kind
    )
    if not recorded:
        await db.execute(NOTIFY_SQL, MESSAGES_CHANNEL)
    return recorded


QUEUE_SQL = """
WITH found AS (
    SELECT r.guild_id, r.channel_id, r.message_id FROM rounds r
    WHERE r.id = ANY($1::bigint[]) AND r.channel_id IS NOT NULL AND r.message_id IS NOT NULL
    UNION ALL
    SELECT r.guild_id, m.channel_id, m.message_id
    FROM round_messages m JOIN rounds r ON r.id = m.round_id
    WHERE m.round_id = ANY($1::bigint[])
)
INSERT INTO message_deletions (guild_id, channel_id, message_id, reason)
SELECT guild_id, channel_id, message_id, $2 FROM found
ON CONFLICT (message_id) DO NOTHING
RETURNING id
"""


async def queue_round_messages(db: Executor, round_ids: list[int], reason: str) -> list[int]:
    """Queue the Discord messages of these rounds for the bot to delete (call it before the
    rounds are deleted, in the same transaction); returns the queued rows' ids."""
    queued = [r["id"] for r in await db.fetch(QUEUE_SQL, round_ids, reason)]
    if queued:
        await db.execute(NOTIFY_SQL, MESSAGES_CHANNEL)
    return queued


# Due rows, those that failed last; `$3` limits the claim to some rows (one forget's). A
# claim not settled within `CLAIM_TIMEOUT` (its bot died) may be taken again.
CLAIM_SQL = """
UPDATE message_deletions SET claimed_at = now(), attempts = attempts + 1
WHERE id IN (
    SELECT id FROM message_deletions
    WHERE gave_up_at IS NULL AND next_attempt_at <= now()
      AND (claimed_at IS NULL OR claimed_at < now() - $1::interval)
      AND ($3::bigint[] IS NULL OR id = ANY($3::bigint[]))
    ORDER BY next_attempt_at, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
RETURNING id, guild_id, channel_id, message_id, attempts
"""


async def claim_deletions(
    db: Executor, limit: int = 50, *, only: list[int] | None = None
) -> list[Deletion]:
    """Messages to delete that no other bot process is deleting: those due, the ones that
    failed before last (`only`: among these rows)."""
    records = await db.fetch(CLAIM_SQL, CLAIM_TIMEOUT, limit, only)
    return sorted((Deletion(**dict(r)) for r in records), key=lambda d: d.id)


DONE_SQL = """
DELETE FROM message_deletions WHERE id = $1
"""


async def deleted(db: Executor, deletion_id: int) -> None:
    """The message is gone (deleted now, or already)."""
    await db.execute(DONE_SQL, deletion_id)


FAILED_SQL = """
UPDATE message_deletions
SET claimed_at = NULL, error = $2,
    next_attempt_at = now() + least($3::interval * power(2, least(attempts - 1, 16)), $4::interval),
    gave_up_at = CASE WHEN attempts >= $5 THEN now() END
WHERE id = $1
RETURNING gave_up_at IS NOT NULL
"""


async def failed(db: Executor, deletion_id: int, error: str) -> bool:
    """Deleting failed for now: try again after a backoff, unless it was the last attempt
    (`MAX_ATTEMPTS`). Returns whether it was given up."""
    return bool(
        await db.fetchval(FAILED_SQL, deletion_id, error, BACKOFF_FIRST, BACKOFF_MAX, MAX_ATTEMPTS)
    )


RELEASE_SQL = """
UPDATE message_deletions SET claimed_at = NULL, attempts = attempts - 1
WHERE id = ANY($1::bigint[])
"""


async def release(db: Executor, deletion_ids: list[int]) -> None:
    """Hand back claimed deletions that were not tried: due again, in their place."""
    if deletion_ids:
        await db.execute(RELEASE_SQL, deletion_ids)


GAVE_UP_SQL = """
UPDATE message_deletions SET claimed_at = NULL, error = $2, gave_up_at = now() WHERE id = $1
"""


async def gave_up(db: Executor, deletion_id: int, error: str) -> None:
    """Discord refused for good (no access any more, an archived thread): never tried again;
    the row stays, with the error, for a moderator."""
    await db.execute(GAVE_UP_SQL, deletion_id, error)


@dataclass(frozen=True)
class Left:
    """What is left of some queued deletions."""

    pending: int  # to be tried (again)
    given_up: int  # for a moderator


LEFT_SQL = """
SELECT count(*) FILTER (WHERE gave_up_at IS NULL) AS pending,
       count(*) FILTER (WHERE gave_up_at IS NOT NULL) AS given_up
FROM message_deletions
WHERE $1::bigint[] IS NULL OR id = ANY($1::bigint[])
"""


async def left(db: Executor, ids: list[int] | None = None) -> Left:
    """Of these queued deletions (all, without `ids`), how many are left, and how many of
    those the bot gave up."""
    return Left(**dict(await db.fetchrow(LEFT_SQL, ids)))


@dataclass(frozen=True)
class GivenUp:
    guild_id: int | None
    channel_id: int
    message_id: int
    error: str | None
    gave_up_at: datetime


GIVEN_UP_SQL = """
SELECT guild_id, channel_id, message_id, error, gave_up_at FROM message_deletions
WHERE gave_up_at IS NOT NULL
ORDER BY gave_up_at, id
"""


async def given_up(db: Executor) -> list[GivenUp]:
    """The messages the bot could not delete, for a moderator to delete by hand."""
    return [GivenUp(**dict(r)) for r in await db.fetch(GIVEN_UP_SQL)]
