"""Prompts: one row per distinct (prompt, negative prompt) after normalisation.

Each row also keeps `text_hash`, the key of its text alone: the classifier and the exports
see only the text, so datasets split on it (`pipeline.data.prompt_split`), and one text
with and without a negative prompt is one prompt there.

Normalisation is NFKC, whitespace collapsed, case folded. CLIP's tokenizer lower-cases and
cleans whitespace itself, so two prompts that normalise alike generate and score alike; the
row keeps the first spelling seen (a round whose own spelling differs keeps it in
`rounds.prompt_text`, so datasets round-trip exactly). `contains_name` only ever turns on:
once any source flags a prompt as naming people, it stays flagged.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from datetime import datetime

from db.connect import Executor

_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text)).strip().casefold()


def prompt_hash(text: str, negative_text: str = "") -> str:
    """The key that makes two prompts the same prompt."""
    return hashlib.sha256(f"{normalize(text)}\x00{normalize(negative_text)}".encode()).hexdigest()


def text_hash(text: str) -> str:
    """The key of a prompt's text alone, negative prompt aside (`prompts.text_hash`): what
    splits are decided on. A prompt with no negative prompt has it as its `prompt_hash`."""
    return prompt_hash(text)


@dataclass(frozen=True)
class Prompt:
    id: int
    text: str
    negative_text: str
    norm_hash: str
    contains_name: bool
    text_hash: str
    created_at: datetime


# On conflict the row is updated (locked) only when the flag turns on; otherwise it is read.
ENSURE_PROMPT_SQL = """
WITH upserted AS (
    INSERT INTO prompts (text, negative_text, norm_hash, contains_name, text_hash)
    VALUES ($1, $2, $3, $4, $5)
    ON CONFLICT (norm_hash) DO UPDATE SET contains_name = true
    WHERE EXCLUDED.contains_name AND NOT prompts.contains_name
    RETURNING id
)
SELECT id FROM upserted
UNION ALL
SELECT id FROM prompts WHERE norm_hash = $3
LIMIT 1
"""

PROMPT_ID_SQL = """
SELECT id FROM prompts WHERE norm_hash = $1
"""


async def ensure_prompt(
    db: Executor, text: str, negative_text: str = "", *, contains_name: bool = False
) -> int:
    """The id of this prompt's row, inserted if new; `contains_name` flags an existing row
    too (a flag is never cleared here: one source saying a prompt names people suffices)."""
    key = prompt_hash(text, negative_text)
    prompt_id = await db.fetchval(
        ENSURE_PROMPT_SQL, text, negative_text, key, contains_name, text_hash(text)
    )
    if prompt_id is None:  # inserted concurrently after this statement's snapshot
        prompt_id = await db.fetchval(PROMPT_ID_SQL, key)
    return prompt_id


GET_PROMPT_SQL = """
SELECT * FROM prompts WHERE id = $1
"""


async def get_prompt(db: Executor, prompt_id: int) -> Prompt | None:
    record = await db.fetchrow(GET_PROMPT_SQL, prompt_id)
    return Prompt(**dict(record)) if record else None


# A prompt counts if anyone still counted used it: a requester who is neither banned,
# shadow-banned nor forgotten (forgetting deletes the rounds anyway).
ADAPTATION_PROMPTS_SQL = """
SELECT p.text FROM prompts p
WHERE ($1 OR NOT p.contains_name)
  AND EXISTS (
      SELECT FROM rounds r JOIN users u ON u.id = r.requester_id
      WHERE r.prompt_id = p.id
        AND NOT u.banned AND NOT u.shadow_banned AND u.forgotten_at IS NULL
  )
ORDER BY p.id
"""


async def adaptation_prompts(db: Executor, *, include_contains_name: bool = False) -> list[str]:
    """The prompt texts people used, for adapting SD (negative prompts left aside; callers
    deduplicate texts that normalise alike)."""
    records = await db.fetch(ADAPTATION_PROMPTS_SQL, include_contains_name)
    return [r["text"] for r in records]
