"""Training batches: each example's K preprocessed images and its soft target."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from pipeline.data import Example, Reader
from pipeline.images import open_image


class ChoiceDataset(Dataset):
    """Examples as tensors: the K preprocessed images and the soft target over them."""

    def __init__(self, examples: Sequence[Example], transform: Any, read: Reader) -> None:
        self.examples = list(examples)
        self.transform = transform
        self.read = read

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.examples[index]
        pixels = torch.stack([self.transform(open_image(self.read(i))) for i in example.images])
        return {
            "prompt": example.prompt,
            "pixels": pixels,
            "target": soft_target(example),
            "weight": example.weight,
        }


def soft_target(example: Example) -> torch.Tensor:
    """One-hot on the chosen image; uniform over the shown images for a tie."""
    if example.chosen is None:
        return torch.full((example.k,), 1.0 / example.k)
    target = torch.zeros(example.k)
    target[example.chosen] = 1.0
    return target


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """A batch: all images concatenated, with per-example counts and padded targets."""
    counts = torch.tensor([len(item["pixels"]) for item in items])
    targets = torch.zeros(len(items), int(counts.max()))
    for row, item in enumerate(items):
        targets[row, : len(item["target"])] = item["target"]
    return {
        "prompts": [item["prompt"] for item in items],
        "pixels": torch.cat([item["pixels"] for item in items]),
        "counts": counts,
        "targets": targets,
        "weights": torch.tensor([item["weight"] for item in items], dtype=torch.float32),
    }
