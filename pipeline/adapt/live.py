"""The live measurement of adapters in A/B testing, and the decision it leads to.

An adapter in `testing` makes half the images of a share of rounds (`pipeline.serving`),
beside the incumbent (the serving adapter, or the base pipeline). Its live record against
the incumbent counts the rounds that showed both and that the requester decided by picking
an image: ties, "none of these", flagged choices and choices of banned users decide
nothing. It is read from the analysts' `ab_win_rates` view (`db.stats.live_results`), so
the platform decides on exactly the numbers analysts see, with the same Wilson 95% interval.

`decide` is the policy, a pure function: once `adapt.min_live_rounds` rounds are decided,
promote if the interval lies above one half (significantly better), retire if it lies below
(significantly worse); otherwise keep testing, or retire as inconclusive after
`max_live_rounds` rounds or `max_live_days` days when those are set. `review` applies it to
every adapter in testing (DB-only work: it runs in the scheduler and as `hps adapt review`)
in one transaction under the registry's lock, so a maintainer's /promote or a second review
cannot interleave; promotions and retirements NOTIFY the bot, which posts them to the log
channel. No torch here: the scheduler imports this module.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from db import models, stats
from db.connect import Executor, transaction
from hps.settings import AdaptSettings

log = logging.getLogger(__name__)

KIND = "sd_adapter"


@dataclass(frozen=True)
class Decision:
    action: str  # promote | retire | keep
    reason: str


def describe(live: stats.LiveResult | None, opponent: str) -> str:
    if live is None or not live.rounds:
        return f"no decided A/B rounds against {opponent} yet"
    return (
        f"live win rate {live.win_rate:.1%} (95% CI {live.low:.1%}–{live.high:.1%}, "
        f"{live.wins} of {live.rounds} rounds) against {opponent}"
    )


def decide(
    live: stats.LiveResult | None,
    *,
    opponent: str,
    min_rounds: int,
    max_rounds: int = 0,
    max_days: float = 0,
    days: float = 0,
) -> Decision:
    """What to do with an adapter in testing, given its live record against `opponent`
    and how long (days) it has been in testing."""
    rounds = live.rounds if live else 0
    figures = describe(live, opponent)
    if live is not None and rounds >= min_rounds:
        if live.low > 0.5:
            return Decision("promote", f"{figures}: significantly better")
        if live.high < 0.5:
            return Decision("retire", f"{figures}: significantly worse")
    if max_rounds and rounds >= max_rounds:
        return Decision("retire", f"{figures}: no significant difference after {rounds} rounds")
    if max_days and days >= max_days:
        return Decision("retire", f"{figures}: no decision after {days:.1f} days")
    if rounds < min_rounds:
        return Decision("keep", f"{figures}; {min_rounds} needed to decide")
    return Decision("keep", f"{figures}: not significant yet")


@dataclass(frozen=True)
class Review:
    version: models.ModelVersion
    opponent: models.ModelVersion | None
    live: stats.LiveResult | None
    decision: Decision


async def review(
    pool: Executor,
    settings: AdaptSettings,
    *,
    actor: str = "review",
    apply: bool = True,
    now: datetime | None = None,
) -> list[Review]:
    """Decide on every adapter in testing against the incumbent (and act on it unless
    `apply` is false), in one transaction under the registry's lock: all are judged on the
    same incumbent, retirements are applied first, and of several significantly better
    candidates only the one with the highest lower bound is promoted (the others are then
    measured afresh against it). Each version's live record is stored in its metrics
    (`live`) as of this review."""
    now = now or datetime.now(UTC)
    async with transaction(pool) as conn:
        await models.lock_kind(conn, KIND)
        candidates = await models.testing(conn, KIND)
        opponent = await models.sd_incumbent(conn)
        records = (
            await stats.live_results(conn, [v.id for v in candidates], opponent.id)
            if opponent
            else {}
        )
        reviews = []
        for version in candidates:
            live = records.get(version.id)
            since = await models.testing_since(conn, version.id) or version.created_at
            decision = decide(
                live,
                opponent=opponent.name if opponent else "no serving version",
                min_rounds=settings.min_live_rounds,
                max_rounds=settings.max_live_rounds,
                max_days=settings.max_live_days,
                days=(now - since).total_seconds() / 86400,
            )
            reviews.append(Review(version, opponent, live, decision))
        better = [r for r in reviews if r.decision.action == "promote"]
        best = max(better, key=lambda r: r.live.low if r.live else 0.0, default=None)
        for i, r in enumerate(reviews):
            if r.decision.action == "promote" and r is not best:
                assert best is not None
                reason = f"{r.decision.reason}, but {best.version.name} did better and serves"
                reviews[i] = Review(r.version, r.opponent, r.live, Decision("keep", reason))
        if apply:
            for r in reviews:
                metrics = {"live": live_metrics(r.live, opponent, now)}
                await models.merge_metrics(conn, r.version.id, metrics)
            for r in sorted(reviews, key=lambda r: r.decision.action != "retire"):
                if r.decision.action == "retire":
                    await models.retire(conn, r.version.id, actor=actor, reason=r.decision.reason)
                elif r.decision.action == "promote":
                    await models.promote(conn, r.version.id, actor=actor, reason=r.decision.reason)
    for r in reviews:
        log.info(
            "review of %s: %s (%s)",
            r.version.name,
            r.decision.action,
            r.decision.reason,
            extra={"model_version_id": r.version.id, "action": r.decision.action},
        )
    return reviews


def live_metrics(
    live: stats.LiveResult | None, opponent: models.ModelVersion | None, now: datetime
) -> dict[str, Any]:
    """A live record as stored in a version's metrics (what it was when last reviewed)."""
    record: dict[str, Any] = live.as_json() if live else {"rounds": 0, "wins": 0}
    record.update(opponent=opponent.name if opponent else None, as_of=now.isoformat())
    return record
