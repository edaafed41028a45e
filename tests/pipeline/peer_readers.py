"""The public code our exports exist for, re-implemented as it reads them.

Each reader follows one upstream file, named with the commit read: the code here is ours,
the behaviour (what it loads, which columns it reads and how, what it drops) is theirs.
Where the upstream code has options, the defaults are kept and the others are parameters.

- PickScore (github.com/yuvalkirstain/PickScore @ ca44324): `CLIPHFDataset` in
  trainer/datasetss/clip_hf_dataset.py (its config's defaults, `load_hf_dataset`, the
  filters, `__getitem__`, `process_image`, `collate_fn`) and the example weights of
  `CLIPCriterion.calc_loss` in trainer/criterions/clip_criterion.py.
- Diffusion-DPO (github.com/SalesforceAIResearch/DiffusionDPO @ 8d3ee5c): train.py's `main`,
  from `load_dataset` to the DataLoader: the caption column check, the elimination of
  0.5/0.5 labels when "pickapic" is in `--dataset_name`, `preprocess_train` and `collate_fn`
  of the DPO method (SDXL's raw captions, so no tokenizer is needed).
- HPSv2 (github.com/tgxs002/HPSv2 @ 20969aa): `HPDDataset` (evaluation path) and
  `collate_pref` in hpsv2/src/training/data.py, and how `evaluate_preference` in
  hpsv2/src/training/train.py compares the labels.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch
from PIL import Image

# ---- PickScore -------------------------------------------------------------------------


@dataclass
class PickScoreConfig:
    """`CLIPHFDatasetConfig`'s fields and defaults (those the dataset reads)."""

    dataset_name: str
    # Upstream's default is the string "null", which datasets 2.10.1 (PickScore's pin)
    # accepts for any folder; datasets >= 2.14 only knows the configs a dataset card names.
    dataset_config_name: str | None = "null"
    from_disk: bool = False
    train_split_name: str = "train"
    valid_split_name: str = "validation_unique"
    test_split_name: str = "test_unique"
    caption_column_name: str = "caption"
    input_ids_column_name: str = "input_ids"
    image_0_column_name: str = "jpg_0"
    image_1_column_name: str = "jpg_1"
    label_0_column_name: str = "label_0"
    label_1_column_name: str = "label_1"
    are_different_column_name: str = "are_different"
    has_label_column_name: str = "has_label"
    pixels_0_column_name: str = "pixel_values_0"
    pixels_1_column_name: str = "pixel_values_1"
    num_examples_per_prompt_column_name: str = "num_example_per_prompt"
    keep_only_different: bool = False
    keep_only_with_label: bool = False
    keep_only_with_label_in_non_train: bool = True
    limit_examples_per_prompt: int = -1
    cache_dir: str | None = None


