"""The prompts an adaptation run learns from, and the held-out ones it is judged on.

Prompts come from the prompts table (those people actually used; see
`db.prompts.adaptation_prompts` for who counts) and, optionally, a prompt file. Texts that
normalise alike are one prompt. A prompt's hash decides once and for all whether it is
held out (a share `adapt.heldout_fraction`): held-out prompts are never trained on, in
this run or any later one, so every run and `hps adapt eval` judge adapters on prompts
none of them saw. The training prompts are a seeded sample of at most `adapt.max_prompts`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from db import prompts as db_prompts
from db.connect import Executor
from hps.settings import AdaptSettings


class PromptFileError(Exception):
    """The prompt file cannot be read as prompts; the message says why."""


@dataclass(frozen=True)
class PromptSplit:
    train: list[str]
    heldout: list[str]


def _key(text: str) -> str:
    return db_prompts.text_hash(text)


def _position(key: str, salt: str = "") -> float:
    return int(hashlib.sha256(f"{salt}{key}".encode()).hexdigest()[:12], 16) / 16**12


def is_held_out(text: str, fraction: float) -> bool:
    """Whether a prompt is held out for offline evaluation (stable: by its hash)."""
    return _position(_key(text)) < fraction


def split_prompts(
    texts: Iterable[str], *, heldout_fraction: float, max_prompts: int, max_heldout: int, seed: int
) -> PromptSplit:
    """Deduplicate, hold out by hash, and take seeded samples of both sides (the first
    spelling of a prompt is kept)."""
    unique: dict[str, str] = {}
    for text in texts:
        if text.strip():
            unique.setdefault(_key(text), text.strip())
    order = sorted(unique, key=lambda key: _position(key, f"{seed}:"))
    train = [unique[k] for k in order if _position(k) >= heldout_fraction]
    heldout = [unique[k] for k in order if _position(k) < heldout_fraction]
    return PromptSplit(train[:max_prompts], heldout[:max_heldout])


def read_prompt_file(path: Path) -> list[str]:
    """Prompts from a JSON list of strings (the reference's prompt files) or a text file
    with one prompt per line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptFileError(f"cannot read the prompt file {path}: {exc}") from None
    if Path(path).suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PromptFileError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
            raise PromptFileError(f"{path} must hold a JSON list of strings")
        return [p for p in data if p.strip()]
    return [line.strip() for line in text.splitlines() if line.strip()]


async def sample_prompts(db: Executor | None, settings: AdaptSettings) -> PromptSplit:
    """The run's training and held-out prompts (from the database unless `db` is None,
    plus the prompt file)."""
    texts: list[str] = []
    if db is not None:
        texts += await db_prompts.adaptation_prompts(
            db, include_contains_name=settings.include_contains_name
        )
    if settings.prompt_file is not None:
        texts += read_prompt_file(settings.prompt_file)
    return split_prompts(
        texts,
        heldout_fraction=settings.heldout_fraction,
        max_prompts=settings.max_prompts,
        max_heldout=settings.eval_prompts,
        seed=settings.seed,
    )
