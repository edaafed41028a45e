"""Which model version makes each image of a round: the serving policy, kept pure.

The incumbent is the serving SD adapter (applied on the base pipeline), or the base pipeline
itself when no adapter serves. Adapters in live testing are the candidates. A share
(`generation.ab_share`) of rounds mixes the incumbent and one candidate half and half at
shuffled positions, so the same buttons that collect preferences measure the candidate's
live win rate; the other rounds are all incumbent. Nothing in the order of the positions
tells the versions apart.

Half and half exactly: a requester's pick counts one win per round, which is only fair when
both versions offered as many images (with 3 against 2, the version with 3 wins more often
by chance alone). So a round of odd K is never mixed (the settings refuse an odd
`generation.images_per_round` while `ab_share` > 0), and the analysts' `ab_decisions` view
counts only rounds that still showed as many images of each version once the safety filter
held some back (migration 0007).

The live review (`pipeline.adapt.live`) decides on the rounds this policy mixes: the
requester's pick in them is the candidate's win or loss against the incumbent. With several
candidates, each mixed round tests one, picked uniformly, so they share the A/B traffic
evenly. The generator only needs `plan_round`'s answer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RoundPlan:
    versions: list[int]  # model version id per position: versions[0] makes position 1
    incumbent: int
    candidate: int | None  # the tested version mixed in, if this round is an A/B round

    @property
    def mixed(self) -> bool:
        return self.candidate is not None

    def as_json(self) -> dict[str, object]:
        return {"incumbent": self.incumbent, "candidate": self.candidate, "versions": self.versions}


def plan_round(
    k: int, incumbent: int, candidates: list[int], *, ab_share: float, rng: random.Random
) -> RoundPlan:
    """Plan the K positions of a round.

    With probability `ab_share` (and at least one candidate and an even K) one candidate,
    picked uniformly, makes K/2 images and the incumbent the other K/2, at positions
    shuffled by `rng`; otherwise the incumbent makes all K. `rng` makes the plan
    reproducible: a retried job seeded the same way plans the same round.
    """
    if k < 1:
        raise ValueError(f"a round has at least one image, not {k}")
    if not candidates or k % 2 or rng.random() >= ab_share:
        return RoundPlan([incumbent] * k, incumbent, None)
    candidate = rng.choice(candidates)
    versions = [candidate] * (k // 2) + [incumbent] * (k // 2)
    rng.shuffle(versions)
    return RoundPlan(versions, incumbent, candidate)
