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

Files that must go whatever happens (those a forget left unreferenced) are recorded in
`image_deletions` in the transaction that stopped using them (`queue_deletions`), and
deleted after its commit by `delete_pending`, under the same locks and checks; a deletion
that fails (the store unreachable) stays recorded and is tried again with backoff (the
bot does, every minute), so that no file is forgotten by the forget.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from db import locks
from db.connect import Executor, transaction
from hps.store import StoreError

log = logging.getLogger(__name__)

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

# The keys among $1 whose exclusive lock this transaction gets at once (the others are
# busy: a writer is naming them right now). Never waits, so it needs no order.
TRY_LOCK_KEYS_SQL = """
SELECT k FROM unnest($1::text[]) AS k
WHERE pg_try_advisory_xact_lock(hashtextextended('hps_image:' || k, 0))
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


# -- pending deletions (`image_deletions`) ----------------------------------------------------

# A failed deletion is tried again after 30 s, doubling up to an hour, for as long as it
# takes: a file a forget left behind is never given up.
BACKOFF_FIRST = timedelta(seconds=30)
BACKOFF_MAX = timedelta(hours=1)
# A key a writer holds is looked at again this much later (it is usually free by then).
BUSY_DELAY = timedelta(minutes=1)

QUEUE_DELETIONS_SQL = """
INSERT INTO image_deletions (storage_key)
SELECT DISTINCT k FROM unnest($1::text[]) AS k
ON CONFLICT (storage_key) DO UPDATE SET next_attempt_at = now()
"""


async def queue_deletions(db: Executor, keys: list[str]) -> None:
    """Record that the files of these keys must go (in the transaction that stopped using
    them): `delete_pending` deletes them once that commits, and keeps them until it could."""
    await db.execute(QUEUE_DELETIONS_SQL, keys)


# The pending deletions due now, those that failed last; rows another sweep is deleting are
# skipped (`FOR UPDATE SKIP LOCKED`).
CLAIM_DUE_SQL = """
SELECT storage_key FROM image_deletions
WHERE next_attempt_at <= now()
ORDER BY next_attempt_at, id
LIMIT $1
FOR UPDATE SKIP LOCKED
"""

# The pending deletions of some keys, due or not. Rows another sweep is deleting are waited
# for (a sweep holds them only while it tries them), so that afterwards what is left of
# these keys is known exactly.
CLAIM_KEYS_SQL = """
SELECT storage_key FROM image_deletions
WHERE storage_key = ANY($1::text[])
ORDER BY storage_key
FOR UPDATE
"""

SETTLED_SQL = """
DELETE FROM image_deletions WHERE storage_key = ANY($1::text[])
"""

FAILED_SQL = """
UPDATE image_deletions
SET attempts = attempts + 1, error = $2,
    next_attempt_at = now() + least($3::interval * power(2, least(attempts, 16)), $4::interval)
WHERE storage_key = $1
"""

BUSY_SQL = """
UPDATE image_deletions SET next_attempt_at = now() + $2::interval
WHERE storage_key = ANY($1::text[])
"""

PENDING_OF_SQL = """
SELECT count(*) FROM image_deletions WHERE storage_key = ANY($1::text[])
"""


@dataclass(frozen=True)
class Sweep:
    """What one `delete_pending` pass did."""

    deleted: int  # files deleted (or found gone already)
    in_use: int  # named by a row again since: kept, no longer pending
    failed: int  # the store refused or was unreachable: tried again later
    busy: int  # a writer held the key: tried again later
    error: str | None = None  # the store's error, if it failed


async def delete_pending(
    db: Executor,
    delete: Callable[[str], bool],
    *,
    keys: list[str] | None = None,
    batch: int = 100,
) -> Sweep:
    """Delete pending image files (`image_deletions`): those of `keys` if given, else those
    due. Each is deleted (with `delete`, e.g. `ImageStore.delete`) under its exclusive key
    lock and only if nothing uses it at that moment, as `delete_unreferenced` does; one in
    use again is kept and no longer pending. A deletion that fails stays pending (tried
    again after a backoff) and ends the sweep: the store is likely failing for the next ones
    too. Keys a writer holds right now are left for a later sweep: this never waits for a
    lock. `batch` keys a transaction. Call it outside a transaction (files go only once
    rows have)."""
    total = Sweep(0, 0, 0, 0)
    todo = None if keys is None else sorted(set(keys))
    while True:
        some = None if todo is None else todo[:batch]
        if some is not None:
            todo = todo[batch:]  # type: ignore[index]
        done = await _delete_pending_batch(db, delete, some, batch)
        total = Sweep(
            total.deleted + done.deleted,
            total.in_use + done.in_use,
            total.failed + done.failed,
            total.busy + done.busy,
            done.error or total.error,
        )
        if done.failed or (todo is None and done.deleted + done.in_use == 0) or todo == []:
            return total


async def _delete_pending_batch(
    db: Executor, delete: Callable[[str], bool], keys: list[str] | None, limit: int
) -> Sweep:
    async with transaction(db) as conn:
        if keys is None:
            records = await conn.fetch(CLAIM_DUE_SQL, limit)
        else:
            records = await conn.fetch(CLAIM_KEYS_SQL, keys)
        claimed = [r["storage_key"] for r in records]
        if not claimed:
            return Sweep(0, 0, 0, 0)
        locked = {r["k"] for r in await conn.fetch(TRY_LOCK_KEYS_SQL, sorted(claimed))}
        busy = sorted(set(claimed) - locked)
        unused = await unreferenced_keys(conn, sorted(locked))
        settled = sorted(locked - set(unused))  # in use again: nothing to delete
        deleted, error = 0, None
        for key in unused:
            try:
                await asyncio.to_thread(delete, key)
            except StoreError as exc:  # a key no store could hold: nothing to retry
                log.warning("a pending image deletion cannot be done: %s", exc)
                settled.append(key)
                continue
            except Exception as exc:  # whatever else the store raised: the key stays pending
                error = f"{type(exc).__name__}: {exc}"[:500]
                await conn.execute(FAILED_SQL, key, error, BACKOFF_FIRST, BACKOFF_MAX)
                log.warning(
                    "could not delete a forgotten image file (tried again later): %s",
                    error,
                    extra={"storage_key": key},
                )
                break
            settled.append(key)
            deleted += 1
        await conn.execute(SETTLED_SQL, settled)
        if busy:
            await conn.execute(BUSY_SQL, busy, BUSY_DELAY)
        return Sweep(deleted, len(locked) - len(unused), int(error is not None), len(busy), error)


async def pending_deletions(db: Executor, keys: list[str]) -> int:
    """How many of these keys' files are still to be deleted."""
    return await db.fetchval(PENDING_OF_SQL, keys)
