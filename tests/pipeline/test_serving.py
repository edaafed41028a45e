"""The serving policy: which version makes each position of a round."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from pydantic import ValidationError

from hps.settings import ConfigError, GenerationSettings, load_settings
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
    six = plan_round(6, 7, [8], ab_share=1.0, rng=rng)
    assert Counter(six.versions) == {7: 3, 8: 3}


def test_a_round_of_odd_k_is_never_mixed_and_the_settings_refuse_odd_k_with_a_b(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """3 images against 2 would make the version with 3 win more often by chance alone."""
    rng = random.Random(3)
    for k in (1, 3, 5, 7):
        plan = plan_round(k, 7, [8], ab_share=1.0, rng=rng)
        assert plan.versions == [7] * k and not plan.mixed
    with pytest.raises(ValidationError, match=r"generation\.images_per_round .* must be even"):
        GenerationSettings(images_per_round=5, ab_share=0.5)
    assert GenerationSettings(images_per_round=5, ab_share=0).images_per_round == 5
    assert GenerationSettings(images_per_round=6, ab_share=0.5).images_per_round == 6
    monkeypatch.setenv("HPS_GENERATION__IMAGES_PER_ROUND", "3")
    with pytest.raises(ConfigError, match=r"HPS_GENERATION__IMAGES_PER_ROUND.* must be even"):
        load_settings()
    monkeypatch.setenv("HPS_GENERATION__AB_SHARE", "0")
    assert load_settings().generation.images_per_round == 3


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
