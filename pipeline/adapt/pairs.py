"""Preference pairs for Diffusion-DPO: one prompt's preferred image (the winner) and another
image shown with it (the loser), and where they come from.

- The choices database (`pairs_from_db`): each counted pick among K shown images gives K−1
  pairs, the chosen image against each other one; ties ("can't decide") and "none of
  these" give none. Who counts is training's rule (`pipeline.data.examples_from_db`: no
  flagged choice, no banned, shadow-banned or forgotten chooser; the requester's picks
  only unless `adapt.dpo_choosers = all`; prompts naming people only with
  `adapt.include_contains_name`), and so is the split: a prompt the classifier's training
  holds out for test (`pipeline.data.prompt_split`, `train.val_fraction` and
  `train.test_fraction`) is never used. Rounds imported from an HPD dataset (`hps import`)
  are rounds like any other.
- An HPD-layout folder (`--data`, as `hps train --data` reads it): its records are picks.
- A Pick-a-Pic-format folder (`--data`): what `hps export --format pickapic` writes, or
  Pick-a-Pic itself (Parquet with `caption`, `jpg_0`, `jpg_1`, `label_0`, `label_1`). As
  Diffusion-DPO's train.py reads Pick-a-Pic: rows with a 0.5/0.5 label (a tie) are dropped,
  and the image with label 1 is the winner. Its `train` split trains, its `validation`
  split is held out, the others are not read.

Sides: `train` pairs are trained on; `heldout` pairs (the validation split's, any pair
of a prompt the offline evaluation holds out, `adapt.heldout_fraction`, and any pair whose
caption the offline evaluation is run on: `hold_out_captions`) are never trained on and
measure the adapter's implicit accuracy. At most `adapt.dpo_max_pairs` training
pairs (0 = all) and `adapt.dpo_heldout_pairs` held-out ones are kept: a seeded sample of the
database's, the first in file order of a folder's (reading further would mean extracting
images that are not used).

Images: database pairs name their images by image-store key and are read from the store
(`ctx.store`, whatever backs it). A folder's images are put into the run's own store
(`images/`, content-addressed: an image in several pairs is stored once), so every pair
names its images by key and the trainer reads them one way.
"""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from db.connect import Executor
from db.prompts import text_hash
from hps.settings import AdaptSettings
from hps.store import ImageStore
from pipeline.data import HPD_FILES, DatasetError, Example, examples_from_db, examples_from_folder
from pipeline.dataset_folder import PairFolderError, parquet_splits, read_pairs

PAIRS_FILE = "pairs.jsonl"
SIDES = ("train", "heldout")


@dataclass(frozen=True)
class Pair:
    caption: str
    winner: str  # image key (in the platform's store, or the run's)
    loser: str
    side: str  # train | heldout
    key: str  # where it came from: "choice:<id>:<loser index>", "hpd:<id>:…", "pickapic:…"


@dataclass
class PairSet:
    pairs: list[Pair]
    counts: dict[str, Any]  # what was read and left out, for the stage's record

    def side(self, side: str) -> list[Pair]:
        return [p for p in self.pairs if p.side == side]


def pairs_of_examples(
    examples: Iterable[Example], held_out: Callable[[str], bool]
) -> tuple[list[Pair], Counter[str]]:
    """The pairs of picks (K−1 each; none from a tie), on the held-out side when the
    example's split is val or its prompt is `held_out`; test examples give none. Also
    counts what it read."""
    pairs: list[Pair] = []
    counts: Counter[str] = Counter()
    for e in examples:
        if e.chosen is None:
            counts["ties"] += 1
            continue
        if e.split == "test":
            counts["test_picks"] += 1
            continue
        counts["picks"] += 1
        side = "heldout" if e.split == "val" or held_out(e.prompt) else "train"
        pairs += [
            Pair(e.prompt, e.images[e.chosen], e.images[other], side, f"{e.key}:{other}")
            for other in range(e.k)
            if other != e.chosen
        ]
    return pairs, counts


def sample_sides(pairs: Sequence[Pair], recipe: AdaptSettings) -> list[Pair]:
    """At most `dpo_max_pairs` training pairs (0 = all) and `dpo_heldout_pairs` held-out
    ones, each a seeded sample, in their original order."""
    rng = random.Random(recipe.seed)
    limits = {"train": recipe.dpo_max_pairs, "heldout": recipe.dpo_heldout_pairs}
    kept: set[int] = set()
    for side, limit in limits.items():
        indices = [i for i, p in enumerate(pairs) if p.side == side]
        if side == "train" and limit == 0:
            limit = len(indices)
        kept.update(rng.sample(indices, min(limit, len(indices))))
    return [p for i, p in enumerate(pairs) if i in kept]


async def pairs_from_db(
    db: Executor,
    recipe: AdaptSettings,
    *,
    held_out: Callable[[str], bool],
    val_fraction: float,
    test_fraction: float,
) -> PairSet:
    """The database's pairs (module docstring); their images are image-store keys."""
    examples = await examples_from_db(
        db,
        all_choosers=recipe.dpo_choosers == "all",
        include_contains_name=recipe.include_contains_name,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
    )
    pairs, counts = pairs_of_examples(examples, held_out)
    return PairSet(sample_sides(pairs, recipe), {"source": "database", **counts})