class PickScoreDataset(torch.utils.data.Dataset):
    """`CLIPHFDataset` (without its `only_on_best` option). `processor` is a
    `transformers.CLIPProcessor` (upstream: `AutoProcessor` of the model)."""

    def __init__(self, cfg: PickScoreConfig, processor: Any, split: str = "train") -> None:
        from datasets import Dataset, load_dataset, load_from_disk

        self.cfg, self.split = cfg, split
        if cfg.from_disk:
            self.dataset = load_from_disk(cfg.dataset_name)[split]
        else:
            self.dataset = load_dataset(
                cfg.dataset_name, cfg.dataset_config_name, cache_dir=cfg.cache_dir, split=split
            )
        if cfg.keep_only_different:
            self.dataset = self.dataset.filter(lambda x: x[cfg.are_different_column_name])
        non_train = cfg.keep_only_with_label_in_non_train and split != cfg.train_split_name
        if cfg.keep_only_with_label or non_train:
            self.dataset = self.dataset.filter(lambda x: x[cfg.has_label_column_name])
        if cfg.limit_examples_per_prompt > 0:
            frame = self.dataset.to_pandas().drop("__index_level_0__", axis=1)
            frame = frame.groupby(cfg.caption_column_name).head(cfg.limit_examples_per_prompt)
            self.dataset = Dataset.from_pandas(frame)
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor

    def tokenize(self, example: dict[str, Any]) -> torch.Tensor:
        return self.tokenizer(
            example[self.cfg.caption_column_name],
            max_length=self.tokenizer.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids

    def process_image(self, image: Any) -> torch.Tensor:
        if isinstance(image, dict):
            image = image["bytes"]
        if isinstance(image, bytes):
            image = Image.open(io.BytesIO(image))
        return self.image_processor(image.convert("RGB"), return_tensors="pt")["pixel_values"]

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        cfg, example = self.cfg, self.dataset[idx]
        return {
            cfg.input_ids_column_name: self.tokenize(example),
            cfg.pixels_0_column_name: self.process_image(example[cfg.image_0_column_name]),
            cfg.pixels_1_column_name: self.process_image(example[cfg.image_1_column_name]),
            cfg.label_0_column_name: torch.tensor(example[cfg.label_0_column_name])[None],
            cfg.label_1_column_name: torch.tensor(example[cfg.label_1_column_name])[None],
            cfg.num_examples_per_prompt_column_name: torch.tensor(
                example[cfg.num_examples_per_prompt_column_name]
            )[None],
        }

    def collate_fn(self, batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        names = (
            cfg.input_ids_column_name,
            cfg.pixels_0_column_name,
            cfg.pixels_1_column_name,
            cfg.label_0_column_name,
            cfg.label_1_column_name,
            cfg.num_examples_per_prompt_column_name,
        )
        collated = {name: torch.cat([item[name] for item in batch], dim=0) for name in names}
        for name in (cfg.pixels_0_column_name, cfg.pixels_1_column_name):
            collated[name] = collated[name].to(memory_format=torch.contiguous_format).float()
        return collated

    def __len__(self) -> int:
        return len(self.dataset)


def pickscore_example_weights(num_examples_per_prompt: torch.Tensor) -> torch.Tensor:
    """The weight `CLIPCriterion.calc_loss` gives each example of a batch: 1 / its
    `num_example_per_prompt`, normalised to sum to 1 over the batch."""
    absolute = 1 / num_examples_per_prompt
    return absolute / absolute.sum()


# ---- Diffusion-DPO -----------------------------------------------------------------------


def diffusion_dpo_batches(
    dataset_name: str,
    *,
    split: str = "train",
    resolution: int = 16,
    batch_size: int = 1,
    caption_column: str = "caption",
    cache_dir: str | None = None,
) -> list[dict[str, Any]]:
    """The batches train.py's DPO loop gets (in order: `shuffle` only changes the order; and
    `--no_hflip`, so the transform is deterministic): `pixel_values` of shape
    [batch, 6, res, res], the preferred image's channels first, and `caption`."""
    from datasets import load_dataset
    from torchvision import transforms

    # --dataset_config_name and --train_data_dir: None by default
    dataset = load_dataset(dataset_name, None, cache_dir=cache_dir)
    column_names = dataset[split].column_names
    if caption_column not in column_names:
        raise ValueError(
            f"--caption_column' value '{caption_column}' needs to be one of: "
            f"{', '.join(column_names)}"
        )
    train_transforms = transforms.Compose(
        [
            transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(resolution),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ]
    )

    def preprocess_train(examples: dict[str, list[Any]]) -> dict[str, list[Any]]:
        pixels = [
            [
                train_transforms(Image.open(io.BytesIO(data)).convert("RGB"))
                for data in examples[column]
            ]
            for column in ("jpg_0", "jpg_1")
        ]
        combined = []
        for pair, label_0 in zip(zip(*pixels, strict=True), examples["label_0"], strict=True):
            if label_0 == 0:  # image 1 preferred: it goes first
                pair = pair[::-1]
            combined.append(torch.cat(pair, dim=0))
        examples["pixel_values"] = combined
        return examples

    if "pickapic" in dataset_name:  # eliminate no-decisions (0.5-0.5 labels)
        keep = [i for i, label in enumerate(dataset[split]["label_0"]) if label in (0, 1)]
        dataset[split] = dataset[split].select(keep)
    train_dataset = dataset[split].with_transform(preprocess_train)

    def collate_fn(examples: list[dict[str, Any]]) -> dict[str, Any]:
        pixel_values = torch.stack([example["pixel_values"] for example in examples])
        return {
            "pixel_values": pixel_values.to(memory_format=torch.contiguous_format).float(),
            "caption": [example["caption"] for example in examples],
        }

    loader = torch.utils.data.DataLoader(
        train_dataset, shuffle=False, collate_fn=collate_fn, batch_size=batch_size, drop_last=True
    )
    return list(loader)


# ---- HPSv2 ------------------------------------------------------------------------------


class HPDDataset(torch.utils.data.Dataset):
    """`HPDDataset(meta_file, image_folder, transforms, tokenizer, is_train=False)`. Upstream
    answers any error reading a record (a missing image, a bad label) with the next record,
    silently; this one counts those in `failed` so a test can require none."""

    def __init__(
        self,
        meta_file: str,
        image_folder: str,
        transforms: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[str], torch.Tensor],
    ) -> None:
        self.transforms, self.tokenizer, self.image_folder = transforms, tokenizer, image_folder
        with open(meta_file) as f:
            self.table = pa.Table.from_pylist(json.load(f))
        self.failed: list[tuple[int, str]] = []

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, idx: int) -> tuple[list[torch.Tensor], Any, torch.Tensor]:
        try:
            images = [
                self.transforms(Image.open(os.path.join(self.image_folder, name)))
                for name in self.table.column("file_path")[idx].as_py()
            ]
            if len({image.size() for image in images}) != 1:
                self.failed.append((idx, "images of different sizes"))
                return self[(idx + 1) % len(self)]
            label = self.table.column("human_preference")[idx].as_py()
            caption = self.tokenizer(self.table.column("prompt")[idx].as_py())
            return images, label, caption
        except Exception as exc:  # upstream: a bare except, then the next record
            self.failed.append((idx, repr(exc)))
            return self[(idx + 1) % len(self)]


def collate_pref(
    batch: list[tuple[list[torch.Tensor], Any, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`collate_pref`: all images of the batch, how many each record has, the labels (the
    preferred image's index: `evaluate_preference` compares it with the argmax of the
    record's scores) and the captions."""
    images = [torch.stack(sample[0]) for sample in batch]
    num_images = torch.tensor([group.size(0) for group in images])
    labels = torch.tensor([sample[1] for sample in batch])
    captions = torch.cat([sample[2] for sample in batch])
    return torch.cat(images), num_images, labels, captions
