"""Offline evaluation of an adapter, the gate to live testing.

On held-out prompts (never trained on), each seed makes one image with the adapter and one
with its parent (the SD version serving when it was trained: the base pipeline or the
serving adapter), the same seed for both: paired images that differ only by the adapter.
The serving HPS classifier scores them all. The report has the mean HPS of each side, the
mean gain, and the paired win rate of the adapter (a score tie counts half), each with a
bootstrap 95% interval over prompts, since the pairs of one prompt are not independent.
The reward models of `adapt.offline_scorers` (`pipeline.scorers`) judge the same pairs:
the report's `judges` has each one's win rate and mean gain, on its own scale.

The gate (`adapt.offline_gate`): `win_rate` admits an adapter whose win-rate interval lies
above `offline_min_win_rate` (0.5: significantly better than its parent), `hps_gain` one
whose mean gain exceeds `offline_min_hps_gain`, `none` every adapter. In the paper's recipe
(`adapt.recipe = hps`) the HPS classifier labelled the adapter's training data, so an
adapter that games it would pass alone: the gate also requires a judge that played no part
in training to agree (`adapt.offline_gate_scorer`; by default the first of
`offline_scorers` other than hps): its win-rate interval above `offline_min_win_rate` too.
A Diffusion-DPO adapter (`recipe = dpo`) trains on people's pairs, so the classifier is
already independent of its training; a second judge, if configured, must agree all the
same. With no second judge the gate's reason says so, and why (what was configured).

Every reward model `adapt.offline_scorers` lists is required: if its weights cannot be
loaded the evaluation fails (`JudgeUnavailable`, naming the setting), rather than gate on
fewer judges than configured.

Each batch's pairs are appended to `pairs.jsonl` and fsynced as they are made, with the
name of the classifier that scored them and the judges' (with what they loaded), so an
evaluation that crashed resumes: it makes only the pairs not recorded yet (those scored by
another classifier, or lacking a judge's score, are made again).
"""

from __future__ import annotations

import json
import os
import threading
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
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
    from pipeline.scorers import Scorer

PAIRS_FILE = "pairs.jsonl"


@dataclass(frozen=True)
class Pair:
    prompt_index: int
    prompt: str
    seed: int
    adapted: float  # HPS of the adapter's image
    parent: float  # HPS of the parent's image from the same seed
    judged: dict[str, list[float]] = field(default_factory=dict)  # judge: [adapted, parent]


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


def judge_report(pairs: Sequence[Pair], judge: str) -> dict[str, Any]:
    """`paired_report`'s win rate and gain under `judge` (its scores of the same pairs)."""
    scored = [
        Pair(p.prompt_index, p.prompt, p.seed, *p.judged[judge]) for p in pairs if judge in p.judged
    ]
    report = paired_report(scored)
    renamed = {"hps_adapted": "mean_adapted", "hps_parent": "mean_parent", "hps_gain": "gain",
               "hps_gain_ci": "gain_ci"}  # fmt: skip
    return {renamed.get(k, k): v for k, v in report.items()}


class JudgeUnavailable(Exception):
    """A reward model `adapt.offline_scorers` lists whose weights cannot be loaded."""


async def load_judges(
    names: Sequence[str], load: Callable[[Sequence[str]], Awaitable[list[Scorer]]]
) -> list[Scorer]:
    """The reward models `names` (of `adapt.offline_scorers`), each loaded by `load`; any
    that cannot be is an error naming the setting (`JudgeUnavailable`): a judge listed is
    required, never skipped."""
    judges: list[Scorer] = []
    for name in names:
        try:
            judges += await load([name])
        except Exception as exc:  # missing, unreadable or undownloadable weights
            if _passing(exc):
                raise  # an outage (the store, the network) or a full GPU: the job retries
            raise JudgeUnavailable(
                f"adapt.offline_scorers (HPS_ADAPT__OFFLINE_SCORERS) lists {name}, so the "
                f"offline evaluation needs its weights, and they cannot be loaded: {exc}. "
                f"Make them loadable, or remove {name} from adapt.offline_scorers"
            ) from exc
    return judges


def _passing(exc: BaseException) -> bool:
    """A failure that trying again later may not meet (`StoreUnavailable` is a
    ConnectionError), as opposed to weights that are missing or unreadable."""
    import torch

    return isinstance(exc, ConnectionError | TimeoutError | torch.OutOfMemoryError)


