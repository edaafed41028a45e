"""The reward models' agreement with people's choices (`hps eval --scorers`): stored per
evaluation, read back by `hps report` and the bot's `/scorers`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from db.connect import Executor, transaction

RECORD_AGREEMENT_SQL = """
INSERT INTO scorer_agreement (source, split, examples, scorer, model, scale, choices, ties,
    top1, top1_low, top1_high, chance, pairwise, pairwise_low, pairwise_high, pairs, report)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17::jsonb)
RETURNING evaluated_at
"""

# The latest evaluation's rows, in the order its scorers were given.
LATEST_AGREEMENT_SQL = """
SELECT evaluated_at, source, split, examples, scorer, model, scale, choices, ties, top1,
       top1_low, top1_high, chance, pairwise, pairwise_low, pairwise_high, pairs
FROM scorer_agreement
WHERE evaluated_at = (SELECT max(evaluated_at) FROM scorer_agreement)
ORDER BY id
"""


@dataclass(frozen=True)
class Agreement:
    """One scorer's agreement with the choices of one evaluation."""

    evaluated_at: datetime
    source: str
    split: str
    examples: str
    scorer: str
    model: str
    scale: str
    choices: int
    ties: int
    top1: float | None
    top1_low: float | None
    top1_high: float | None
    chance: float | None
    pairwise: float | None
    pairwise_low: float | None
    pairwise_high: float | None
    pairs: int


async def record_agreement(
    db: Executor, *, source: str, split: str, reports: dict[str, dict[str, Any]]
) -> datetime:
    """Store one evaluation: `reports` by scorer name, each `pipeline.evaluate`'s accuracy
    report with the scorer's `model` (label) and `scale`. Returns its time."""
    async with transaction(db) as conn:
        evaluated_at = None
        for name, r in reports.items():
            top1_low, top1_high = r.get("top1_ci") or (None, None)
            pair_low, pair_high = r.get("pairwise_ci") or (None, None)
            evaluated_at = await conn.fetchval(
                RECORD_AGREEMENT_SQL, source, split, r["examples"], name, r["model"],
                r["scale"], r["n"], r["ties"], r["top1"], top1_low, top1_high, r["chance"],
                r["pairwise"], pair_low, pair_high, r["pairwise_n"], json.dumps(r),
            )  # fmt: skip
    assert evaluated_at is not None, "no reports to record"
    return evaluated_at


async def latest_agreement(db: Executor) -> list[Agreement]:
    """The rows of the latest evaluation (none: an empty list)."""
    return [Agreement(**dict(r)) for r in await db.fetch(LATEST_AGREEMENT_SQL)]
