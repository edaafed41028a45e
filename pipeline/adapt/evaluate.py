"""Offline evaluation of an adapter, the gate to live testing.

On held-out prompts (never trained on), each seed makes one image with the adapter and one
with its parent (the SD version serving when it was trained: the base pipeline or the
serving adapter), the same seed for both: paired images that differ only by the adapter.
The serving HPS classifier scores them all. The report has the mean HPS of each side, the
mean gain, and the paired win rate of the adapter (a score tie counts half), each with a
bootstrap 95% interval over prompts, since the pairs of one prompt are not independent.

The gate (`adapt.offline_gate`): `win_rate` admits an adapter whose win-rate interval lies
above `offline_min_win_rate` (0.5: significantly better than its parent), `hps_gain` one
whose mean gain exceeds `offline_min_hps_gain`, `none` every adapter.

Each batch's pairs are appended to `pairs.jsonl` and fsynced as they are made, with the
name of the classifier that scored them, so an evaluation that crashed resumes: it makes
only the pairs not recorded yet (those scored by another classifier are made again).
"""

from __future__ import annotations

import json
import os
import threading
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from db import models
from db.connect import Executor
from hps.settings import AdaptSettings
from pipeline.adapt.progress import Progress
from pipeline.adapt.samples import decode, generate_in_batches, sample_seed
from pipeline.evaluate import bootstrap_interval

if TYPE_CHECKING:
    from pipeline.generate import Generator, SamplingParams
    from pipeline.hps_model import HPSModel

PAIRS_FILE = "pairs.jsonl"


@dataclass(frozen=True)
class Pair:
    prompt_index: int
    prompt: str
    seed: int
    adapted: float  # HPS of the adapter's image
    parent: float  # HPS of the parent's image from the same seed


def paired_report(pairs: Sequence[Pair]) -> dict[str, Any]:
    """Means, gain and win rate of the adapter over its parent, with 95% intervals."""
    by_prompt: dict[int, list[Pair]] = defaultdict(list)
    for pair in pairs:
        by_prompt[pair.prompt_index].append(pair)
    groups = list(by_prompt.values())
    if not groups:
        return {"pairs": 0, "prompts": 0, "win_rate": None, "hps_gain": None}
    sizes = np.array([len(g) for g in groups], dtype=np.float64)
    wins = np.array(
        [sum((p.adapted > p.parent) + 0.5 * (p.adapted == p.parent) for p in g) for g in groups],
        dtype=np.float64,
    )
    gains = np.array([sum(p.adapted - p.parent for p in g) for g in groups], dtype=np.float64)
    n = int(sizes.sum())
    return {
        "pairs": n,
        "prompts": len(groups),
        "wins": float(wins.sum()),
        "win_rate": float(wins.sum() / n),
        "win_rate_ci": list(bootstrap_interval(wins, sizes)),
        "hps_adapted": float(np.mean([p.adapted for p in pairs])),
        "hps_parent": float(np.mean([p.parent for p in pairs])),
        "hps_gain": float(gains.sum() / n),
        "hps_gain_ci": list(bootstrap_interval(gains, sizes)),
    }


def offline_gate(report: dict[str, Any], recipe: AdaptSettings) -> tuple[bool, str]:
    """Whether the report admits the adapter to live testing, and why, in words."""
    if recipe.offline_gate == "none":
        return True, "the offline gate is off (adapt.offline_gate = none)"
    if not report.get("pairs"):
        return False, "no held-out prompts to evaluate it on"
    low, high = report["win_rate_ci"]
    gain_low, gain_high = report["hps_gain_ci"]
    figures = (
        f"paired win rate {report['win_rate']:.1%} (95% CI {low:.1%}–{high:.1%}), mean HPS "
        f"gain {report['hps_gain']:+.3f} (95% CI {gain_low:+.3f}–{gain_high:+.3f}) on "
        f"{report['pairs']} pairs from {report['prompts']} held-out prompts"
    )
    if recipe.offline_gate == "win_rate":
        passed = low > recipe.offline_min_win_rate
        rule = f"win-rate lower bound {'>' if passed else '≤'} {recipe.offline_min_win_rate:.0%}"
    else:
        passed = report["hps_gain"] > recipe.offline_min_hps_gain
        rule = f"mean gain {'>' if passed else '≤'} {recipe.offline_min_hps_gain:+.3f}"
    return passed, f"offline evaluation {'passed' if passed else 'failed'}: {figures}; {rule}"


