"""Evaluation: how often a model's highest-scored image is the one the person chose.

- top-1 accuracy among the K shown images (the paper's measure; chance is 1/K), overall and
  per K. When the chosen image shares the highest score with m − 1 others, it counts 1/m:
  the expected top-1 of breaking the tie at random. Crediting the first of them (argmax)
  would reward scorers that tie often (CLIP score clamps at 0; identical images) by the
  position the chosen image happened to be shown at;
- pairwise accuracy: for each pick, the chosen image against each other image (a score tie
  counts half; the HPS v2 measure).
Ties ("can't decide") have no right answer: they are counted, not scored.

The 95% intervals resample prompts, not choices (a cluster bootstrap over `Example.group`):
with everyone's choices (`choosers = all`) or a prompt used in several rounds, the choices
of one prompt are not independent, and an interval over choices would be too narrow. The
pairs of one example are not independent either, so the pairwise interval is always this
bootstrap (over examples when each prompt has one). The top-1 interval is Wilson's when
every prompt has one example (then the choices are independent, and Wilson's interval
behaves better than a bootstrap on few of them), else the same bootstrap. Both are
deterministic (a fixed seed).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from itertools import accumulate, pairwise
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.data import Example, Reader, fingerprint
from pipeline.intervals import wilson_interval

if TYPE_CHECKING:
    from pipeline.hps_model import HPSModel
    from pipeline.scorers import Scorer

BOOTSTRAP_SAMPLES = 1000


def bootstrap_interval(
    correct: np.ndarray, totals: np.ndarray, seed: int = 0
) -> tuple[float, float]:
    """95% percentile interval of sum(correct)/sum(totals), resampling the entries (pass one
    entry per cluster, its sums, for a cluster bootstrap: `cluster_sums`)."""
    if len(totals) == 0 or totals.sum() == 0:
        return (0.0, 1.0)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(totals), size=(BOOTSTRAP_SAMPLES, len(totals)))
    ratios = correct[picks].sum(axis=1) / np.maximum(totals[picks].sum(axis=1), 1)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return (float(low), float(high))


def cluster_sums(
    groups: Sequence[str], correct: Sequence[float], totals: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """`correct` and `totals` summed per group (in order of first appearance): what
    `bootstrap_interval` resamples for a cluster bootstrap."""
    index: dict[str, int] = {}
    for group in groups:
        index.setdefault(group, len(index))
    where = np.array([index[g] for g in groups], dtype=np.int64)
    sums = np.zeros(len(index)), np.zeros(len(index))
    np.add.at(sums[0], where, np.asarray(correct, dtype=np.float64))
    np.add.at(sums[1], where, np.asarray(totals, dtype=np.float64))
    return sums


def top1_credit(scores: np.ndarray, chosen: int) -> float:
    """1/m if the chosen image is among the m images sharing the highest score, else 0."""
    best = scores == scores.max()
    return 1.0 / int(best.sum()) if best[chosen] else 0.0


def top1_interval(groups: Sequence[str], hits: Sequence[float]) -> tuple[float, float]:
    """The 95% interval of the top-1 accuracy: Wilson's when each prompt has one example,
    else the cluster bootstrap over prompts (see the module's docstring)."""
    if len(set(groups)) == len(groups):
        return wilson_interval(sum(hits), len(hits))
    return bootstrap_interval(*cluster_sums(groups, hits, [1.0] * len(hits)))


def accuracy_report(
    examples: Sequence[Example], scores: Sequence[Sequence[float]]
) -> dict[str, Any]:
    """The report of one model: `scores[i]` are its scores of `examples[i].images`."""
    top1 = []  # per pick: the chosen image's share of the best score (`top1_credit`)
    ks = []
    groups = []
    pair_correct = []
    pair_total = []
    ties = 0
    for example, example_scores in zip(examples, scores, strict=True):
        if example.chosen is None:
            ties += 1
            continue
        s = np.asarray(example_scores, dtype=np.float64)
        others = np.delete(s, example.chosen)
        top1.append(top1_credit(s, example.chosen))
        ks.append(example.k)
        groups.append(example.group)
        pair_correct.append(
            float((s[example.chosen] > others).sum() + 0.5 * (s[example.chosen] == others).sum())
        )
        pair_total.append(len(others))
    n = len(top1)
    correct = sum(top1)
    pairs = int(sum(pair_total))
    per_k: dict[str, dict[str, Any]] = {}
    by_k: dict[int, list[tuple[str, float]]] = defaultdict(list)
    for k, group, hit in zip(ks, groups, top1, strict=True):
        by_k[k].append((group, hit))
    for k in sorted(by_k):
        k_groups, hits = zip(*by_k[k], strict=True)
        per_k[str(k)] = {
            "n": len(hits),
            "top1": sum(hits) / len(hits),
            "top1_ci": list(top1_interval(k_groups, hits)),
            "chance": 1 / k,
        }
    return {
        "n": n,
        "ties": ties,
        "top1": correct / n if n else None,
        "top1_ci": list(top1_interval(groups, top1)),
        "chance": float(np.mean([1 / k for k in ks])) if ks else None,
        "pairwise": sum(pair_correct) / pairs if pairs else None,
        "pairwise_n": pairs,
        "pairwise_ci": list(bootstrap_interval(*cluster_sums(groups, pair_correct, pair_total))),
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
