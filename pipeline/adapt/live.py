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
every adapter in testing (DB-only work: it runs in the scheduler and as `hps adapt review`);
each decision is one transaction under the registry's lock, so a maintainer's /promote or a
second review cannot interleave, and promotions and retirements NOTIFY the bot, which posts
them to the log channel. No torch here: the scheduler imports this module.
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
    """Decide on every adapter in testing (and act on it unless `apply` is false); each
    version's live record is stored in its metrics (`live`) as of this review."""
    now = now or datetime.now(UTC)
    reviews = []
    for candidate in await models.testing(pool, KIND):
        async with transaction(pool) as conn:
            await models.lock_kind(conn, KIND)
            version = await models.get(conn, candidate.id)
            if version is None or version.status != "testing":
                continue  # promoted or retired meanwhile
            opponent = await models.sd_incumbent(conn)
            live = None
            if opponent is not None:
                live = (await stats.live_results(conn, [version.id], opponent.id)).get(version.id)
            since = await models.testing_since(conn, version.id) or version.created_at
            decision = decide(
                live,
                opponent=opponent.name if opponent else "no serving version",
                min_rounds=settings.min_live_rounds,
                max_rounds=settings.max_live_rounds,
                max_days=settings.max_live_days,
                days=(now - since).total_seconds() / 86400,
            )
            if apply:
                await models.merge_metrics(
                    conn, version.id, {"live": live_metrics(live, opponent, now)}
                )
                if decision.action == "promote":
                    await models.promote(conn, version.id, actor=actor, reason=decision.reason)
                elif decision.action == "retire":
                    await models.retire(conn, version.id, actor=actor, reason=decision.reason)
            reviews.append(Review(version, opponent, live, decision))
        log.info(
            "review of %s: %s (%s)",
            version.name,
            decision.action,
            decision.reason,
            extra={"model_version_id": version.id, "action": decision.action},
        )
    return reviews


def live_metrics(
    live: stats.LiveResult | None, opponent: models.ModelVersion | None, now: datetime
) -> dict[str, Any]:
    """A live record as stored in a version's metrics (what it was when last reviewed)."""
    record: dict[str, Any] = live.as_json() if live else {"rounds": 0, "wins": 0}
    record.update(opponent=opponent.name if opponent else None, as_of=now.isoformat())
    return record
