"""The bot's own Discord messages about rounds, and deleting those of forgotten users.

A round's main message is `rounds.message_id`; its other messages (the requester's chosen
image) are recorded in `round_messages`. Forgetting a user (`db.users.forget_user`, from
/forget-me or `hps users forget`) calls `queue_round_messages` in its transaction: the
messages of the rounds it deletes go to `message_deletions` and `hps_messages` is NOTIFYed.
The bot claims them (`claim_deletions`), deletes them on Discord, then `deleted` removes the
row, or `failed` puts it back with the error; so a forget done while no bot runs is carried
out when one starts, and each message is deleted by one bot process.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from db.connect import Executor

MESSAGES_CHANNEL = "hps_messages"
FORGOTTEN = "forgotten"
# A claim not settled within this long (its bot died) may be taken again.
CLAIM_TIMEOUT = timedelta(minutes=5)


@dataclass(frozen=True)
class Deletion:
    id: int
    guild_id: int | None
    channel_id: int
    message_id: int
    attempts: int


RECORD_SQL = """
INSERT INTO round_messages (message_id, round_id, channel_id, kind)
VALUES ($1, $2, $3, $4)
ON CONFLICT (message_id) DO NOTHING
"""


async def record_round_message(
    db: Executor, round_id: int, channel_id: int, message_id: int, kind: str
) -> None:
    """Remember a message the bot posted about a round (besides its main message)."""
    await db.execute(RECORD_SQL, message_id, round_id, channel_id, kind)


QUEUE_SQL = """
WITH found AS (
    SELECT r.guild_id, r.channel_id, r.message_id FROM rounds r
    WHERE r.id = ANY($1::bigint[]) AND r.channel_id IS NOT NULL AND r.message_id IS NOT NULL
    UNION ALL
    SELECT r.guild_id, m.channel_id, m.message_id
    FROM round_messages m JOIN rounds r ON r.id = m.round_id
    WHERE m.round_id = ANY($1::bigint[])
), queued AS (
    INSERT INTO message_deletions (guild_id, channel_id, message_id, reason)
    SELECT guild_id, channel_id, message_id, $2 FROM found
    ON CONFLICT (message_id) DO NOTHING
    RETURNING 1
)
SELECT count(*) FROM queued
"""

NOTIFY_SQL = """
SELECT pg_notify($1, '')
"""


async def queue_round_messages(db: Executor, round_ids: list[int], reason: str) -> int:
    """Queue the Discord messages of these rounds for the bot to delete (call it before the
    rounds are deleted, in the same transaction); returns how many."""
    queued = await db.fetchval(QUEUE_SQL, round_ids, reason)
    if queued:
        await db.execute(NOTIFY_SQL, MESSAGES_CHANNEL)
    return queued


CLAIM_SQL = """
UPDATE message_deletions SET claimed_at = now(), attempts = attempts + 1
WHERE id IN (
    SELECT id FROM message_deletions
    WHERE claimed_at IS NULL OR claimed_at < now() - $1::interval
    ORDER BY id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
RETURNING id, guild_id, channel_id, message_id, attempts
"""


async def claim_deletions(db: Executor, limit: int = 50) -> list[Deletion]:
    """Messages to delete that no other bot process is deleting, oldest first."""
    return [Deletion(**dict(r)) for r in await db.fetch(CLAIM_SQL, CLAIM_TIMEOUT, limit)]


DONE_SQL = """
DELETE FROM message_deletions WHERE id = $1
"""


async def deleted(db: Executor, deletion_id: int) -> None:
    """The message is gone (deleted now, or already)."""
    await db.execute(DONE_SQL, deletion_id)


FAILED_SQL = """
UPDATE message_deletions SET claimed_at = NULL, error = $2 WHERE id = $1
"""


async def failed(db: Executor, deletion_id: int, error: str) -> None:
    """Deleting failed: try again at the next claim."""
    await db.execute(FAILED_SQL, deletion_id, error)


PENDING_SQL = """
SELECT count(*) FROM message_deletions
"""


async def pending(db: Executor) -> int:
    return await db.fetchval(PENDING_SQL)
