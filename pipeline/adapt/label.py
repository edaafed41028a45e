"""The reference rule that turns scored images into preferred and non-preferred ones.

From tgxs002/align_sd (`process_diffusion_db.py`, `select_training_images.py`):

- an image is *blurry* if no two adjacent pixels differ by `threshold` (10) or more. The
  reference meant neighbours across and down but computed across twice, and with the signed
  difference (left minus right); we take the absolute difference both across and down, so
  an image is blurry only if it is flat in both directions;
- prompts keep their sharp images and need at least 4 of them;
- per prompt, the softmax of the HPS×100 scores minus their mean (no temperature): the top
  image is positive if its share exceeds factor/n (factor 2), and the bottom image (the
  softmax of the negated scores) is negative if its share exceeds factor/n, n being the
  prompt's sharp images. The first of equal scores wins, as `list.index` does there.

Pure numpy: the tests feed it crafted scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

MIN_IMAGES = 4  # the reference keeps prompts with at least 4 sharp images


def is_blurry(pixels: np.ndarray, threshold: float = 10.0) -> bool:
    """Whether an image [H, W(, C)] has no adjacent pixels (across or down, any channel)
    differing by `threshold` or more."""
    values = np.asarray(pixels, dtype=np.float64)
    across = np.abs(np.diff(values, axis=1)).max(initial=0.0)
    down = np.abs(np.diff(values, axis=0)).max(initial=0.0)
    return bool(max(across, down) < threshold)


def centred_softmax(scores: Sequence[float]) -> np.ndarray:
    """Softmax of the scores minus their mean (the reference's; no temperature)."""
    values = np.asarray(scores, dtype=np.float64)
    shifted = np.exp(values - values.mean())
    return shifted / shifted.sum()


@dataclass(frozen=True)
class Sample:
    """One generated image: which prompt and seed made it, its file, score and flags."""

    prompt_index: int
    prompt: str
    index: int  # among the prompt's images
    seed: int
    file: str  # relative to the run directory
    score: float  # HPS (100 × cosine)
    blurry: bool
    nsfw: bool = False

    def as_json(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class Label:
    sample: Sample
    kind: str  # positive | negative
    share: float  # its softmax share among the prompt's n images
    n: int


@dataclass(frozen=True)
class Labelling:
    labels: list[Label]  # per prompt kept: its positive, then its negative, where it has them
    counts: dict[str, int]


def pick(scores: Sequence[float], factor: float) -> tuple[int | None, int | None]:
    """(index of the positive, index of the negative) among one prompt's scores; None where
    the rule singles out no image."""
    n = len(scores)
    up = centred_softmax(scores)
    down = centred_softmax([-s for s in scores])
    best, worst = int(np.argmax(up)), int(np.argmax(down))  # first of equals, as the reference
    return (
        best if up[best] > factor / n else None,
        worst if down[worst] > factor / n else None,
    )


def label_samples(
    samples: Sequence[Sample], *, factor: float = 2.0, min_images: int = MIN_IMAGES
) -> Labelling:
    """Label each prompt's sharp, unflagged images by the reference rule."""
    by_prompt: dict[int, list[Sample]] = {}
    for sample in samples:
        by_prompt.setdefault(sample.prompt_index, []).append(sample)
    labels: list[Label] = []
    kept = 0
    for index in sorted(by_prompt):
        usable = [s for s in by_prompt[index] if not s.blurry and not s.nsfw]
        if len(usable) < min_images:
            continue
        kept += 1
        scores = [s.score for s in usable]
        positive, negative = pick(scores, factor)
        n = len(usable)
        if positive is not None:
            share = float(centred_softmax(scores)[positive])
            labels.append(Label(usable[positive], "positive", share, n))
        if negative is not None:
            share = float(centred_softmax([-s for s in scores])[negative])
            labels.append(Label(usable[negative], "negative", share, n))
    counts = {
        "prompts": len(by_prompt),
        "images": len(samples),
        "blurry": sum(s.blurry for s in samples),
        "nsfw": sum(s.nsfw and not s.blurry for s in samples),
        "prompts_kept": kept,
        "prompts_dropped": len(by_prompt) - kept,
        "positives": sum(label.kind == "positive" for label in labels),
        "negatives": sum(label.kind == "negative" for label in labels),
    }
    return Labelling(labels, counts)
