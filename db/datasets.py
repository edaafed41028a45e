"""Datasets: the choices that train the classifier, imported datasets, and exports.

Who counts: a choice is used for training or exported only if it is not flagged (made while
shadow-banned) and its chooser is neither banned, shadow-banned nor forgotten. Images the
safety checker flagged were never shown, so they are not part of a round's shown images.
Exports name users by their pseudonym only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from db import prompts, users
from db.connect import Executor, transaction
from db.images import NewImage, insert_images

# Images shown to people (never the safety-flagged ones), in the order shown.
_SHOWN_IMAGES = """
    SELECT array_agg(i.position ORDER BY i.position) AS positions,
           array_agg(i.storage_key ORDER BY i.position) AS image_keys
    FROM images i WHERE i.round_id = c.round_id AND NOT i.nsfw
"""

_COUNTED_CHOOSER = """
    NOT c.flagged AND NOT u.banned AND NOT u.shadow_banned AND u.forgotten_at IS NULL
"""

TRAINING_CHOICES_SQL = f"""
SELECT c.id AS choice_id, c.round_id, r.split, p.text AS prompt, p.norm_hash,
       c.verdict, c.chosen_position, shown.positions, shown.image_keys
FROM choices c
JOIN rounds r ON r.id = c.round_id
JOIN prompts p ON p.id = r.prompt_id
JOIN users u ON u.id = c.user_id
CROSS JOIN LATERAL ({_SHOWN_IMAGES}) shown
WHERE c.verdict IN ('pick', 'tie') AND {_COUNTED_CHOOSER}
  AND ($1 OR c.is_requester)
  AND ($2 OR NOT p.contains_name)
  AND r.status IN ('ready', 'closed')
  AND cardinality(shown.positions) >= 2
ORDER BY c.id
"""


@dataclass(frozen=True)
class TrainingChoice:
    """One choice usable for training: a pick (`chosen_position`) or a tie among the shown
    images. "None of these" verdicts carry no preference among them and are left out."""

    choice_id: int
    round_id: int
    split: str | None  # a dataset's own split (imported rounds), else None
    prompt: str
    norm_hash: str
    verdict: str
    chosen_position: int | None
    positions: list[int]
    image_keys: list[str]


async def training_choices(
    db: Executor, *, all_choosers: bool = False, include_contains_name: bool = False
) -> list[TrainingChoice]:
    """The requester's choices (everyone's with `all_choosers`) of ready or closed rounds."""
    records = await db.fetch(TRAINING_CHOICES_SQL, all_choosers, include_contains_name)
    return [TrainingChoice(**dict(r)) for r in records]


# ---- import ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportedRound:
    """One record of an imported dataset: a closed round with its requester's pick."""

    external_id: str
    split: str | None
    prompt: str
    contains_name: bool
    user_pseudonym: str
    images: list[NewImage]
    chosen_position: int


IMPORTED_EXTERNAL_IDS_SQL = """
SELECT external_id FROM rounds WHERE source = 'import' AND external_id = ANY($1::text[])
"""


async def imported_external_ids(db: Executor, external_ids: list[str]) -> set[str]:
    """Which of these dataset record ids are already imported."""
    return {r["external_id"] for r in await db.fetch(IMPORTED_EXTERNAL_IDS_SQL, external_ids)}


INSERT_IMPORTED_ROUND_SQL = """
INSERT INTO rounds (prompt_id, requester_id, source, external_id, split, k, status,
                    ready_at, closed_at)
VALUES ($1, $2, 'import', $3, $4, $5, 'closed', now(), now())
ON CONFLICT (source, external_id) DO NOTHING
RETURNING id
"""

INSERT_IMPORTED_CHOICE_SQL = """
INSERT INTO choices (round_id, user_id, verdict, chosen_position, is_requester)
VALUES ($1, $2, 'pick', $3, true)
"""


async def import_round(db: Executor, record: ImportedRound) -> int | None:
    """Insert one imported record (round, images, choice) in one transaction; None, with
    nothing written, if a round with its external id exists (imports are idempotent).
    Imported choices are not clicks, so they add no `choice_events`."""
    async with transaction(db) as conn:
        prompt_id = await prompts.ensure_prompt(
            conn, record.prompt, contains_name=record.contains_name
        )
        user = await users.ensure_imported_user(conn, record.user_pseudonym)
        round_id = await conn.fetchval(
            INSERT_IMPORTED_ROUND_SQL,
            prompt_id,
            user.id,
            record.external_id,
            record.split,
            len(record.images),
        )
        if round_id is None:
            return None
        await insert_images(conn, round_id, record.images)
        await conn.execute(INSERT_IMPORTED_CHOICE_SQL, round_id, user.id, record.chosen_position)
        return round_id


# ---- export ----------------------------------------------------------------------------

EXPORT_CHOICES_SQL = f"""
SELECT c.id AS choice_id, c.round_id, r.source, r.external_id, r.split,
       p.text AS prompt, p.negative_text AS negative_prompt, p.norm_hash, p.contains_name,
       u.pseudonym AS user_id, requester.pseudonym AS requester, c.is_requester,
       c.verdict, c.chosen_position, r.params::text AS params,
       r.created_at AS round_created_at, c.created_at, c.updated_at,
       shown.positions, shown.image_keys, shown.seeds, shown.models
FROM choices c
JOIN rounds r ON r.id = c.round_id
JOIN prompts p ON p.id = r.prompt_id
JOIN users u ON u.id = c.user_id
LEFT JOIN users requester ON requester.id = r.requester_id
CROSS JOIN LATERAL (
    SELECT array_agg(i.position ORDER BY i.position) AS positions,
           array_agg(i.storage_key ORDER BY i.position) AS image_keys,
           array_agg(i.seed ORDER BY i.position) AS seeds,
           array_agg(v.name ORDER BY i.position) AS models
    FROM images i LEFT JOIN model_versions v ON v.id = i.model_version_id
    WHERE i.round_id = c.round_id AND NOT i.nsfw
) shown
WHERE {_COUNTED_CHOOSER}
  AND ($1 OR c.is_requester)
  AND c.verdict = ANY($2::text[])
  AND shown.positions IS NOT NULL
ORDER BY c.id
"""


async def stream_export_choices(
    conn: Any,
    *,
    all_choosers: bool = False,
    verdicts: tuple[str, ...] = ("pick", "tie", "none"),
    batch_size: int = 10_000,
) -> AsyncIterator[list[Any]]:
    """The exportable choices in batches of records (the columns of `EXPORT_CHOICES_SQL`),
    read with a server-side cursor so memory stays bounded however many there are. `conn` must be a
    connection (a cursor lives in its transaction), not a pool."""
    async with conn.transaction(readonly=True, isolation="repeatable_read"):
        cursor = await conn.cursor(EXPORT_CHOICES_SQL, all_choosers, list(verdicts))
        while batch := await cursor.fetch(batch_size):
            yield batch
