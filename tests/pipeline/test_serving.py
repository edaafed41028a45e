"""The serving policy: which version makes each position of a round."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from pipeline.serving import plan_round


def test_without_candidates_or_share_every_image_is_the_incumbent() -> None:
    rng = random.Random(0)
    assert plan_round(4, 7, [], ab_share=1.0, rng=rng).versions == [7, 7, 7, 7]
    plan = plan_round(4, 7, [8], ab_share=0.0, rng=rng)
    assert plan.versions == [7, 7, 7, 7] and not plan.mixed and plan.candidate is None


def test_a_mixed_round_is_half_and_half_at_shuffled_positions() -> None:
    rng = random.Random(1)
    orders = set()
    for _ in range(200):
        plan = plan_round(4, 7, [8, 9], ab_share=1.0, rng=rng)
        assert plan.mixed and plan.candidate in (8, 9)
        assert Counter(plan.versions) == {7: 2, plan.candidate: 2}
        orders.add(tuple(v == 7 for v in plan.versions))
    assert len(orders) == 6  # every arrangement of two and two occurs
    odd = plan_round(5, 7, [8], ab_share=1.0, rng=rng)
    assert Counter(odd.versions) == {7: 3, 8: 2}
    assert plan_round(1, 7, [8], ab_share=1.0, rng=rng).versions == [7]


def test_the_share_of_mixed_rounds_follows_ab_share_and_the_plan_is_reproducible() -> None:
    rng = random.Random(2)
    mixed = sum(plan_round(4, 1, [2, 3], ab_share=0.3, rng=rng).mixed for _ in range(2000))
    assert 540 <= mixed <= 660  # 600 expected; 2000 draws give σ ≈ 20
    first = plan_round(4, 1, [2, 3], ab_share=0.5, rng=random.Random(42))
    assert plan_round(4, 1, [2, 3], ab_share=0.5, rng=random.Random(42)) == first
    assert first.as_json() == {
        "incumbent": 1,
        "candidate": first.candidate,
        "versions": first.versions,
    }
    with pytest.raises(ValueError, match="at least one image"):
        plan_round(0, 1, [], ab_share=0.5, rng=rng)
