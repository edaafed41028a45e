"""Generating the images an adaptation run learns from, and scoring them.

Each training prompt gets `images_per_prompt` images from the serving SD version (the base
pipeline, or it with the serving adapter and that adapter's identifier as negative prompt),
one recorded seed each, made in batches through the resident `Generator`. Each image is
checked for blur on its generated pixels, scored by the serving HPS classifier (HPS×100),
and saved in the run directory as JPEG (quality 95, as the reference saved its training
images). Every batch is appended to `samples.jsonl` and fsynced, so a crash loses at most
the batch in hand: a resumed stage makes only the images not recorded yet.
"""

from __future__ import annotations

import io
import json
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from pipeline.adapt.label import Sample, is_blurry
from pipeline.adapt.progress import Progress
from pipeline.generate import GeneratedImage, Generator, ImageRequest, SamplingParams
from pipeline.handlers import Cancelled

if TYPE_CHECKING:
    from pipeline.hps_model import HPSModel

SAMPLES_FILE = "samples.jsonl"
SAMPLES_DIR = "samples"
JPEG_QUALITY = 95


def sample_seed(seed: int, prompt_index: int, index: int, per_prompt: int) -> int:
    """The seed of a prompt's `index`-th image: distinct per image, fixed per run."""
    return (seed * 1_000_003 + prompt_index * per_prompt + index) % 2**31


def read_samples(path: Path) -> list[Sample]:
    """The samples recorded so far (a line torn by a crash is ignored)."""
    if not path.is_file():
        return []
    samples = []
    for line in path.read_text().splitlines():
        try:
            samples.append(Sample(**json.loads(line)))
        except (json.JSONDecodeError, TypeError):
            continue
    return samples


def generate_in_batches(
    generator: Generator,
    requests: Sequence[ImageRequest],
    params: SamplingParams,
    batch: int,
    cancelled: threading.Event | None = None,
) -> Iterator[tuple[list[ImageRequest], list[GeneratedImage]]]:
    """The requests' images, `batch` at a time (one pipeline call per batch and adapter);
    raises `Cancelled` before the next batch once `cancelled` is set."""
    for start in range(0, len(requests), batch):
        if cancelled is not None and cancelled.is_set():
            raise Cancelled(f"generation cancelled after {start} image(s)")
        chunk = list(requests[start : start + batch])
        yield chunk, generator.generate(chunk, params)


def decode(image: GeneratedImage) -> Image.Image:
    return Image.open(io.BytesIO(image.png)).convert("RGB")


@dataclass(frozen=True)
class _Planned:
    prompt_index: int
    prompt: str
    index: int
    seed: int


def generate_samples(
    run_dir: Path,
    prompts: Sequence[str],
    *,
    generator: Generator,
    scorer: HPSModel,
    adapter: str | None,
    params: SamplingParams,
    images_per_prompt: int,
    seed: int,
    batch: int,
    blur_threshold: float,
    progress: bool,
    context: dict[str, Any] | None = None,
    cancelled: threading.Event | None = None,
) -> list[Sample]:
    """Make, check, score and record the images not recorded yet; returns all samples."""
    record = run_dir / SAMPLES_FILE
    folder = run_dir / SAMPLES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    samples = read_samples(record)
    have = {(s.prompt_index, s.index) for s in samples}
    planned = [
        _Planned(p, prompt, j, sample_seed(seed, p, j, images_per_prompt))
        for p, prompt in enumerate(prompts)
        for j in range(images_per_prompt)
        if (p, j) not in have
    ]
    requests = [ImageRequest(item.prompt, "", item.seed, adapter) for item in planned]
    total = len(prompts) * images_per_prompt
    bar = Progress(
        total, "sampling", bar=progress, context=context, initial=total - len(planned), unit="img"
    )
    with bar, open(record, "a") as out:
        done = 0
        for chunk, made in generate_in_batches(generator, requests, params, batch, cancelled):
            items = planned[done : done + len(chunk)]
            done += len(chunk)
            pictures = [decode(image) for image in made]
            scores = scorer.score([item.prompt for item in items], pictures)
            for item, image, picture, score in zip(items, made, pictures, scores, strict=True):
                name = f"{SAMPLES_DIR}/{item.prompt_index:06d}_{item.index:02d}.jpg"
                picture.save(run_dir / name, quality=JPEG_QUALITY)
                sample = Sample(
                    prompt_index=item.prompt_index,
                    prompt=item.prompt,
                    index=item.index,
                    seed=item.seed,
                    file=name,
                    score=float(score),
                    blurry=is_blurry(np.asarray(picture), blur_threshold),
                    nsfw=image.nsfw,
                )
                samples.append(sample)
                out.write(json.dumps(sample.as_json()) + "\n")
            out.flush()
            os.fsync(out.fileno())
            bar.update(len(chunk))
    return sorted(samples, key=lambda s: (s.prompt_index, s.index))
