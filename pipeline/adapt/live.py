"""The live measurement of adapters in A/B testing, and the decision it leads to.

An adapter in `testing` makes half the images of a share of rounds (`pipeline.serving`),
beside the incumbent (the serving adapter, or the base pipeline). Its live record against
the incumbent counts the rounds that showed both, as many images each, and that the
requester decided by picking an image: ties, "none of these", flagged choices and choices
of banned users decide nothing. The rounds are read from the analysts' `ab_decisions` view,
so the platform decides on rounds analysts can see.

**The test.** The review runs every few minutes, and checking a 95% interval each time
until it excludes one half would promote or retire an adapter no better than the incumbent
by chance alone, sooner or later. So the decision is a group-sequential test with planned
looks, each taken once:

- look k (k = 1 … L, L = `adapt.max_live_rounds` // `adapt.min_live_rounds`) is taken as
  soon as k × `min_live_rounds` rounds are decided, on exactly the first k × m decided
  rounds in the order they were decided (later rounds wait for the next look);
- each look computes the Wilson interval of the win rate at the confidence
  1 − (1 − `adapt.live_confidence`) / L (Bonferroni over the looks): promote if it lies
  above one half, retire if it lies below; otherwise keep testing;
- after look L without a decision the adapter is retired as inconclusive, and so it is
  after `adapt.max_live_days` days in testing.

Under "no better, no worse" (a win rate of one half) the chance that any of the L looks
promotes or retires is then at most 1 − `live_confidence`, however long the review runs.
The looks taken are stored in the version's metrics (`live.looks`, with the design and the
opponent they were taken against), so a look is never taken again with more rounds, nor
changed by a choice edited or a user banned after it; when the incumbent changes (another
adapter was promoted) or the design does, the test starts over.

`decide` is the policy, a pure function. `review` applies it to every adapter in testing
(DB-only work: it runs in the scheduler and as `hps adapt review`) in one transaction under
the registry's lock, so a maintainer's /promote or a second review cannot interleave;
promotions and retirements NOTIFY the bot, which posts them to the log channel. No torch
here: the scheduler imports this module.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from statistics import NormalDist
from typing import Any

from db import models, stats
from db.connect import Executor, transaction
from hps.settings import AdaptSettings
from pipeline.intervals import wilson_interval

log = logging.getLogger(__name__)

KIND = "sd_adapter"


@dataclass(frozen=True)
class Design:
    """The planned looks: at `every`, 2 × `every`, … `looks` × `every` decided rounds, with
    `confidence` over all of them together."""

    every: int
    looks: int
    confidence: float

    @classmethod
    def of(cls, settings: AdaptSettings) -> Design:
        looks = max(1, settings.max_live_rounds // settings.min_live_rounds)
        return cls(settings.min_live_rounds, looks, settings.live_confidence)

    @property
    def look_confidence(self) -> float:
        """Each look's confidence (Bonferroni)."""
        return 1 - (1 - self.confidence) / self.looks

    @property
    def z(self) -> float:
        return NormalDist().inv_cdf(1 - (1 - self.look_confidence) / 2)

    @property
    def horizon(self) -> int:
        """The decided rounds of the last look."""
        return self.looks * self.every

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Look:
    look: int  # 1 … Design.looks
    rounds: int  # look × Design.every
    wins: int
    low: float
    high: float

    @property
    def win_rate(self) -> float:
        return self.wins / self.rounds

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Decision:
    action: str  # promote | retire | keep
    reason: str
    looks: tuple[Look, ...] = field(default=())  # every look taken so far, this review's too


def _percent(share: float) -> str:
    return f"{share:.1%}".replace(".0%", "%")


def describe(live: stats.LiveResult | None, opponent: str) -> str:
    """The running record (the `ab_win_rates` view: all decided rounds, 95% interval)."""
    if live is None or not live.rounds:
        return f"no decided A/B rounds against {opponent} yet"
    return (
        f"live win rate {live.win_rate:.1%} (95% CI {live.low:.1%}–{live.high:.1%}, "
        f"{live.wins} of {live.rounds} rounds) against {opponent}"
    )


def describe_look(look: Look, design: Design, opponent: str) -> str:
    """A look's figures, at the look's own confidence; which look, when there are several."""
    text = (
        f"live win rate {look.win_rate:.1%} ({_percent(design.look_confidence)} CI "
        f"{look.low:.1%}–{look.high:.1%}, {look.wins} of {look.rounds} rounds) against "
        f"{opponent}"
    )
    return text if design.looks == 1 else f"{text} at look {look.look} of {design.looks}"


