"""The interface every reward model implements, and the pass that scores images with
several of them while decoding each image once.

A scorer splits its work the way a batched scorer must: `encode_prompts` (each distinct
prompt once per call), `prepare` (its own preprocessing of a batch of decoded images: CPU
work that runs in a background thread one batch ahead of the models) and `score_prepared`
(its model on that batch, with the text embedding of each image's prompt). `score_all`
decodes every image once and hands the decoded batch to each scorer's `prepare`, so five
scorers cost one decoding, not five.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from pipeline.images import ImageInput


class Scorer(Protocol):
    """A reward model scoring images for their prompts; higher is preferred. Scores compare
    images of one prompt (across prompts they mean little)."""

    name: str  # its registry name: "hps", "hpsv2", "pickscore", "aesthetic", "clip"
    label: str  # what was loaded (the weights), for reports
    scale: str  # what its numbers are, in words

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor | None:
        """One row per prompt (None for a scorer that reads no prompt)."""
        ...

    def prepare(self, images: Sequence[Image.Image]) -> Any:
        """Its preprocessing of decoded RGB images (CPU; runs in the decoding thread)."""
        ...

    def score_prepared(self, text: torch.Tensor | None, prepared: Any) -> list[float]:
        """Scores of a prepared batch; `text` holds the row of each image's prompt."""
        ...


def score_all(
    scorers: Sequence[Scorer],
    prompts: str | Sequence[str],
    images: Sequence[ImageInput],
    *,
    batch_size: int = 32,
    max_pixels: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, list[float]]:
    """Each scorer's scores of `images` (one prompt for all, or one per image), by name.
    Every image is decoded once (in a background thread, one batch ahead, with every
    scorer's `prepare`); each distinct prompt is encoded once per scorer. Raises
    `ImageError` naming a bad image. `on_batch(n)` is called after each batch of n."""
    import torch

    from pipeline.hps_model import decode_images, per_image_prompts, prefetched

    names = [s.name for s in scorers]
    if len(set(names)) != len(names):
        raise ValueError(f"scorers named twice: {', '.join(names)}")
    per_image = per_image_prompts(prompts, len(images))
    results: dict[str, list[float]] = {name: [] for name in names}
    if not per_image:
        return results
    unique = list(dict.fromkeys(per_image))
    position = {p: i for i, p in enumerate(unique)}
    index = torch.tensor([position[p] for p in per_image], dtype=torch.long)
    tables = [s.encode_prompts(unique) for s in scorers]

    def load(start: int) -> tuple[int, list[Any]]:
        # Indexing may read the image too (an image-store reader): in the thread as well.
        chunk = [images[i] for i in range(start, min(start + batch_size, len(images)))]
        decoded = decode_images(chunk, start, max_pixels)
        return len(chunk), [s.prepare(decoded) for s in scorers]

    def work() -> Iterator[Callable[[], tuple[int, list[Any]]]]:
        for start in range(0, len(images), batch_size):
            yield lambda start=start: load(start)

    start = 0
    for n, prepared in prefetched(work()):
        rows = index[start : start + n]
        for scorer, table, batch in zip(scorers, tables, prepared, strict=True):
            text = None if table is None else table[rows.to(table.device)]
            results[scorer.name] += scorer.score_prepared(text, batch)
        start += n
        if on_batch is not None:
            on_batch(n)
    return results


def score_with(
    scorer: Scorer, prompts: str | Sequence[str], images: Sequence[ImageInput], **options: Any
) -> list[float]:
    """One scorer's scores (`score_all` with it alone)."""
    return score_all([scorer], prompts, images, **options)[scorer.name]
