"""Images: the K images of a round, where they are stored and which model made them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from db.connect import Executor


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


async def insert_images(db: Executor, round_id: int, images: list[NewImage]) -> None:
    """Insert a round's images in one statement (positions already present are kept)."""
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
SELECT i.id, i.storage_key, p.text AS prompt
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
    """The storage keys among `keys` that nothing uses any more (safe to delete from the
    store): no image row, and no queued or running job's `image_keys`."""
    return sorted(r["k"] for r in await db.fetch(UNREFERENCED_KEYS_SQL, keys))