def decide(
    outcomes: Sequence[bool],
    design: Design,
    *,
    opponent: str,
    taken: Sequence[Look] = (),
    live: stats.LiveResult | None = None,
    days: float = 0,
    max_days: float = 0,
) -> Decision:
    """What to do with an adapter in testing. `outcomes`: whether it won each decided round
    against `opponent`, oldest first; `taken`: the looks an earlier review took (kept as
    they were); `live`: the running record, for the words; `days`: how long it has been in
    testing. Each planned look not taken yet whose rounds are all decided is taken now, in
    order, until one decides."""
    looks = list(taken)
    for k in range(1, design.looks + 1):
        if k > len(looks):
            n = k * design.every
            if len(outcomes) < n:
                break
            wins = sum(outcomes[:n])
            looks.append(Look(k, n, wins, *wilson_interval(wins, n, design.z)))
        look = looks[k - 1]
        figures = describe_look(look, design, opponent)
        if look.low > 0.5:
            return Decision("promote", f"{figures}: significantly better", tuple(looks))
        if look.high < 0.5:
            return Decision("retire", f"{figures}: significantly worse", tuple(looks))
        if k == design.looks:
            reason = f"{figures}: no significant difference after {look.rounds} rounds"
            return Decision("retire", reason, tuple(looks))
    figures = describe(live, opponent)
    if max_days and days >= max_days:
        return Decision("retire", f"{figures}: no decision after {days:.1f} days", tuple(looks))
    following = len(looks) + 1
    which = "" if design.looks == 1 else f" {following} of {design.looks}"
    reason = f"{figures}; the next look{which} is at {following * design.every} decided rounds"
    return Decision("keep", reason, tuple(looks))


def looks_taken(
    version: models.ModelVersion, opponent: models.ModelVersion | None, design: Design
) -> list[Look]:
    """The looks an earlier review stored, if taken against the same opponent with the same
    design (otherwise the test starts over)."""
    record = version.metrics.get("live") or {}
    if (
        opponent is None
        or record.get("opponent_id") != opponent.id
        or record.get("design") != design.as_json()
    ):
        return []
    return [Look(**look) for look in record.get("looks", [])]


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
    measured afresh against it). Each version's live record, with the looks taken, is
    stored in its metrics (`live`) as of this review."""
    now = now or datetime.now(UTC)
    design = Design.of(settings)
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
            outcomes = (
                await models.live_outcomes(conn, version.id, opponent.id, design.horizon)
                if opponent
                else []
            )
            since = await models.testing_since(conn, version.id) or version.created_at
            decision = decide(
                outcomes,
                design,
                opponent=opponent.name if opponent else "no serving version",
                taken=looks_taken(version, opponent, design),
                live=records.get(version.id),
                days=(now - since).total_seconds() / 86400,
                max_days=settings.max_live_days,
            )
            reviews.append(Review(version, opponent, records.get(version.id), decision))
        better = [r for r in reviews if r.decision.action == "promote"]
        best = max(better, key=lambda r: r.decision.looks[-1].low, default=None)
        for i, r in enumerate(reviews):
            if r.decision.action == "promote" and r is not best:
                assert best is not None
                reason = f"{r.decision.reason}, but {best.version.name} did better and serves"
                decision = Decision("keep", reason, r.decision.looks)
                reviews[i] = Review(r.version, r.opponent, r.live, decision)
        if apply:
            for r in reviews:
                metrics = {"live": live_metrics(r.live, opponent, now, design, r.decision.looks)}
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
    live: stats.LiveResult | None,
    opponent: models.ModelVersion | None,
    now: datetime,
    design: Design | None = None,
    looks: Sequence[Look] = (),
) -> dict[str, Any]:
    """A live record as stored in a version's metrics (what it was when last reviewed):
    the running record, and the test's design and the looks it took."""
    record: dict[str, Any] = live.as_json() if live else {"rounds": 0, "wins": 0}
    record.update(opponent=opponent.name if opponent else None, as_of=now.isoformat())
    if opponent is not None:
        record["opponent_id"] = opponent.id
    if design is not None:
        record.update(design=design.as_json(), looks=[look.as_json() for look in looks])
    return record
