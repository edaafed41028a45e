"""The fine-tuning set: preferred images with their prompt, non-preferred ones with the
identifier before their prompt, and regularization images with their own captions.

As the reference's `ImageTextDataset`: the caption of a negative is `identifier + prompt`
("Weird image. a red cube"), positives and regularization images keep theirs; images are
resized (bilinear) to the resolution on the short side, randomly cropped (centre-cropped
with `center_crop`), optionally flipped, and scaled to [-1, 1]; with `prompt_dropout`
a caption is replaced by the empty prompt.

Regularization data (the paper: LAION-aesthetics ≥ 6.5 with their captions) is a folder
holding `metadata.jsonl`, or a JSONL file, of `{"file_name": ..., "caption": ...}` lines
(Hugging Face's imagefolder layout); file names are relative to the JSONL's folder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from pipeline.adapt.label import Label

FINETUNE_FILE = "finetune.jsonl"
KINDS = ("positive", "negative", "regularization")


class DatasetError(Exception):
    """Regularization data that does not hold what it should; says where."""


@dataclass(frozen=True)
class Item:
    file: str  # absolute, or relative to the run directory
    caption: str
    kind: str  # positive | negative | regularization


def labelled_items(labels: Sequence[Label], identifier: str) -> list[Item]:
    """Positives keep their prompt; negatives get the identifier in front of it."""
    return [
        Item(
            label.sample.file,
            identifier + label.sample.prompt if label.kind == "negative" else label.sample.prompt,
            label.kind,
        )
        for label in labels
    ]


def regularization_items(source: Path, limit: int = 0) -> list[Item]:
    """Images with their captions from a folder with `metadata.jsonl`, or a JSONL file;
    at most `limit` (0 = all), in file order. Raises `DatasetError` naming the problem."""
    source = Path(source)
    index = source / "metadata.jsonl" if source.is_dir() else source
    if not index.is_file():
        raise DatasetError(
            f"no regularization data at {source}: expected a folder with metadata.jsonl or a "
            "JSONL file of {file_name, caption}"
        )
    items = []
    for number, line in enumerate(index.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name, caption = row["file_name"], row["caption"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DatasetError(
                f"{index}, line {number}: expected a JSON object with file_name and caption"
            ) from None
        path = index.parent / name
        if not path.is_file():
            raise DatasetError(f"{index}, line {number}: no image file {path}")
        items.append(Item(str(path.resolve()), str(caption), "regularization"))
        if limit and len(items) >= limit:
            break
    return items


def write_items(path: Path, items: Sequence[Item]) -> None:
    path.write_text("".join(json.dumps(asdict(item)) + "\n" for item in items))


def read_items(path: Path) -> list[Item]:
    return [Item(**json.loads(line)) for line in path.read_text().splitlines() if line]


def counts(items: Sequence[Item]) -> dict[str, int]:
    return {kind: sum(item.kind == kind for item in items) for kind in KINDS}


@dataclass(frozen=True)
class TrainTransform:
    """The reference's training transform (torchvision's Resize, bilinear, on the short
    side; RandomCrop or CenterCrop; optional RandomHorizontalFlip; ToTensor; Normalize to
    [-1, 1]), drawing its crop and flip, in torchvision's order, from the generator it is
    given instead of torch's global one."""

    resolution: int
    center_crop: bool
    random_flip: bool

    def __call__(self, image: Image.Image, generator: torch.Generator) -> torch.Tensor:
        image = self.resize(image)
        return self.apply(image, *self.draw(image.size, generator))

    def resize(self, image: Image.Image) -> Image.Image:
        """Resized (bilinear) to the resolution on the short side."""
        return TF.resize(image, self.resolution, interpolation=InterpolationMode.BILINEAR)

    def draw(self, size: tuple[int, int], generator: torch.Generator) -> tuple[int, int, bool]:
        """The crop's top and left and the flip of a resized image of `size` (width,
        height), drawn in torchvision's order (a centre crop draws nothing)."""
        width, height = size
        resolution = self.resolution
        if self.center_crop:
            # torchvision's centre crop rounds this way
            top = round((height - resolution) / 2.0)
            left = round((width - resolution) / 2.0)
        elif (width, height) != (resolution, resolution):
            top = int(torch.randint(0, height - resolution + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - resolution + 1, (1,), generator=generator))
        else:
            top = left = 0
        flip = bool(self.random_flip and torch.rand(1, generator=generator) < 0.5)
        return top, left, flip

    def apply(self, image: Image.Image, top: int, left: int, flip: bool) -> torch.Tensor:
        """A resized image cropped at (top, left), flipped if `flip`, in [-1, 1]."""
        image = TF.crop(image, top, left, self.resolution, self.resolution)
        if flip:
            image = TF.hflip(image)
        return TF.normalize(TF.to_tensor(image), [0.5], [0.5])


def image_transform(resolution: int, *, center_crop: bool, random_flip: bool) -> TrainTransform:
    """The reference's training transform."""
    return TrainTransform(resolution, center_crop, random_flip)


class FinetuneDataset(Dataset):
    """Pixels in [-1, 1] and caption token ids of the fine-tuning items.

    The random crop (and flip, and prompt dropout) of an item is drawn from a local
    generator seeded by (seed, epoch, index), never from or into the global ones: a data
    loader that fetches ahead (accelerate's does) or worker processes then change nothing,
    a run resumed mid-epoch sees exactly the crops, and the noise, of an uninterrupted one,
    and an item fetched in the training process (num_workers = 0) leaves the CUDA
    generator that draws the training noise alone (`torch.manual_seed` would reseed it)."""

    def __init__(
        self,
        items: Sequence[Item],
        root: Path,
        tokenizer: Any,
        transform: Any,
        prompt_dropout: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.items = list(items)
        self.root = root
        self.tokenizer = tokenizer
        self.transform = transform
        self.prompt_dropout = prompt_dropout
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = self.items[index]
        generator = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + self.epoch) * 1_000_003 + index
        )
        with Image.open(self.root / item.file) as image:
            pixels = self.transform(image.convert("RGB"), generator)
        dropped = bool(torch.rand((), generator=generator) < self.prompt_dropout)
        caption = "" if dropped else item.caption
        return {"pixel_values": pixels, "input_ids": tokenize(self.tokenizer, [caption])[0]}


def tokenize(tokenizer: Any, captions: Sequence[str]) -> torch.Tensor:
    return tokenizer(
        list(captions),
        max_length=tokenizer.model_max_length,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
    ).input_ids


def collate(examples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    pixels = torch.stack([e["pixel_values"] for e in examples])
    return {
        "pixel_values": pixels.to(memory_format=torch.contiguous_format).float(),
        "input_ids": torch.stack([e["input_ids"] for e in examples]),
    }


class EpochShuffle(Sampler[int]):
    """A shuffle fixed by (seed, epoch), so that a resumed run sees the same order and can
    skip the batches it already trained on (accelerate calls `set_epoch`)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Any:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())
