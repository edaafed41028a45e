"""Live A/B measurement: the serving share, the win-rate accounting of the analysts' view on
crafted choices, the decisions it leads to, and the review that applies them."""

from __future__ import annotations

import math
import random
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from db import models, stats, users
from db.choices import record_choice
from db.models import MODELS_CHANNEL
from hps.settings import AdaptSettings
from pipeline.adapt.live import decide, review
from pipeline.serving import plan_round
from tests.db.test_rounds import Listener
from tests.factories import ready_round

A_B = {1: "base", 2: "candidate", 3: "base", 4: "candidate"}  # who made each position


def wilson(wins: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = wins / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def test_ab_rounds_mix_both_versions_in_the_configured_share() -> None:
    rng = random.Random(5)
    plans = [plan_round(4, 1, [2, 3], ab_share=0.25, rng=rng) for _ in range(4000)]
    mixed = [p for p in plans if p.mixed]
    assert 900 <= len(mixed) <= 1100  # 1000 expected (σ ≈ 27)
    # Every mixed round shows both versions, two images each; the candidates share evenly.
    assert all(Counter(p.versions) == {1: 2, p.candidate: 2} for p in mixed)
    by_candidate = Counter(p.candidate for p in mixed)
    assert abs(by_candidate[2] - by_candidate[3]) <= 150
    images = Counter(v for p in plans for v in p.versions)
    assert images[1] / sum(images.values()) == pytest.approx(1 - 0.25 / 2, abs=0.015)


async def _ab_round(pool, versions: dict[str, int], requester: int, **kwargs) -> int:  # type: ignore[no-untyped-def]
    ids = {position: versions[who] for position, who in A_B.items()}
    return await ready_round(
        pool, requester=requester, model_version_ids=ids, prompt=f"p{requester}", **kwargs
    )


async def _pick(pool, round_id: int, user: int, who: str) -> None:  # type: ignore[no-untyped-def]
    position = 2 if who == "candidate" else 1
    await record_choice(pool, round_id=round_id, discord_user_id=user, verdict="pick",
                        position=position)  # fmt: skip


async def _versions(pool) -> dict[str, int]:  # type: ignore[no-untyped-def]
    base = await models.ensure_base(pool, kind="sd_base", artifact="tiny-sd")
    candidate = await models.register(pool, kind="sd_adapter", artifact="/m/a", parent_id=base.id)
    await models.start_testing(pool, candidate.id, actor="test")
    return {"base": base.id, "candidate": candidate.id}


async def test_win_rates_count_only_decided_a_b_rounds_of_counted_requesters(pool) -> None:  # type: ignore[no-untyped-def]
    versions = await _versions(pool)
    user = iter(range(1000, 2000))
    for _ in range(10):  # the requester picks the candidate's image
        r = await _ab_round(pool, versions, requester := next(user))
        await _pick(pool, r, requester, "candidate")
    for _ in range(5):  # ... the incumbent's
        r = await _ab_round(pool, versions, requester := next(user))
        await _pick(pool, r, requester, "base")
    # None of these decide anything:
    for verdict in ("tie", "tie", "none"):
        r = await _ab_round(pool, versions, requester := next(user))
        await record_choice(pool, round_id=r, discord_user_id=requester, verdict=verdict)
    r = await _ab_round(pool, versions, next(user))  # only someone else voted
    await _pick(pool, r, 9999, "candidate")
    r = await _ab_round(pool, versions, shadow := next(user))  # flagged: shadow-banned first
    await users.ban(pool, shadow, shadow=True, reason="spam", actor="test")
    await _pick(pool, r, shadow, "candidate")
    r = await _ab_round(pool, versions, later := next(user))  # banned after voting
    await _pick(pool, r, later, "candidate")
    await users.ban(pool, later, reason="spam", actor="test")
    r = await ready_round(pool, requester=(only_base := next(user)),
                          model_version_ids=dict.fromkeys(A_B, versions["base"]))  # fmt: skip
    await _pick(pool, r, only_base, "base")  # not an A/B round
    r = await _ab_round(pool, versions, hidden := next(user), nsfw_positions=(2, 4))
    await _pick(pool, r, hidden, "base")  # the candidate's images were never shown

    live = await stats.live_results(pool, [versions["candidate"]], versions["base"])
    result = live[versions["candidate"]]
    assert (result.rounds, result.wins, result.win_rate) == (15, 10, 10 / 15)
    assert (result.low, result.high) == pytest.approx(wilson(10, 15), abs=1e-12)
    assert result.low == pytest.approx(0.41714, abs=1e-5)
    mirror = (await stats.live_results(pool, [versions["base"]], versions["candidate"]))[
        versions["base"]
    ]
    assert (mirror.rounds, mirror.wins) == (15, 5)
    assert await stats.live_results(pool, [versions["candidate"]], 424242) == {}

    # Not enough to decide: 10/15 is not significantly above one half.
    keep = decide(result, opponent="base", min_rounds=15)
    assert keep.action == "keep" and keep.reason == (
        "live win rate 66.7% (95% CI 41.7%–84.8%, 10 of 15 rounds) against base: "
        "not significant yet"
    )
    # Ten more wins: 20/25, lower bound 0.609 > 0.5.
    for _ in range(10):
        r = await _ab_round(pool, versions, requester := next(user))
        await _pick(pool, r, requester, "candidate")
    result = (await stats.live_results(pool, [versions["candidate"]], versions["base"]))[
        versions["candidate"]
    ]
    assert (result.rounds, result.wins) == (25, 20)
    assert result.low == pytest.approx(wilson(20, 25)[0], abs=1e-12)
    assert decide(result, opponent="base", min_rounds=25).action == "promote"
    assert decide(result, opponent="base", min_rounds=26).action == "keep"
    assert mirror.high > 0.5  # 5/15 for the base: not significantly worse either


def test_decisions_follow_the_interval_and_the_limits() -> None:
    def live(wins: int, rounds: int) -> stats.LiveResult:
        low, high = wilson(wins, rounds)
        return stats.LiveResult(1, 2, rounds, wins, wins / rounds, low, high)

    assert decide(None, opponent="b", min_rounds=10).reason == (
        "no decided A/B rounds against b yet; 10 needed to decide"
    )
    assert decide(live(9, 10), opponent="b", min_rounds=10).action == "promote"  # low 0.596
    assert decide(live(9, 10), opponent="b", min_rounds=11).action == "keep"
    worse = decide(live(2, 20), opponent="b", min_rounds=20)  # high 0.30
    assert worse.action == "retire" and worse.reason.endswith("significantly worse")
    assert decide(live(12, 20), opponent="b", min_rounds=20).action == "keep"
    inconclusive = decide(live(12, 20), opponent="b", min_rounds=20, max_rounds=20)
    assert inconclusive.action == "retire"
    assert inconclusive.reason.endswith("no significant difference after 20 rounds")
    stale = decide(live(3, 5), opponent="b", min_rounds=20, max_days=7, days=7.5)
    assert stale.action == "retire" and stale.reason.endswith("no decision after 7.5 days")
    assert decide(live(3, 5), opponent="b", min_rounds=20, max_days=7, days=6).action == "keep"


async def test_the_review_promotes_the_better_retires_the_worse_and_notifies(
    pool, database_url: str
) -> None:  # type: ignore[no-untyped-def]
    versions = await _versions(pool)
    loser = await models.register(pool, kind="sd_adapter", artifact="/m/b")
    await models.start_testing(pool, loser.id, actor="test")
    losing = {"base": versions["base"], "candidate": loser.id}
    user = iter(range(3000, 4000))
    for n in range(12):
        r = await _ab_round(pool, versions, requester := next(user))
        await _pick(pool, r, requester, "candidate" if n < 11 else "base")  # 11/12
        r = await _ab_round(pool, losing, requester := next(user))
        await _pick(pool, r, requester, "candidate" if n < 1 else "base")  # 1/12
    settings = AdaptSettings(min_live_rounds=12)

    dry = await review(pool, settings, apply=False)
    assert [(r.version.id, r.decision.action) for r in dry] == [
        (versions["candidate"], "promote"),
        (loser.id, "retire"),
    ]
    assert (await models.get(pool, loser.id)).status == "testing"  # nothing applied

    now = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    async with Listener(database_url, MODELS_CHANNEL) as heard:
        done = await review(pool, settings, actor="review", now=now)
        retired, promoted = await heard.next(), await heard.next()  # retirements first
    assert [r.decision.action for r in done] == ["promote", "retire"]
    winner = await models.serving(pool, "sd_adapter")
    assert winner.id == versions["candidate"]
    assert (await models.serving(pool, "sd_base")).id == versions["base"]  # the base stays
    assert (await models.get(pool, loser.id)).status == "retired"
    recorded = dict(winner.metrics["live"])
    assert recorded.pop("win_rate_ci") == pytest.approx(wilson(11, 12), abs=1e-12)
    assert recorded == {
        "opponent_id": versions["base"],
        "rounds": 12,
        "wins": 11,
        "win_rate": 11 / 12,
        "opponent": "sd_base:tiny-sd",
        "as_of": now.isoformat(),
    }
    assert promoted == {
        "version_id": winner.id,
        "name": winner.name,
        "kind": "sd_adapter",
        "action": "promoted",
        "actor": "review",
        "reason": done[0].decision.reason,
        "replaced": None,
    }
    assert done[0].decision.reason.startswith("live win rate 91.7% (95% CI 64.6%–98.5%, 11 of 12")
    assert (retired["action"], retired["version_id"]) == ("retired", loser.id)
    assert retired["reason"].endswith("against sd_base:tiny-sd: significantly worse")

    # A new candidate is measured against the promoted adapter, from zero.
    third = await models.register(pool, kind="sd_adapter", artifact="/m/c")
    await models.start_testing(pool, third.id, actor="test")
    [again] = await review(pool, settings, now=now + timedelta(days=1))
    assert again.opponent.id == winner.id and again.live is None
    assert again.decision.action == "keep"
    assert (await models.get(pool, third.id)).metrics["live"]["rounds"] == 0


async def test_of_two_better_candidates_the_review_promotes_the_surer_one(pool) -> None:  # type: ignore[no-untyped-def]
    versions = await _versions(pool)
    other = await models.register(pool, kind="sd_adapter", artifact="/m/b")
    await models.start_testing(pool, other.id, actor="test")
    second = {"base": versions["base"], "candidate": other.id}
    user = iter(range(5000, 6000))
    for n in range(12):
        r = await _ab_round(pool, versions, requester := next(user))
        await _pick(pool, r, requester, "candidate" if n < 10 else "base")  # 10/12: low 0.55
        r = await _ab_round(pool, second, requester := next(user))
        await _pick(pool, r, requester, "candidate")  # 12/12: low 0.76
    done = await review(pool, AdaptSettings(min_live_rounds=12))
    assert [r.decision.action for r in done] == ["keep", "promote"]
    assert done[0].decision.reason.endswith(f"but {other.name} did better and serves")
    assert (await models.serving(pool, "sd_adapter")).id == other.id
    assert (await models.get(pool, versions["candidate"])).status == "testing"
