"""Training examples: one prompt, the K images shown, and what the person chose.

Examples come from the choices database or from a dataset folder in the paper's HPD layout
(what `hps export --format hpd` writes). Splits are by prompt, so a prompt never sits on
both sides: a dataset's own train/test split is kept (HPD's), and everything else is placed
by its prompt's hash, which is stable as data grows. A prompt is its normalised text alone
(`db.prompts.text_hash`): the classifier and the exports see no negative prompt, so a text
used with and without one is one prompt, on one side. `prompt_split` is that rule for a round
of the database; training and `hps export` both use it, so they agree on every round.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from db import datasets as db_datasets
from db.connect import Executor
from db.prompts import text_hash

if TYPE_CHECKING:
    from pipeline.images import ImageInput

SPLITS = ("train", "val", "test")


class DatasetError(Exception):
    """A dataset folder that does not hold what its layout promises, or a choice that does
    not fit its round; says where."""


@dataclass(frozen=True)
class Example:
    prompt: str
    images: tuple[str, ...]  # image-store keys, or file paths for folder datasets
    chosen: int | None  # index into `images`; None = a tie ("can't decide")
    split: str  # train | val | test
    key: str  # stable identity, e.g. "choice:12" or "hpd:345"
    group: str  # the prompt text's hash (`db.prompts.text_hash`): splits, weights, intervals
    weight: float = 1.0

    @property
    def k(self) -> int:
        return len(self.images)


def assign_split(
    group: str, declared: str | None, *, val_fraction: float, test_fraction: float
) -> str:
    """A dataset's test split stays test; the rest is placed by the prompt hash (a
    declared train split only ever yields train or val)."""
    position = int(hashlib.sha256(group.encode()).hexdigest()[:12], 16) / 16**12
    if declared == "test":
        return "test"
    if declared is None and position < test_fraction:
        return "test"
    if position >= 1 - val_fraction:
        return "val"
    return "train"


def prompt_split(
    group: str,
    declared: str | None,
    *,
    prompt_tested: bool,
    prompt_undeclared: bool,
    val_fraction: float,
    test_fraction: float,
) -> str:
    """The split of a round of the database, given what the other rounds of its prompt say:
    test if any of them is declared test, or if any has no declared split and the prompt's
    hash places it in test (`assign_split` of that round); otherwise its own `assign_split`.
    So a prompt is test on every round or on none, whichever rounds a caller reads (the
    training examples or an export's)."""
    fractions = {"val_fraction": val_fraction, "test_fraction": test_fraction}
    if prompt_tested or (prompt_undeclared and assign_split(group, None, **fractions) == "test"):
        return "test"
    return assign_split(group, declared, **fractions)


def chosen_index(positions: Sequence[int], chosen_position: int | None, where: str) -> int | None:
    """The index among the shown images of the chosen one (None for no pick). Raises
    `DatasetError` naming `where` if the chosen image is not among those shown (e.g. it was
    withheld by the safety checker after the choice was made)."""
    if chosen_position is None:
        return None
    try:
        return list(positions).index(chosen_position)
    except ValueError:
        raise DatasetError(
            f"{where}: the chosen image (position {chosen_position}) is not among the images "
            f"shown (positions {', '.join(map(str, positions))})"
        ) from None


def one_side_per_prompt(examples: list[Example]) -> list[Example]:
    """A prompt with any test example is test everywhere. The hash alone already keeps a
    prompt on one side, but a dataset's declared test split can put a prompt in test that
    other rounds (a live /dream, the other file of a dataset) would place in train."""
    tested = {e.group for e in examples if e.split == "test"}
    return [replace(e, split="test") if e.group in tested else e for e in examples]


def weight_by_prompt(examples: Sequence[Example]) -> list[Example]:
    """Weight each example 1/(examples of its prompt in its split), rescaled to a mean of 1
    per split, so that prolific prompts do not dominate and the loss scale stays put."""
    counts = Counter((e.split, e.group) for e in examples)
    raw = [1.0 / counts[(e.split, e.group)] for e in examples]
    totals: Counter[str] = Counter()
    sizes: Counter[str] = Counter(e.split for e in examples)
    for e, w in zip(examples, raw, strict=True):
        totals[e.split] += w
    return [
        replace(e, weight=w * sizes[e.split] / totals[e.split])
        for e, w in zip(examples, raw, strict=True)
    ]


async def examples_from_db(
    db: Executor,
    *,
    all_choosers: bool = False,
    include_contains_name: bool = False,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> list[Example]:
    """Examples from the choices database (see `db.datasets.training_choices` for who and
    what counts); images are image-store keys."""
    choices = await db_datasets.training_choices(
        db, all_choosers=all_choosers, include_contains_name=include_contains_name
    )
    examples = [
        Example(
            prompt=c.prompt,
            images=tuple(c.image_keys),
            chosen=chosen_index(
                c.positions,
                c.chosen_position if c.verdict == "pick" else None,
                f"choice {c.choice_id} (round {c.round_id})",
            ),
            split=prompt_split(
                c.text_hash,
                c.split,
                prompt_tested=c.prompt_tested,
                prompt_undeclared=c.prompt_undeclared,
                val_fraction=val_fraction,
                test_fraction=test_fraction,
            ),
            key=f"choice:{c.choice_id}",
            group=c.text_hash,
        )
        for c in choices
    ]
    return weight_by_prompt(one_side_per_prompt(examples))


HPD_FILES = {"train": "preference_train.json", "test": "preference_test.json"}
HPD_IMAGES = "preference_images"


@dataclass(frozen=True)
class HPDRecord:
    id: int
    prompt: str
    files: tuple[Path, ...]  # resolved image paths
    human_preference: int
    user_hash: str
    contain_name: bool
    split: str  # the file it came from: train | test


MAX_LISTED_PROBLEMS = 10


def read_hpd(folder: Path) -> list[HPDRecord]:
    """Read and check an HPD-layout folder: `preference_train.json` and/or
    `preference_test.json` (JSON lists of records) and `preference_images/`. Raises
    `DatasetError` listing the bad records (each by its file, number and id, with what is
    wrong; the first `MAX_LISTED_PROBLEMS` of them), so that one pass finds them all; reads
    no image data."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder} is not a folder")
    present = {
        split: folder / name for split, name in HPD_FILES.items() if (folder / name).is_file()
    }
    if not present:
        raise DatasetError(
            f"{folder} holds neither {HPD_FILES['train']} nor {HPD_FILES['test']} (HPD layout)"
        )
    records: list[HPDRecord] = []
    problems: list[str] = []
    seen: dict[int, str] = {}
    for split, path in present.items():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DatasetError(f"{path.name}: not valid JSON ({exc})") from None
        if not isinstance(data, list):
            raise DatasetError(f"{path.name}: expected a JSON list of records")
        for number, raw in enumerate(data, start=1):
            where = f"{path.name} record {number}"
            if isinstance(raw, dict) and isinstance(raw.get("id"), int):
                where += f" (id {raw['id']})"
            try:
                record = _hpd_record(folder, raw, split, where)
            except DatasetError as exc:
                problems.append(str(exc))
                continue
            if record.id in seen:
                problems.append(
                    f"{where}: the id appears twice (also in {HPD_FILES[seen[record.id]]})"
                )
                continue
            seen[record.id] = split
            records.append(record)
    if problems:
        listed = "\n".join(f"- {p}" for p in problems[:MAX_LISTED_PROBLEMS])
        more = len(problems) - MAX_LISTED_PROBLEMS
        raise DatasetError(
            f"{folder}: {len(problems)} bad record(s), nothing imported:\n{listed}"
            + (f"\n- and {more} more" if more > 0 else "")
        )
    return records


def _hpd_record(folder: Path, raw: Any, split: str, where: str) -> HPDRecord:
    expected = {
        "human_preference": int,
        "prompt": str,
        "id": int,
        "file_path": list,
        "user_hash": str,
        "contain_name": bool,
    }
    if not isinstance(raw, dict):
        raise DatasetError(f"{where}: expected an object")
    for name, kind in expected.items():
        value = raw.get(name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise DatasetError(f"{where}: {name!r} must be a {kind.__name__}")
    files = raw["file_path"]
    if not all(isinstance(f, str) for f in files):
        raise DatasetError(f"{where}: 'file_path' must list image paths (strings)")
    if not 2 <= len(files) <= 16:
        raise DatasetError(
            f"{where}: 'file_path' lists {len(files)} image(s); a round shows 2 to 16"
        )
    if not 0 <= raw["human_preference"] < len(files):
        raise DatasetError(
            f"{where}: 'human_preference' {raw['human_preference']} is not an index of "
            f"its {len(files)} images"
        )
    if not raw["prompt"].strip():
        raise DatasetError(f"{where}: empty prompt")
    return HPDRecord(
        id=raw["id"],
        prompt=raw["prompt"],
        files=tuple(_hpd_image(folder, f, where) for f in files),
        human_preference=raw["human_preference"],
        user_hash=raw["user_hash"],
        contain_name=raw["contain_name"],
        split=split,
    )


def _hpd_image(folder: Path, name: str, where: str) -> Path:
    # Paths in the released files may be relative to the folder or bare file names.
    for candidate in (folder / name, folder / HPD_IMAGES / Path(name).name):
        if candidate.is_file() and candidate.resolve().is_relative_to(folder.resolve()):
            return candidate
    raise DatasetError(f"{where}: image {name!r} not found in {folder}")


def examples_from_folder(
    folder: Path,
    *,
    include_contains_name: bool = False,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> list[Example]:
    """Examples from an HPD-layout folder; images are file paths."""
    examples = []
    for record in read_hpd(folder):
        if record.contain_name and not include_contains_name:
            continue
        group = text_hash(record.prompt)
        examples.append(
            Example(
                prompt=record.prompt,
                images=tuple(str(p) for p in record.files),
                chosen=record.human_preference,
                split=assign_split(
                    group, record.split, val_fraction=val_fraction, test_fraction=test_fraction
                ),
                key=f"hpd:{record.id}",
                group=group,
            )
        )
    return weight_by_prompt(one_side_per_prompt(examples))


# Pick-a-Pic's split names (as PickScore's dataset and `hps export --format pickapic` name
# them) for ours; its `*_unique` splits (one pair per prompt) are asked for by their names.
PICKAPIC_SPLITS = {"train": "train", "val": "validation", "test": "test"}


def is_pickapic(folder: Path) -> bool:
    """Whether `folder` holds Pick-a-Pic pairs as Parquet files (`data/<split>-*.parquet`,
    Pick-a-Pic's and `hps export --format pickapic`'s layout)."""
    return any(Path(folder).glob("data/*.parquet"))


def examples_from_pickapic(folder: Path, split: str) -> tuple[list[Example], Reader]:
    """Examples of one split of a Pick-a-Pic folder (`split`: ours, test/val/train, or one
    of its own, such as test_unique): each labelled pair is a choice between its two
    images (`label_0`/`label_1` 1/0 or 0/1; 0.5/0.5 is a tie), read from the rows' image
    bytes. Returns the examples and the reader of their image references."""
    import pyarrow.parquet as pq

    name = PICKAPIC_SPLITS.get(split, split)
    files = sorted(Path(folder).glob(f"data/{name}-*.parquet"))
    if not files:
        found = sorted({f.name.split("-")[0] for f in Path(folder).glob("data/*.parquet")})
        raise DatasetError(
            f"{folder} has no {name} split (data/{name}-*.parquet); it has: {', '.join(found)}"
        )
    columns = ["caption", "jpg_0", "jpg_1", "label_0", "label_1"]
    images: dict[str, bytes] = {}
    examples = []
    for file in files:
        table = pq.read_table(file)
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise DatasetError(f"{file}: not Pick-a-Pic pairs (no {', '.join(missing)} column)")
        labelled = (
            table.column("has_label").to_pylist() if "has_label" in table.column_names else None
        )
        rows = table.select(columns).to_pylist()
        for number, row in enumerate(rows):
            if labelled is not None and not labelled[number]:
                continue
            where = f"{file.name}:{number}"
            refs = (f"{where}:0", f"{where}:1")
            images[refs[0]], images[refs[1]] = row["jpg_0"], row["jpg_1"]
            chosen = {(1.0, 0.0): 0, (0.0, 1.0): 1}.get((row["label_0"], row["label_1"]))
            group = text_hash(row["caption"])
            examples.append(
                Example(row["caption"], refs, chosen, split, f"pickapic:{where}", group)
            )
    return examples, images.__getitem__


def split_counts(examples: Sequence[Example]) -> dict[str, int]:
    counts = Counter(e.split for e in examples)
    return {split: counts.get(split, 0) for split in SPLITS}


def fingerprint(examples: Sequence[Example]) -> str:
    """Identifies a set of examples: two evaluations compare only on the same one."""
    keys = sorted(f"{e.key}:{e.chosen}" for e in examples)
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


Reader = Callable[[str], "ImageInput"]


def read_path(ref: str) -> ImageInput:
    """The reader of folder datasets (a module-level function: DataLoader workers pickle it)."""
    return ref