@dataclass
class OfflineGate:
    """The gate of an SD adapter (`pipeline.runs.Gate`): its offline report's verdict
    (`offline_gate`); a candidate that passes enters A/B testing, one that fails is retired."""

    report: dict[str, Any]
    recipe: AdaptSettings

    def __post_init__(self) -> None:
        self.passed, self.reason = offline_gate(self.report, self.recipe)

    async def apply(
        self, conn: Executor, version: models.ModelVersion, actor: str | None
    ) -> tuple[bool, str]:
        act = models.start_testing if self.passed else models.retire
        await act(conn, version.id, actor=actor, reason=self.reason)
        return self.passed, self.reason

    async def settle(
        self, db: Executor, version: models.ModelVersion, actor: str | None
    ) -> tuple[bool, str]:
        offline = version.metrics.get("offline", {})
        return version.status in ("testing", "serving"), offline.get("gate", "")


def read_pairs(path: Path, scorer: str) -> list[Pair]:
    """The pairs recorded so far that `scorer` scored (a line torn by a crash is ignored)."""
    if not path.is_file():
        return []
    pairs = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            if record.pop("scorer", None) == scorer:
                pairs.append(Pair(**record))
        except (json.JSONDecodeError, TypeError, AttributeError):
            continue
    return pairs


def evaluate_adapter(
    prompts: Sequence[str],
    *,
    generator: Generator,
    scorer: HPSModel,
    adapter: str,
    parent: str | None,
    params: SamplingParams,
    seeds_per_prompt: int,
    seed: int,
    batch: int,
    out_dir: Path,
    progress: bool,
    context: dict[str, Any] | None = None,
    cancelled: threading.Event | None = None,
) -> dict[str, Any]:
    """Make and score the paired images of `adapter` (loaded in `generator`) and `parent`
    (an adapter name, or None for the base pipeline) not recorded in `out_dir` yet; write
    the pairs and the images there; return the report on all of them."""
    from pipeline.generate import ImageRequest

    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    record = out_dir / PAIRS_FILE
    planned = [
        (i, prompt, sample_seed(seed, i, j, seeds_per_prompt))
        for i, prompt in enumerate(prompts)
        for j in range(seeds_per_prompt)
    ]
    order = {item: n for n, item in enumerate(planned)}
    pairs = [
        p for p in read_pairs(record, scorer.name) if (p.prompt_index, p.prompt, p.seed) in order
    ]
    have = {(p.prompt_index, p.prompt, p.seed) for p in pairs}
    planned = [item for item in planned if item not in have]
    requests = [
        ImageRequest(prompt, "", s, side)
        for _, prompt, s in planned
        for side in (adapter, parent)  # one call per side in each batch: batch of pairs
    ]
    per_call = max(2, batch - batch % 2)  # whole pairs per batch
    total = 2 * len(order)
    bar = Progress(
        total, "offline evaluation", bar=progress, context=context, initial=total - len(requests)
    )
    # Only this scorer's pairs stay: a resumed run never mixes classifiers.
    record.write_text(
        "".join(json.dumps({**asdict(p), "scorer": scorer.name}) + "\n" for p in pairs)
    )
    with bar, open(record, "a") as out:
        done = 0
        for chunk, made in generate_in_batches(generator, requests, params, per_call, cancelled):
            pictures = [decode(image) for image in made]
            scores = scorer.score([r.prompt for r in chunk], pictures)
            for k in range(0, len(chunk), 2):
                i, prompt, s = planned[done + k // 2]
                pair = Pair(i, prompt, s, float(scores[k]), float(scores[k + 1]))
                for side, picture in zip(("adapted", "parent"), pictures[k : k + 2], strict=True):
                    picture.save(images_dir / f"{i:05d}_{s}_{side}.jpg", quality=90)
                pairs.append(pair)
                out.write(json.dumps({**asdict(pair), "scorer": scorer.name}) + "\n")
            done += len(chunk) // 2
            out.flush()
            os.fsync(out.fileno())
            bar.update(len(chunk))
    # In the planned order, so a resumed evaluation reports what an uninterrupted one does.
    return paired_report(sorted(pairs, key=lambda p: order[(p.prompt_index, p.prompt, p.seed)]))
