"""Images: the K images of a round, where they are stored and which model made them.

Image files are shared by content (the store's key is the bytes' SHA-256): two rounds with
the same bytes, or a /score upload equal to a round's image, use one file. A file may be
deleted only when nothing uses it, and a row may name it only once it is stored. Both sides
hold an advisory lock on the key until their transaction ends: writers a shared one
(`insert_images`, `hold_keys`), the deleter an exclusive one (`delete_unreferenced`). So a
deletion either sees the writer's committed row and keeps the file, or happens before the
writer's check that the file is there, and the writer stores it again.

A deleter waits at most `DELETE_LOCK_TIMEOUT` for the keys (a writer holds them for one
transaction); then it stops with `db.locks.LockTimeout`, having deleted nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from db import locks
from db.connect import Executor, transaction

DELETE_LOCK_TIMEOUT = timedelta(seconds=10)


@dataclass(frozen=True)
class NewImage:
    position: int  # 1..K, the order shown
    sha256: str
    storage_key: str
    seed: int | None = None
    model_version_id: int | None = None  # None: made elsewhere (an imported dataset)
    width: int | None = None
    height: int | None = None
    nsfw: bool = False  # flagged by the safety checker: recorded, never shown
    hps_score: float | None = None
    hps_version_id: int | None = None


@dataclass(frozen=True)
class Image:
    id: int
    round_id: int
    position: int
    model_version_id: int | None
    seed: int | None
    sha256: str
    storage_key: str
    width: int | None
    height: int | None
    nsfw: bool
    hps_score: float | None
    hps_version_id: int | None
    created_at: datetime


INSERT_IMAGES_SQL = """
INSERT INTO images (round_id, position, sha256, storage_key, seed, model_version_id,
                    width, height, nsfw, hps_score, hps_version_id)
SELECT $1, * FROM unnest($2::smallint[], $3::text[], $4::text[], $5::bigint[], $6::bigint[],
                         $7::int[], $8::int[], $9::bool[], $10::real[], $11::bigint[])
