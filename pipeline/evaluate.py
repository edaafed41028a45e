"""Evaluation: how often a model's highest-scored image is the one the person chose.

- top-1 accuracy among the K shown images (the paper's measure; chance is 1/K), with a
  Wilson 95% interval, overall and per K;
- pairwise accuracy: for each pick, the chosen image against each other image (a score tie
  counts half; the HPS v2 measure), with a bootstrap 95% interval over examples, since the
  pairs of one example are not independent.
Ties ("can't decide") have no right answer: they are counted, not scored.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from itertools import accumulate, pairwise
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.data import Example, Reader, fingerprint

if TYPE_CHECKING:
    from pipeline.hps_model import HPSModel
    from pipeline.scorers import Scorer

Z95 = 1.959963984540054
BOOTSTRAP_SAMPLES = 1000


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


def bootstrap_interval(
    correct: np.ndarray, totals: np.ndarray, seed: int = 0
) -> tuple[float, float]:
    """95% percentile interval of sum(correct)/sum(totals), resampling examples."""
    if len(totals) == 0 or totals.sum() == 0:
        return (0.0, 1.0)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(totals), size=(BOOTSTRAP_SAMPLES, len(totals)))
    ratios = correct[picks].sum(axis=1) / np.maximum(totals[picks].sum(axis=1), 1)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return (float(low), float(high))


def accuracy_report(
    examples: Sequence[Example], scores: Sequence[Sequence[float]]
) -> dict[str, Any]:
    """The report of one model: `scores[i]` are its scores of `examples[i].images`."""
    top1 = []  # per pick: 1 if the best-scored image is the chosen one
    ks = []
    pair_correct = []
    pair_total = []
    ties = 0
    for example, example_scores in zip(examples, scores, strict=True):
        if example.chosen is None:
            ties += 1
            continue
        s = np.asarray(example_scores, dtype=np.float64)
        others = np.delete(s, example.chosen)
        top1.append(float(int(np.argmax(s)) == example.chosen))
        ks.append(example.k)
        pair_correct.append(
            float((s[example.chosen] > others).sum() + 0.5 * (s[example.chosen] == others).sum())
        )
        pair_total.append(len(others))
    n = len(top1)
    correct = sum(top1)
    pairs = int(sum(pair_total))
    per_k: dict[str, dict[str, Any]] = {}
    by_k: dict[int, list[float]] = defaultdict(list)
    for k, hit in zip(ks, top1, strict=True):
        by_k[k].append(hit)
    for k in sorted(by_k):
        hits = by_k[k]
        per_k[str(k)] = {
            "n": len(hits),
            "top1": sum(hits) / len(hits),
            "top1_ci": list(wilson_interval(sum(hits), len(hits))),
            "chance": 1 / k,
        }
    return {
        "n": n,
        "ties": ties,
        "top1": correct / n if n else None,
        "top1_ci": list(wilson_interval(correct, n)),
        "chance": float(np.mean([1 / k for k in ks])) if ks else None,
        "pairwise": sum(pair_correct) / pairs if pairs else None,
        "pairwise_n": pairs,
        "pairwise_ci": list(bootstrap_interval(np.array(pair_correct), np.array(pair_total))),
        "per_k": per_k,
    }


class _Read(Sequence):
    """Image references that read their image when indexed (in the DataLoader)."""

    def __init__(self, refs: list[str], read: Reader) -> None:
        self.refs, self.read = refs, read

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index):  # type: ignore[no-untyped-def, override]
        return self.read(self.refs[index])


def evaluate(
    model: HPSModel,
    examples: Sequence[Example],
    read: Reader,
    *,
    batch_size: int = 32,
    num_workers: int = 0,
) -> dict[str, Any]:
    """The accuracy report of `model` on `examples`, with what identifies it: training's
    validation, its test reports and `hps eval` all use it. The images are scored in one
    batched pass, read as they are decoded (memory does not grow with the examples)."""
    prompts = [e.prompt for e in examples for _ in e.images]
    images = _Read([ref for e in examples for ref in e.images], read)
    flat = model.score(prompts, images, batch_size=batch_size, num_workers=num_workers)
    bounds = list(accumulate((e.k for e in examples), initial=0))
    scores = [flat[start:end] for start, end in pairwise(bounds)]
    return {
        "model": model.name,
        "examples": fingerprint(examples),
        **accuracy_report(examples, scores),
    }


def evaluate_scorers(
    scorers: Sequence[Scorer],
    examples: Sequence[Example],
    read: Reader,
    *,
    batch_size: int = 32,
) -> dict[str, dict[str, Any]]:
    """Each scorer's accuracy report on `examples` (its agreement with people's choices),
    by name, with what identifies it (`model`: the weights, `scale`). One pass over the
    images: each is read and decoded once and scored by every scorer
    (`pipeline.scorers.score_all`)."""
    from pipeline.scorers import score_all

    prompts = [e.prompt for e in examples for _ in e.images]
    images = _Read([ref for e in examples for ref in e.images], read)
    flat = score_all(scorers, prompts, images, batch_size=batch_size)
    bounds = list(accumulate((e.k for e in examples), initial=0))
    identity = fingerprint(examples)
    reports = {}
    for scorer in scorers:
        scores = [flat[scorer.name][start:end] for start, end in pairwise(bounds)]
        reports[scorer.name] = {
            "model": scorer.label,
            "scale": scorer.scale,
            "examples": identity,
            **accuracy_report(examples, scores),
        }
    return reports
