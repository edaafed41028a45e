"""Datasets: the choices that train the classifier, imported datasets, and exports.

Who counts: a choice is used for training or exported only if it is not flagged (made while
shadow-banned) and its chooser is neither banned, shadow-banned nor forgotten. Images the
safety checker flagged were never shown, so they are not part of a round's shown images.
Exports name users by their pseudonym only.

Splits: training and export place a round by the same rule (`pipeline.data.prompt_split`),
which needs to know, per prompt, whether any of its rounds is declared test by a dataset
(`prompt_tested`) and whether any has no declared split (`prompt_undeclared`): both queries
return them. A prompt there is its text alone (`prompts.text_hash`): the classifier and the
exports see no negative prompt, so one text with and without one is one prompt, on one side.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
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

# Per prompt text, over all its rounds: any declared test by a dataset, any with no declared
# split. (One aggregate for the whole query: cheaper than a lookup per row over a million rows.)
_PROMPT_SIDES = """
prompt_sides AS (
    SELECT p.text_hash, bool_or(r.split = 'test') AS prompt_tested,
           bool_or(r.split IS NULL) AS prompt_undeclared
    FROM rounds r JOIN prompts p ON p.id = r.prompt_id
    GROUP BY p.text_hash
)
"""

TRAINING_CHOICES_SQL = f"""
WITH {_PROMPT_SIDES}
SELECT c.id AS choice_id, c.round_id, r.split, coalesce(r.prompt_text, p.text) AS prompt,
       p.text_hash, sides.prompt_tested, sides.prompt_undeclared,
       c.verdict, c.chosen_position, shown.positions, shown.image_keys
FROM choices c
JOIN rounds r ON r.id = c.round_id
JOIN prompts p ON p.id = r.prompt_id
JOIN users u ON u.id = c.user_id
JOIN prompt_sides sides ON sides.text_hash = p.text_hash
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
    prompt: str  # the round's own spelling
    text_hash: str  # the prompt's text's (`prompts.text_hash`): its split and weight group
    prompt_tested: bool  # some round of this prompt text is declared test
    prompt_undeclared: bool  # some round of this prompt text has no declared split
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


def import_key(norm_hash: str, image_sha256s: Sequence[str], chosen_position: int) -> str:
    """What makes two imported records the same record: the prompt (normalised, as
    `prompts.norm_hash`), the images in the order shown (their sha256) and the pick. Record
    ids are no key: they are only unique within one dataset (an export of another instance
    numbers its records by its round ids). Migration 0008 computes the same in SQL."""
    content = f"{norm_hash}|{','.join(image_sha256s)}|{chosen_position}"
    return hashlib.sha256(content.encode()).hexdigest()


@dataclass(frozen=True)
class ImportedRound:
    """One record of an imported dataset: a closed round with its requester's pick."""

    external_id: str  # the record's id in its dataset (exported again as its id)
    import_key: str  # `import_key(...)`: what makes importing it again a no-op
    split: str | None
    prompt: str
    contains_name: bool
    user_hash: str  # the dataset's user id; the user is `import:<user_hash>`
    images: list[NewImage]
    chosen_position: int


IMPORTED_KEYS_SQL = """
SELECT import_key FROM rounds WHERE import_key = ANY($1::text[])
"""


async def imported_keys(db: Executor, keys: list[str]) -> set[str]:
    """Which of these records (by `import_key`) are already imported."""
    return {r["import_key"] for r in await db.fetch(IMPORTED_KEYS_SQL, keys)}


# `prompt_text` keeps the record's exact spelling where the prompt row has another one.
INSERT_IMPORTED_ROUND_SQL = """
INSERT INTO rounds (prompt_id, requester_id, source, external_id, import_key, split, k,
                    status, ready_at, closed_at, prompt_text)
VALUES ($1, $2, 'import', $3, $4, $5, $6, 'closed', now(), now(),
        NULLIF($7, (SELECT text FROM prompts WHERE id = $1)))
ON CONFLICT (import_key) DO NOTHING
RETURNING id
"""

INSERT_IMPORTED_CHOICE_SQL = """
INSERT INTO choices (round_id, user_id, verdict, chosen_position, is_requester)
VALUES ($1, $2, 'pick', $3, true)
"""


IMPORTED = "imported"
ALREADY_THERE = "already there"
FORGOTTEN = "forgotten"  # under a pseudonym a forgotten user held