def gate_scorer(recipe: AdaptSettings) -> str:
    """The judge the gate asks to agree: `offline_gate_scorer`, or (auto) the first of
    `offline_scorers` other than hps, else hps (the classifier alone)."""
    if recipe.offline_gate_scorer != "auto":
        return recipe.offline_gate_scorer
    return next((name for name in recipe.offline_scorers if name != "hps"), "hps")


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
    # The independent judge's verdict comes before the classifier's rule, which ends it.
    judge = gate_scorer(recipe)
    if judge == "hps":
        verdict = _judged_alone(recipe)
    else:
        judged = report.get("judges", {}).get(judge)
        if not judged or not judged.get("pairs"):
            passed, verdict = False, f"{judge} did not judge its pairs"
        else:
            j_low, j_high = judged["win_rate_ci"]
            agrees = j_low > recipe.offline_min_win_rate
            passed = passed and agrees
            says = "agrees" if agrees else "does not agree"
            verdict = (
                f"{judge}, which played no part in training, {says}: win rate "
                f"{judged['win_rate']:.1%} (95% CI {j_low:.1%}–{j_high:.1%}), lower bound "
                f"{'>' if agrees else '≤'} {recipe.offline_min_win_rate:.0%}"
            )
    state = "passed" if passed else "failed"
    return passed, f"offline evaluation {state}: {figures}; {verdict}; {rule}"


def _judged_alone(recipe: AdaptSettings) -> str:
    """Why the HPS classifier judged alone (what was configured), and what that means for
    the adapter's recipe."""
    if recipe.offline_gate_scorer == "hps":
        why = "adapt.offline_gate_scorer = hps"
    else:
        why = "adapt.offline_scorers names no scorer but hps"
    if recipe.recipe == "dpo":
        return (
            f"the HPS classifier judged alone ({why}); it played no part in training: a "
            "Diffusion-DPO adapter trains on people's pairs"
        )
    return (
        f"no independent judge ({why}): the HPS classifier that labelled its training data "
        "judged alone"
    )


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


def read_pairs(path: Path, scorer: str, judges: dict[str, str] | None = None) -> list[Pair]:
    """The pairs recorded so far that `scorer` scored and every judge (name: what it
    loaded) judged, the same judge (a line torn by a crash is ignored)."""
    if not path.is_file():
        return []
    pairs = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            labels = record.pop("judges", {})
            if record.pop("scorer", None) != scorer:
                continue
            if any(labels.get(name) != label for name, label in (judges or {}).items()):
                continue
            pair = Pair(**record)
            kept = {k: v for k, v in pair.judged.items() if k in (judges or {})}
            pairs.append(replace(pair, judged=kept))
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
    judges: Sequence[Scorer] = (),
) -> dict[str, Any]:
    """Make and score the paired images of `adapter` (loaded in `generator`) and `parent`
    (an adapter name, or None for the base pipeline) not recorded in `out_dir` yet, scored
    by `scorer` (the HPS classifier) and judged by `judges` (other reward models); write
    the pairs and the images there; return the report on all of them."""
    from pipeline.generate import ImageRequest
    from pipeline.scorers import score_all

    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    record = out_dir / PAIRS_FILE
    planned = [
        (i, prompt, sample_seed(seed, i, j, seeds_per_prompt))
        for i, prompt in enumerate(prompts)
        for j in range(seeds_per_prompt)
    ]
    order = {item: n for n, item in enumerate(planned)}
    labels = {judge.name: judge.label for judge in judges}
    pairs = [
        p
        for p in read_pairs(record, scorer.name, labels)
        if (p.prompt_index, p.prompt, p.seed) in order
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
    def line(pair: Pair) -> str:
        return json.dumps({**asdict(pair), "scorer": scorer.name, "judges": labels}) + "\n"

    record.write_text("".join(line(p) for p in pairs))
    with bar, open(record, "a") as out:
        done = 0
        for chunk, made in generate_in_batches(generator, requests, params, per_call, cancelled):
            pictures = [decode(image) for image in made]
            prompts = [r.prompt for r in chunk]
            scores = scorer.score(prompts, pictures)
            judged = (
                score_all(judges, prompts, pictures, batch_size=len(pictures)) if judges else {}
            )
            for k in range(0, len(chunk), 2):
                i, prompt, s = planned[done + k // 2]
                opinions = {name: [v[k], v[k + 1]] for name, v in judged.items()}
                pair = Pair(i, prompt, s, float(scores[k]), float(scores[k + 1]), opinions)
                for side, picture in zip(("adapted", "parent"), pictures[k : k + 2], strict=True):
                    picture.save(images_dir / f"{i:05d}_{s}_{side}.jpg", quality=90)
                pairs.append(pair)
                out.write(line(pair))
            done += len(chunk) // 2
            out.flush()
            os.fsync(out.fileno())
            bar.update(len(chunk))
    # In the planned order, so a resumed evaluation reports what an uninterrupted one does.
    ordered = sorted(pairs, key=lambda p: order[(p.prompt_index, p.prompt, p.seed)])
    report = paired_report(ordered)
    if judges:
        report["judges"] = {
            j.name: {"model": j.label, "scale": j.scale, **judge_report(ordered, j.name)}
            for j in judges
        }
    return report