ON CONFLICT (round_id, position) DO NOTHING
"""


HOLD_KEYS_SQL = """
SELECT pg_advisory_xact_lock_shared(hashtextextended('hps_image:' || k, 0))
FROM unnest($1::text[]) AS k
"""

LOCK_KEYS_SQL = """
SELECT pg_advisory_xact_lock(hashtextextended('hps_image:' || k, 0))
FROM unnest($1::text[]) AS k
"""

# The same exclusive locks held by the session, across a commit, until `UNLOCK_ALL_SQL`:
# forgetting a user deletes rows, commits, then deletes the files under the same locks.
LOCK_KEYS_FOR_SESSION_SQL = """
SELECT pg_advisory_lock(hashtextextended('hps_image:' || k, 0))
FROM unnest($1::text[]) AS k
"""

UNLOCK_ALL_SQL = """
SELECT pg_advisory_unlock_all()
"""

LOCK_KEYS_OF_SQL = """
SELECT coalesce(array_agg(hashtextextended('hps_image:' || k, 0)), '{}')
FROM unnest($1::text[]) AS k
"""


async def key_lock_timed_out(db: Executor, keys: list[str], limit: timedelta) -> locks.LockTimeout:
    """The error for image keys not locked within `limit`, naming who holds them."""
    found = await locks.holders(db, await db.fetchval(LOCK_KEYS_OF_SQL, keys))
    what = f"{len(keys)} image file(s)" if len(keys) != 1 else "an image file"
    return locks.timed_out(what, limit, found)


async def hold_keys(conn: Executor, keys: list[str]) -> None:
    """Keep these keys' files from being deleted until the caller's transaction ends. Call
    it inside the transaction that makes a row or job use them, then make sure the files
    are in the store (`ImageStore.put` again: a no-op when they are) before committing."""
    # One order for every locker (sorted keys, unnest keeps it), so lockers never deadlock.
    await conn.execute(HOLD_KEYS_SQL, sorted(set(keys)))


async def insert_images(db: Executor, round_id: int, images: list[NewImage]) -> None:
    """Insert a round's images in one statement (positions already present are kept). The
    keys are held (`hold_keys`) until the caller's transaction ends: put the files again
    before committing."""
    await hold_keys(db, [image.storage_key for image in images])
    columns = [
        [getattr(image, name) for image in images]
        for name in (
            "position",
            "sha256",
            "storage_key",
            "seed",
            "model_version_id",
            "width",
            "height",
            "nsfw",
            "hps_score",
            "hps_version_id",
        )
    ]
    await db.execute(INSERT_IMAGES_SQL, round_id, *columns)


IMAGES_OF_ROUND_SQL = """
SELECT * FROM images WHERE round_id = $1 AND ($2 OR NOT nsfw) ORDER BY position
"""


async def images_of_round(db: Executor, round_id: int, *, include_nsfw: bool) -> list[Image]:
    return [Image(**dict(r)) for r in await db.fetch(IMAGES_OF_ROUND_SQL, round_id, include_nsfw)]


SET_SCORES_SQL = """
UPDATE images i SET hps_score = s.score, hps_version_id = $3
FROM unnest($1::bigint[], $2::real[]) AS s(id, score)
WHERE i.id = s.id
"""


async def set_scores(db: Executor, scores: dict[int, float], hps_version_id: int | None) -> None:
    """Store HPS scores (image id → score) and the classifier version that gave them."""
    await db.execute(SET_SCORES_SQL, list(scores), list(scores.values()), hps_version_id)


# Shown images (never safety-flagged ones) without a score, newest first: fresh images are
# scored first, and an old image whose file is missing never holds the others up.
UNSCORED_IMAGES_SQL = """
SELECT i.id, i.storage_key, coalesce(r.prompt_text, p.text) AS prompt
FROM images i
JOIN rounds r ON r.id = i.round_id
JOIN prompts p ON p.id = r.prompt_id
WHERE i.hps_score IS NULL AND NOT i.nsfw
ORDER BY i.id DESC
LIMIT $1
"""


@dataclass(frozen=True)
class UnscoredImage:
    id: int
    storage_key: str
    prompt: str


async def unscored_images(db: Executor, limit: int) -> list[UnscoredImage]:
    """Up to `limit` shown images with no HPS score yet, newest first."""
    return [UnscoredImage(**dict(r)) for r in await db.fetch(UNSCORED_IMAGES_SQL, limit)]


COUNT_UNSCORED_SQL = """
SELECT count(*) FROM (SELECT FROM images WHERE hps_score IS NULL AND NOT nsfw LIMIT $1) AS s
"""


async def count_unscored(db: Executor, up_to: int = 1) -> int:
    """How many shown images lack a score (counting stops at `up_to`)."""
    return await db.fetchval(COUNT_UNSCORED_SQL, up_to)


# A key is still in use while an image row names it or a pending job's payload lists it
# (a /score upload waiting for its worker).
UNREFERENCED_KEYS_SQL = """
SELECT DISTINCT k FROM unnest($1::text[]) AS k
WHERE NOT EXISTS (SELECT FROM images i WHERE i.storage_key = k)
  AND NOT EXISTS (SELECT FROM jobs j
                  WHERE j.state IN ('queued', 'running') AND j.payload->'image_keys' ? k)
"""


async def unreferenced_keys(db: Executor, keys: list[str]) -> list[str]:
    """The storage keys among `keys` that nothing uses at this moment: no image row, and no
    queued or running job's `image_keys`. To delete files, use `delete_unreferenced`."""
    return sorted(r["k"] for r in await db.fetch(UNREFERENCED_KEYS_SQL, keys))


async def delete_unreferenced(
    db: Executor,
    keys: list[str],
    delete: Callable[[str], bool],
    *,
    lock_timeout: timedelta = DELETE_LOCK_TIMEOUT,
) -> int:
    """Delete (with `delete`, e.g. `ImageStore.delete`) the files among `keys` that nothing
    uses, each under its exclusive key lock, so that no writer adds a row naming one of
    them meanwhile; returns how many files were deleted. `locks.LockTimeout` (nothing
    deleted) if the keys stay locked for `lock_timeout`."""
    keys = sorted(set(keys))
    if not keys:
        return 0
    try:
        async with transaction(db) as conn:
            async with locks.waiting_at_most(conn, lock_timeout):
                await conn.execute(LOCK_KEYS_SQL, keys)
            deleted = 0
            for key in await unreferenced_keys(conn, keys):
                deleted += await asyncio.to_thread(delete, key)
            return deleted
    except asyncpg.LockNotAvailableError:
        raise await key_lock_timed_out(db, keys, lock_timeout) from None