def drop_missing(found: PairSet, store: ImageStore) -> PairSet:
    """The pairs whose two images are in `store` (the others counted as
    `missing_images`), each image asked for once."""
    keys = {k for p in found.pairs for k in (p.winner, p.loser)}
    present = {key: store.exists(key) for key in keys}
    kept = [p for p in found.pairs if present[p.winner] and present[p.loser]]
    return PairSet(kept, {**found.counts, "missing_images": len(found.pairs) - len(kept)})


def data_format(folder: Path) -> str:
    """ "hpd" (an HPD-layout folder) or "pickapic" (Parquet pairs); `DatasetError` if it is
    neither."""
    folder = Path(folder)
    if any((folder / name).is_file() for name in HPD_FILES.values()):
        return "hpd"
    try:
        splits = parquet_splits(folder)
    except PairFolderError as exc:
        raise DatasetError(
            f"{exc}: --data takes an HPD-layout folder or a Pick-a-Pic-format folder"
        ) from None
    if "train" not in splits:
        raise DatasetError(
            f"{folder} has no train split (data/train-*.parquet); it has "
            f"{', '.join(sorted(splits))}"
        )
    return "pickapic"


def pairs_from_folder(
    folder: Path,
    images: ImageStore,
    recipe: AdaptSettings,
    *,
    held_out: Callable[[str], bool],
    val_fraction: float,
    test_fraction: float,
) -> PairSet:
    """A folder's pairs (module docstring), their images put into `images`."""
    if data_format(folder) == "hpd":
        examples = examples_from_folder(
            folder,
            include_contains_name=recipe.include_contains_name,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
        )
        pairs, counts = pairs_of_examples(examples, held_out)
        pairs = sample_sides(pairs, recipe)
        keys = {path: _put(images, Path(path).read_bytes(), path) for path in _images_of(pairs)}
        pairs = [Pair(p.caption, keys[p.winner], keys[p.loser], p.side, p.key) for p in pairs]
        return PairSet(pairs, {"source": f"hpd:{folder}", **counts})
    return _pickapic_pairs(folder, images, recipe, held_out)


def _images_of(pairs: Iterable[Pair]) -> list[str]:
    return list(dict.fromkeys(ref for p in pairs for ref in (p.winner, p.loser)))


def _pickapic_pairs(
    folder: Path, images: ImageStore, recipe: AdaptSettings, held_out: Callable[[str], bool]
) -> PairSet:
    splits = parquet_splits(folder)
    limits = {"train": recipe.dpo_max_pairs or None, "heldout": recipe.dpo_heldout_pairs}
    pairs: list[Pair] = []
    counts: Counter[str] = Counter()
    taken: Counter[str] = Counter()

    def full(side: str) -> bool:
        return limits[side] is not None and taken[side] >= limits[side]

    for split, files in (("train", splits["train"]), ("validation", splits.get("validation", []))):
        for number, row in enumerate(read_pairs(files)):
            if full("heldout") and (split == "validation" or full("train")):
                break
            if row["label_0"] not in (0, 1):  # a tie (0.5/0.5): Diffusion-DPO drops it
                counts["ties"] += 1
                continue
            caption = str(row["caption"])
            side = "heldout" if split == "validation" or held_out(caption) else "train"
            if full(side):
                continue
            counts["picks"] += 1
            winner, loser = (row["jpg_0"], row["jpg_1"])[:: 1 if row["label_0"] == 1 else -1]
            where = f"{folder}: {split} row {number}"
            keys = [_put(images, data, where) for data in (winner, loser)]
            pairs.append(Pair(caption, keys[0], keys[1], side, f"pickapic:{split}:{number}"))
            taken[side] += 1
    return PairSet(pairs, {"source": f"pickapic:{folder}", **counts})


def _put(images: ImageStore, data: bytes, where: str) -> str:
    """Store an image's bytes; its key. `DatasetError` naming `where` if it is no image."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind = (image.format or "png").lower()
    except (UnidentifiedImageError, OSError):
        raise DatasetError(f"{where}: not a decodable image") from None
    return images.put(data, "." + {"jpeg": "jpg"}.get(kind, kind)).key


def write_pairs(path: Path, pairs: Sequence[Pair]) -> None:
    path.write_text("".join(json.dumps(asdict(p)) + "\n" for p in pairs))


def read_pairs_file(path: Path) -> list[Pair]:
    return [Pair(**json.loads(line)) for line in path.read_text().splitlines() if line]


def heldout_captions(pairs: Sequence[Pair], limit: int) -> list[str]:
    """Up to `limit` distinct captions of the held-out pairs (never trained on)."""
    return list(dict.fromkeys(p.caption for p in pairs if p.side == "heldout"))[:limit]


def hold_out_captions(found: PairSet, captions: Iterable[str]) -> PairSet:
    """Every pair whose caption is one of `captions` (the offline evaluation's prompts;
    texts that normalise alike are one) on the held-out side: the evaluation judges the
    adapter on prompts it never trained on. A Pick-a-Pic folder's validation captions may
    appear in its train split too: those train pairs are counted as `evaluation_held_out`."""
    keys = {text_hash(c) for c in captions}
    pairs, moved = [], 0
    for p in found.pairs:
        if p.side == "train" and text_hash(p.caption) in keys:
            p, moved = replace(p, side="heldout"), moved + 1
        pairs.append(p)
    return PairSet(pairs, {**found.counts, "evaluation_held_out": moved})
