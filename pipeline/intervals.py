"""Wilson's score interval: plain math, no numpy, so that what runs in the bot's image (the
scheduler's live A/B review, `hps models`) can use it; the evaluation uses it too."""

from __future__ import annotations

import math

Z95 = 1.959963984540054


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of successes / n at the normal quantile `z` (95%: `Z95`);
    (0, 1) when n is 0. Accuracy reports, the live A/B test and the report's plots use it."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))
