"""Live A/B measurement: the serving share, the win-rate accounting of the analysts' view on
crafted choices, the decisions it leads to, and the review that applies them."""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from datetime import UTC, datetime, timedelta
from statistics import NormalDist
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from db import models, stats, users
from db.choices import record_choice
from db.models import MODELS_CHANNEL
from hps.settings import AdaptSettings, load_settings
from pipeline.adapt.live import Design, Look, decide, review
from pipeline.generate import _serving_versions
from pipeline.serving import plan_round
from tests.db.test_rounds import Listener
from tests.factories import ready_round

A_B = {1: "base", 2: "candidate", 3: "base", 4: "candidate"}  # who made each position


def wilson(wins: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = wins / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def same_look(look: Look | dict, k: int, n: int, wins: int, z: float) -> bool:
    """`look` is look k, on n rounds with `wins`, with the Wilson interval at `z`."""
    look = Look(**look) if isinstance(look, dict) else look
    interval = pytest.approx(wilson(wins, n, z), abs=1e-12)
    return (look.look, look.rounds, look.wins) == (k, n, wins) and (look.low, look.high) == interval


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

    assert mirror.high > 0.5  # 5/15 for the base: not significantly worse either


async def test_only_rounds_showing_as_many_images_of_each_version_count(pool) -> None:  # type: ignore[no-untyped-def]
    versions = await _versions(pool)
    base, candidate = versions["base"], versions["candidate"]
    fair = await _ab_round(pool, versions, 1001)
    await _pick(pool, fair, 1001, "candidate")
    # The safety filter held back one of the candidate's two images: 2 against 1.
    held_back = await _ab_round(pool, versions, 1002, nsfw_positions=(4,))
    await _pick(pool, held_back, 1002, "base")
    # ... one of each: 1 against 1 again, a fair round.
    one_each = await _ab_round(pool, versions, 1003, nsfw_positions=(3, 4))
    await _pick(pool, one_each, 1003, "candidate")
    # Three images against one (as an odd split once made): not fair either.
    three_one = {1: base, 2: candidate, 3: base, 4: base}
    uneven = await ready_round(pool, requester=1004, prompt="p1004", model_version_ids=three_one)
    await _pick(pool, uneven, 1004, "base")

    balanced = dict(await pool.fetch("SELECT round_id, balanced FROM ab_rounds"))
    assert balanced == {fair: True, held_back: False, one_each: True, uneven: False}
    decided = await pool.fetch("SELECT round_id FROM ab_decisions WHERE version_id = $1", base)
    assert sorted(r["round_id"] for r in decided) == [fair, one_each]
    result = (await stats.live_results(pool, [candidate], base))[candidate]
    assert (result.rounds, result.wins) == (2, 2)
    assert await models.live_outcomes(pool, candidate, base, 10) == [True, True]


def test_the_live_test_decides_at_its_planned_looks_only() -> None:
    """Three looks at 20, 40 and 60 decided rounds, 95% over the three: each at 98.33%."""
    design = Design(every=20, looks=3, confidence=0.95)
    z = NormalDist().inv_cdf(1 - 0.05 / 3 / 2)
    assert design.z == pytest.approx(z) and design.look_confidence == pytest.approx(1 - 0.05 / 3)

    def wins(*counts: tuple[int, int]) -> list[bool]:
        """Blocks of (wins, rounds), wins first in each block."""
        return [i < w for w, n in counts for i in range(n)]

    assert decide(wins((15, 19)), design, opponent="b").reason == (
        "no decided A/B rounds against b yet; the next look 1 of 3 is at 20 decided rounds"
    )
    # 15 of 20: a plain 95% interval (0.531–0.888) would promote; the look's does not.
    assert wilson(15, 20, 1.959964)[0] > 0.5
    kept = decide(wins((15, 20)), design, opponent="b")
    assert kept.action == "keep"
    assert kept.reason.endswith("the next look 2 of 3 is at 40 decided rounds")
    [look] = kept.looks
    assert same_look(look, 1, 20, 15, z)
    # 27 of 35 is significant at 95% (0.61–0.88), but the second look waits for 40 rounds.
    assert wilson(27, 35, 1.959964)[0] > 0.5
    assert decide(wins((12, 20), (15, 15)), design, opponent="b").action == "keep"
    # At 40: 32 wins, decided on exactly the first 40 (the ten losses after them wait).
    promoted = decide(wins((12, 20), (20, 20), (0, 10)), design, opponent="b")
    low, high = wilson(32, 40, z)
    assert promoted.action == "promote" and same_look(promoted.looks[-1], 2, 40, 32, z)
    assert promoted.reason == (
        f"live win rate 80.0% (98.3% CI {low:.1%}–{high:.1%}, 32 of 40 rounds) against b at "
        "look 2 of 3: significantly better"
    )
    worse = decide(wins((3, 20)), design, opponent="b")
    assert worse.action == "retire" and worse.reason.endswith(
        "3 of 20 rounds) against b at look 1 of 3: significantly worse"
    )
    # No look decides: retired at the last one, whatever comes after it.
    last = decide(wins((11, 20), (11, 20), (11, 20), (30, 30)), design, opponent="b")
    assert [look.wins for look in last.looks] == [11, 22, 33] and last.action == "retire"
    assert last.reason.endswith("at look 3 of 3: no significant difference after 60 rounds")
    # A look taken is not taken again, whatever the rounds say now.
    taken = (Look(1, 20, 10, 0.28, 0.72),)
    again = decide(wins((20, 20)), design, opponent="b", taken=taken)
    assert again.action == "keep" and again.looks == taken
    stale = decide(wins((3, 5)), design, opponent="b", days=29, max_days=28)
    assert stale.action == "retire" and stale.reason.endswith("no decision after 29.0 days")
    assert decide(wins((3, 5)), design, opponent="b", days=27, max_days=28).action == "keep"
    # One look: the plain fixed-size test at the configured confidence.
    single = Design(every=10, looks=1, confidence=0.95)
    assert single == Design.of(AdaptSettings(min_live_rounds=10, max_live_rounds=19))
    assert decide(wins((9, 10)), single, opponent="b").reason == (
        "live win rate 90.0% (95% CI 59.6%–98.2%, 9 of 10 rounds) against b: significantly better"
    )
    assert decide(wins((6, 10)), single, opponent="b").reason.endswith(
        "no significant difference after 10 rounds"
    )


def test_the_live_test_keeps_its_error_rate_when_a_draw_is_reviewed_forever() -> None:
    """2000 adapters exactly as good as the incumbent, 1000 decided rounds each: the planned
    looks (the defaults: every 200 rounds up to 1000) declare a difference in at most 5% of
    them; checking a plain 95% interval every 10 rounds from 200 on, in about a quarter."""
    design = Design.of(AdaptSettings())
    assert (design.every, design.looks, design.confidence) == (200, 5, 0.95)
    outcomes = np.random.default_rng(0).random((2000, design.horizon)) < 0.5
    decided = [decide(row.tolist(), design, opponent="b") for row in outcomes]
    false = sum("significantly" in d.reason for d in decided) / len(decided)
    assert false <= 0.05
    assert {d.action for d in decided} == {"promote", "retire"}  # all decided by the horizon

    def significant(wins: int, n: int) -> bool:
        low, high = wilson(wins, n)
        return low > 0.5 or high < 0.5

    running = np.cumsum(outcomes, axis=1)
    naive = [any(significant(int(w[n - 1]), n) for n in range(200, 1001, 10)) for w in running]
    assert sum(naive) / len(naive) > 0.15


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
    settings = AdaptSettings(min_live_rounds=12, max_live_rounds=12)  # one look, at 95%

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
    [look] = recorded.pop("looks")
    assert same_look(look, 1, 12, 11, NormalDist().inv_cdf(0.975))
    assert recorded == {
        "opponent_id": versions["base"],
        "rounds": 12,
        "wins": 11,
        "win_rate": 11 / 12,
        "opponent": "sd_base:tiny-sd",
        "as_of": now.isoformat(),
        "design": {"every": 12, "looks": 1, "confidence": 0.95},
    }
    assert promoted == {
        "version_id": winner.id,
        "name": winner.name,
        "kind": "sd_adapter",
        "action": "promoted",
        "actor": "review",
        "reason": done[0].decision.reason,
        "replaced": None,
        "event_id": promoted["event_id"],  # the event that keeps the notice
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
    done = await review(pool, AdaptSettings(min_live_rounds=12, max_live_rounds=12))
    assert [r.decision.action for r in done] == ["keep", "promote"]
    assert done[0].decision.reason.endswith(f"but {other.name} did better and serves")
    assert (await models.serving(pool, "sd_adapter")).id == other.id
    assert (await models.get(pool, versions["candidate"])).status == "testing"


async def test_live_by_recipe_counts_a_round_for_its_candidate_after_another_is_promoted(
    pool,
) -> None:  # type: ignore[no-untyped-def]
    """Each decided A/B round counts once, for the version that was not its incumbent: an
    older adapter that keeps testing after a newer one was promoted counts its rounds
    against the newer one, which counts none of them."""
    base = await models.ensure_base(pool, kind="sd_base", artifact="tiny-sd")

    async def adapter(artifact: str, recipe: str) -> models.ModelVersion:
        config = {"recipe": {"adapt": {"recipe": recipe}}}
        version = await models.register(
            pool, kind="sd_adapter", artifact=artifact, parent_id=base.id, config=config
        )
        await models.start_testing(pool, version.id, actor="test")
        return version

    older, newer = await adapter("/m/a", "dpo"), await adapter("/m/b", "hps")
    user = iter(range(7000, 8000))

    async def decided(candidate: int, incumbent: int, wins: int, losses: int) -> None:
        for n in range(wins + losses):
            versions = {"base": incumbent, "candidate": candidate}
            r = await _ab_round(pool, versions, requester := next(user), incumbent_id=incumbent)
            await _pick(pool, r, requester, "candidate" if n < wins else "base")

    await decided(older.id, base.id, 1, 1)  # both tested against the base
    await decided(newer.id, base.id, 2, 0)
    await models.promote(pool, newer.id, actor="test")
    assert (await models.get(pool, older.id)).status == "testing"
    await decided(older.id, newer.id, 3, 1)  # the older one, against the newer incumbent
    assert await stats.live_by_recipe(pool) == [
        {"recipe": "dpo", "versions": 1, "rounds": 6, "wins": 4},
        {"recipe": "hps", "versions": 1, "rounds": 2, "wins": 2},
    ]
    # Rounds made before incumbents were recorded (migration 0016, their generate jobs
    # gone) fall back to the newer version's side, which is wrong in just this case.
    await pool.execute("UPDATE rounds SET incumbent_version_id = NULL")
    assert await stats.live_by_recipe(pool) == [
        {"recipe": "dpo", "versions": 1, "rounds": 2, "wins": 1},
        {"recipe": "hps", "versions": 1, "rounds": 6, "wins": 3},
    ]


async def test_the_review_takes_each_look_once_on_the_rounds_decided_first(pool) -> None:  # type: ignore[no-untyped-def]
    """Looks at 6, 12 and 18 decided rounds (98.33% each): 5 of the first 6 keeps testing;
    a requester then changing their pick to a win does not redo that look; 11 of the first
    12 promotes, on those 12 (the 13th, decided after them, waits for the next look)."""
    versions = await _versions(pool)
    settings = AdaptSettings(min_live_rounds=6, max_live_rounds=18)
    z = Design.of(settings).z
    first = []
    for n in range(6):
        first.append(r := await _ab_round(pool, versions, 7000 + n))
        await _pick(pool, r, 7000 + n, "candidate" if n < 5 else "base")
    [kept] = await review(pool, settings)
    assert kept.decision.action == "keep"
    stored = (await models.get(pool, versions["candidate"])).metrics["live"]
    [look] = stored["looks"]
    assert same_look(look, 1, 6, 5, z)
    assert stored["design"] == {"every": 6, "looks": 3, "confidence": 0.95}
    # 6 of 6 now (0.511 at 98.33%: it would promote), but look 1 was taken on 5 of 6.
    await _pick(pool, first[5], 7005, "candidate")
    [still] = await review(pool, settings)
    assert still.decision.action == "keep" and still.live.wins == 6
    assert still.decision.reason.endswith("the next look 2 of 3 is at 12 decided rounds")
    for n in range(6, 13):
        r = await _ab_round(pool, versions, 7000 + n)
        await _pick(pool, r, 7000 + n, "candidate" if n < 11 else "base")
    [promoted] = await review(pool, settings)
    low, high = wilson(11, 12, z)
    assert (promoted.live.rounds, promoted.live.wins) == (13, 11)
    assert promoted.decision.action == "promote"
    assert promoted.decision.reason == (
        f"live win rate 91.7% (98.3% CI {low:.1%}–{high:.1%}, 11 of 12 rounds) against "
        "sd_base:tiny-sd at look 2 of 3: significantly better"
    )
    assert (await models.serving(pool, "sd_adapter")).id == versions["candidate"]


class _Generator:
    """What `_serving_versions` needs of a generator: the pipeline it runs, adapters."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.adapters: dict[str, str] = {}

    def load_adapter(self, name: str, artifact: str, identifier: str = "") -> None:
        self.adapters[name] = artifact

    def keep_adapters(self, names: set[str]) -> None:
        self.adapters = {k: v for k, v in self.adapters.items() if k in names}


async def test_a_new_configured_base_serves_and_a_b_rounds_count_against_it(pool) -> None:  # type: ignore[no-untyped-def]
    """generation.sd_model changed: the generator's pipeline becomes the serving base, so the
    images it tags and the incumbent the review measures against are the same version."""
    old = await models.ensure_base(pool, kind="sd_base", artifact="old-sd")
    candidate = await models.register(pool, kind="sd_adapter", artifact="/m/a")
    await models.start_testing(pool, candidate.id, actor="test")
    ctx = SimpleNamespace(pool=pool, log=logging.getLogger("test"), settings=load_settings())
    served = await _serving_versions(ctx, _Generator("new-sd"))  # type: ignore[arg-type]
    assert served.base.name == "sd_base:new-sd" and served.base.status == "serving"
    assert served.incumbent.id == served.base.id
    assert [c.id for c in served.candidates] == [candidate.id]
    assert (await models.get(pool, old.id)).status == "retired"
    assert (await models.sd_incumbent(pool)).id == served.base.id
    again = await _serving_versions(ctx, _Generator("new-sd"))  # type: ignore[arg-type]
    assert again.base.id == served.base.id  # nothing more to do
    [event] = [e for e in await models.events(pool, "sd_base") if e["action"] == "promoted"
               and e["name"] == "sd_base:new-sd"]  # fmt: skip
    assert event["reason"] == "the configured base model is now new-sd"

    ab = {"base": served.incumbent.id, "candidate": candidate.id}
    for n in range(6):
        r = await _ab_round(pool, ab, 8000 + n)
        await _pick(pool, r, 8000 + n, "candidate")
    [decided] = await review(pool, AdaptSettings(min_live_rounds=6, max_live_rounds=6))
    assert decided.opponent.id == served.base.id
    assert (decided.live.rounds, decided.live.wins) == (6, 6)
    assert decided.decision.action == "promote"


class _LoadingGenerator(_Generator):
    """Loads as the real one does: the source fetches the version from the store."""

    def load_adapter(self, name: str, source: Any, identifier: str = "") -> None:
        with source() as artifact:
            self.adapters[name] = artifact


async def test_a_candidate_the_store_cannot_serve_now_fails_the_job_rather_than_the_ab(
    pool,
    tmp_path,  # type: ignore[no-untyped-def]
) -> None:
    """An unreachable store is not a broken adapter: the generate job fails, saying which
    candidate could not be fetched (and is retried), instead of rounds silently serving the
    incumbent alone. A candidate that is not in the store at all is left out, as before."""
    from hps.store import StoreUnavailable
    from tests.s3 import store_section

    await models.ensure_base(pool, kind="sd_base", artifact="sd")
    candidate = await models.register(pool, kind="sd_adapter", artifact="models/a-1/" + "a" * 64)
    await models.start_testing(pool, candidate.id, actor="test")
    settings = load_settings(
        data_dir=tmp_path, store=store_section("http://127.0.0.1:9", "hps-bucket")
    )  # nothing listens there
    ctx = SimpleNamespace(pool=pool, log=logging.getLogger("test"), settings=settings)
    with pytest.raises(StoreUnavailable) as caught:
        await _serving_versions(ctx, _LoadingGenerator("sd"))  # type: ignore[arg-type]
    assert str(caught.value).startswith(
        f"cannot fetch the candidate adapter {candidate.name} for A/B rounds: cannot reach "
        "the object store s3://hps-bucket/hps at http://127.0.0.1:9"
    )

    local = SimpleNamespace(pool=pool, log=logging.getLogger("test"), settings=load_settings())
    served = await _serving_versions(local, _LoadingGenerator("sd"))  # type: ignore[arg-type]
    assert served.candidates == []  # not in the store: left out, logged
