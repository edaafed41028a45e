"""The analysts' views' arithmetic, checked against references computed here."""

from __future__ import annotations

import math

import pytest

from db import models
from db.choices import record_choice
from tests.factories import ready_round

Z95 = 1.96  # the views' 95 % quantile


def wilson_reference(wins: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval as the two roots in p of (p̂ - p)² = z² p (1 - p) / n,
    solved as a quadratic (a derivation of its own, not the views' closed form)."""
    observed = wins / n
    a = 1 + z * z / n
    b = -(2 * observed + z * z / n)
    c = observed * observed
    root = math.sqrt(b * b - 4 * a * c)
    return (-b - root) / (2 * a), (-b + root) / (2 * a)


# (wins, decided rounds) of each candidate against the base: none or all won, one round,
# and a few in between.
RECORDS = [(0, 1), (1, 1), (3, 4), (7, 20), (0, 5), (12, 12)]


async def test_ab_win_rates_wilson_interval_agrees_with_a_reference(pool) -> None:  # type: ignore[no-untyped-def]
    base = await models.ensure_base(pool, kind="sd_base", artifact="tiny-sd")
    candidates = []
    requester = iter(range(1000, 2000))
    for wins, n in RECORDS:
        candidate = await models.register(
            pool, kind="sd_adapter", artifact=f"/m/{wins}-{n}", parent_id=base.id
        )
        candidates.append(candidate.id)
        for i in range(n):
            # Two images each, so the round counts; the requester picks position 2
            # (the candidate's) or 1 (the base's).
            user = next(requester)
            round_id = await ready_round(
                pool,
                requester=user,
                prompt=f"p{user}",
                model_version_ids={1: base.id, 2: candidate.id, 3: base.id, 4: candidate.id},
            )
            await record_choice(
                pool,
                round_id=round_id,
                discord_user_id=user,
                verdict="pick",
                position=2 if i < wins else 1,
            )

    rows = await pool.fetch(
        "SELECT version_id, opponent_id, rounds, wins, win_rate, win_rate_low, win_rate_high"
        " FROM ab_win_rates"
    )
    by_pair = {(r["version_id"], r["opponent_id"]): r for r in rows}
    assert len(by_pair) == 2 * len(RECORDS)
    for candidate_id, (wins, n) in zip(candidates, RECORDS, strict=True):
        for pair, won in (((candidate_id, base.id), wins), ((base.id, candidate_id), n - wins)):
            row = by_pair[pair]
            assert (row["rounds"], row["wins"], row["win_rate"]) == (n, won, won / n)
            low, high = wilson_reference(won, n)
            assert (row["win_rate_low"], row["win_rate_high"]) == pytest.approx(
                (low, high), abs=1e-12
            )
    # A known value: 7 of 20 (Wilson 95 %: 0.1812 … 0.5671).
    seven = by_pair[(candidates[3], base.id)]
    assert (seven["win_rate_low"], seven["win_rate_high"]) == pytest.approx(
        (0.18119, 0.56715), abs=1e-5
    )