async def import_round(
    db: Executor, record: ImportedRound, store_files: Callable[[], Awaitable[object]] | None = None
) -> str:
    """Insert one imported record (round, images, choice) in one transaction, for the
    imported user of its user hash (`users.ensure_imported_user`, never a Discord user), and
    say what happened: `IMPORTED`; `ALREADY_THERE` if the same record (by `import_key`) is,
    with nothing written but its prompt's `contains_name` flag (imports are idempotent);
    `FORGOTTEN`, with nothing written, if its user hash is a pseudonym a forgotten user held.
    Imported choices are not clicks, so they add no `choice_events`. `store_files` puts the
    images' files in the store again once their keys are held (see `db.images`)."""
    async with transaction(db) as conn:
        user = await users.ensure_imported_user(conn, record.user_hash)
        if user is None:
            return FORGOTTEN
        prompt_id = await prompts.ensure_prompt(
            conn, record.prompt, contains_name=record.contains_name
        )
        round_id = await conn.fetchval(
            INSERT_IMPORTED_ROUND_SQL,
            prompt_id,
            user.id,
            record.external_id,
            record.import_key,
            record.split,
            len(record.images),
            record.prompt,
        )
        if round_id is None:
            return ALREADY_THERE
        await insert_images(conn, round_id, record.images)
        if store_files is not None:
            await store_files()
        await conn.execute(INSERT_IMPORTED_CHOICE_SQL, round_id, user.id, record.chosen_position)
        return IMPORTED


# ---- export ----------------------------------------------------------------------------

# Which choices an export holds ($1: everyone's, else the requesters'; $2: the verdicts).
_EXPORTED = f"""
    {_COUNTED_CHOOSER} AND ($1 OR c.is_requester) AND c.verdict = ANY($2::text[])
"""

EXPORT_CHOICES_SQL = f"""
WITH {_PROMPT_SIDES}
SELECT c.id AS choice_id, c.round_id, r.source, r.external_id, r.split,
       coalesce(r.prompt_text, p.text) AS prompt, p.negative_text AS negative_prompt,
       p.text_hash, p.contains_name, sides.prompt_tested, sides.prompt_undeclared,
       u.pseudonym AS user_id, requester.pseudonym AS requester, c.is_requester,
       c.verdict, c.chosen_position, r.params::text AS params,
       r.created_at AS round_created_at, c.created_at, c.updated_at,
       shown.positions, shown.image_keys, shown.seeds, shown.models
FROM choices c
JOIN rounds r ON r.id = c.round_id
JOIN prompts p ON p.id = r.prompt_id
JOIN users u ON u.id = c.user_id
LEFT JOIN users requester ON requester.id = r.requester_id
JOIN prompt_sides sides ON sides.text_hash = p.text_hash
CROSS JOIN LATERAL (
    SELECT array_agg(i.position ORDER BY i.position) AS positions,
           array_agg(i.storage_key ORDER BY i.position) AS image_keys,
           array_agg(i.seed ORDER BY i.position) AS seeds,
           array_agg(v.name ORDER BY i.position) AS models
    FROM images i LEFT JOIN model_versions v ON v.id = i.model_version_id
    WHERE i.round_id = c.round_id AND NOT i.nsfw
) shown
WHERE {_EXPORTED} AND shown.positions IS NOT NULL
ORDER BY c.id
"""

# Per prompt text: its exported choices of rounds that showed at least $3 images.
EXPORT_PROMPT_CHOICES_SQL = f"""
SELECT p.text_hash, count(*) AS choices
FROM choices c
JOIN rounds r ON r.id = c.round_id
JOIN prompts p ON p.id = r.prompt_id
JOIN users u ON u.id = c.user_id
WHERE {_EXPORTED}
  AND (SELECT count(*) FROM images i WHERE i.round_id = c.round_id AND NOT i.nsfw) >= $3
GROUP BY p.text_hash
"""


def export_snapshot(conn: Any) -> Any:
    """The transaction an export reads in (read-only, repeatable read: one snapshot of the
    database). `stream_export_choices` needs one (a cursor lives in its transaction), and
    `export_prompt_choices` read in the same one agrees with the rows streamed. `conn` must
    be a connection, not a pool."""
    return conn.transaction(readonly=True, isolation="repeatable_read")


async def export_prompt_choices(
    conn: Any, *, all_choosers: bool, verdicts: tuple[str, ...], min_shown: int = 1
) -> dict[str, int]:
    """Per prompt text (`text_hash`): how many of the choices `stream_export_choices`
    streams with these arguments are of rounds that showed at least `min_shown` images."""
    records = await conn.fetch(EXPORT_PROMPT_CHOICES_SQL, all_choosers, list(verdicts), min_shown)
    return {r["text_hash"]: r["choices"] for r in records}


async def stream_export_choices(
    conn: Any,
    *,
    all_choosers: bool = False,
    verdicts: tuple[str, ...] = ("pick", "tie", "none"),
    batch_size: int = 10_000,
) -> AsyncIterator[list[Any]]:
    """The exportable choices in batches of records (the columns of `EXPORT_CHOICES_SQL`),
    read with a server-side cursor so memory stays bounded however many there are. Call it
    inside `export_snapshot(conn)`."""
    cursor = await conn.cursor(EXPORT_CHOICES_SQL, all_choosers, list(verdicts))
    while batch := await cursor.fetch(batch_size):
        yield batch
