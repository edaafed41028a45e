"""Dataset import and export: the paper's HPD layout in, and HPD, Parquet or Pick-a-Pic out.

Import (`hps import FOLDER`): an HPD-layout folder becomes closed rounds (source `import`,
external id = the record's id, the file's split kept), their images (copied into the
content-addressed store) and the requester's pick. The whole folder is checked before
anything is written; each record is written in one transaction; records already imported
are skipped, so an import can simply be run again.

Export (`hps export OUT --format ...`), streamed from a server-side cursor in batches, so
memory stays bounded however many choices there are:
- `hpd`: the HPD layout again (the requester's picks; images copied out of the store);
- `parquet`: `choices.parquet`, one row per choice (per round with the default requester
  choosers): prompt, image keys, chosen position, model versions, seeds, generation
  parameters, timestamps, pseudonymous user ids;
- `pickapic`: `pairs.parquet` in the Pick-a-Pic layout (caption, image_0_uid/image_1_uid,
  label_0/label_1 with 0.5/0.5 for ties, model_0/model_1, user_id, ranking_id), optionally
  with the image bytes as `jpg_0`/`jpg_1` as PickScore and Diffusion-DPO read them;
- `hf`: a Hugging Face `datasets` folder with the images in it (Parquet shards per split
  under `data/` whose schema carries the `datasets` features, and a dataset card), which
  `datasets.load_dataset(OUT)` loads as train/validation/test with decoded images.
Users appear only by pseudonym; flagged choices and banned, shadow-banned and forgotten
users' choices are never exported (`db.datasets`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm.auto import tqdm

from db import datasets as db_datasets
from db.images import NewImage
from hps.store import ImageStore
from pipeline.data import HPD_FILES, HPD_IMAGES, DatasetError, HPDRecord, assign_split, read_hpd

log = logging.getLogger(__name__)

FORMATS = ("hpd", "parquet", "pickapic", "hf")
IMAGE_BATCH_ROWS = 128
_SUFFIX_OF_FORMAT = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif"}


# ---- import ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportReport:
    records: int
    imported: int
    skipped: int  # already imported


def _image_info(path: Path) -> tuple[int, int, str]:
    """Width, height and file suffix of an image, from its header."""
    try:
        with Image.open(path) as image:
            suffix = _SUFFIX_OF_FORMAT.get(image.format or "", ".img")
            return image.width, image.height, suffix
    except (OSError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"{path} is not a readable image ({exc})") from None


async def import_hpd(
    conn: asyncpg.Connection, store: ImageStore, folder: Path, *, progress: bool = True
) -> ImportReport:
    """Import an HPD-layout folder (see the module docstring). Raises `DatasetError`, with
    nothing written, if any record or image is malformed."""
    records = read_hpd(folder)
    infos = {path: _image_info(path) for record in records for path in record.files}
    existing = await db_datasets.imported_external_ids(conn, [str(r.id) for r in records])
    imported = skipped = 0
    for record in tqdm(records, desc="import", unit="round", disable=not progress):
        if str(record.id) in existing:
            skipped += 1
            continue
        round_id = await db_datasets.import_round(conn, _imported_round(record, store, infos))
        if round_id is None:
            skipped += 1
        else:
            imported += 1
    log.info("imported %d rounds from %s (%d already there)", imported, folder, skipped)
    return ImportReport(len(records), imported, skipped)


def _imported_round(
    record: HPDRecord, store: ImageStore, infos: dict[Path, tuple[int, int, str]]
) -> db_datasets.ImportedRound:
    images = []
    for position, path in enumerate(record.files, start=1):
        width, height, suffix = infos[path]
        blob = store.put(path.read_bytes(), suffix=suffix)
        images.append(NewImage(position, blob.sha256, blob.key, width=width, height=height))
    return db_datasets.ImportedRound(
        external_id=str(record.id),
        split=record.split,
        prompt=record.prompt,
        contains_name=record.contain_name,
        user_pseudonym=record.user_hash,
        images=images,
        chosen_position=record.human_preference + 1,
    )


# ---- export ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportReport:
    format: str
    rows: int  # records, rows or pairs written
    choices: int  # choices read
    path: Path


def _split(row: Any, val_fraction: float, test_fraction: float) -> str:
    """The round's declared split, else the one training would assign to its prompt."""
    if row["split"] is not None:
        return row["split"]
    return assign_split(
        row["norm_hash"], None, val_fraction=val_fraction, test_fraction=test_fraction
    )


def _prepare_target(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(f"{out} exists and is not an empty folder; choose a new one")
    out.mkdir(parents=True, exist_ok=True)


async def export_dataset(
    conn: asyncpg.Connection,
    store: ImageStore,
    out: Path,
    fmt: str,
    *,
    all_choosers: bool = False,
    with_images: bool = False,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    batch_size: int = 10_000,
    progress: bool = True,
) -> ExportReport:
    """Export the choices to the folder `out` (new or empty) in format `fmt`."""
    if fmt not in FORMATS:
        raise DatasetError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    _prepare_target(out)
    if fmt == "hf" or with_images:
        # Rows carry image bytes (a few MB each): keep a batch, and the next one read
        # meanwhile, small enough to stay bounded in memory.
        batch_size = min(batch_size, IMAGE_BATCH_ROWS)
    fractions = {"val_fraction": val_fraction, "test_fraction": test_fraction}
    bar = tqdm(desc=f"export {fmt}", unit="choice", disable=not progress)
    if fmt == "hpd":
        writer: _Writer = _HPDWriter(out, store, **fractions)
        verdicts: tuple[str, ...] = ("pick",)
        all_choosers = False  # HPD records are one requester's pick per round
    elif fmt == "parquet":
        writer = _ParquetWriter(out / "choices.parquet", _choice_table, CHOICES_SCHEMA, fractions)
        verdicts = ("pick", "tie", "none")
    elif fmt == "hf":
        writer = _HFWriter(out, store, fractions)
        verdicts = ("pick", "tie", "none")
    else:
        schema = PAIRS_SCHEMA_WITH_IMAGES if with_images else PAIRS_SCHEMA
        writer = _ParquetWriter(
            out / "pairs.parquet", _pair_table(store if with_images else None), schema, fractions
        )
        verdicts = ("pick", "tie")
    choices = 0
    # Each batch is written in a thread while the next one is read from the database.
    pending: asyncio.Future[None] | None = None
    try:
        async for batch in db_datasets.stream_export_choices(
            conn, all_choosers=all_choosers, verdicts=verdicts, batch_size=batch_size
        ):
            if pending is not None:
                await pending
            pending = asyncio.ensure_future(asyncio.to_thread(writer.write, batch))
            choices += len(batch)
            bar.update(len(batch))
        if pending is not None:
            await pending
        path = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    return ExportReport(fmt, writer.rows, choices, path)


class _Writer:
    rows = 0

    def write(self, batch: list[Any]) -> None:
        raise NotImplementedError

    def close(self) -> Path:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError


class _ParquetWriter(_Writer):
    """Batches of records → a Parquet file, written under a temporary name, renamed at the end."""

    def __init__(self, path: Path, to_table: Any, schema: pa.Schema, fractions: dict) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp")
        self.to_table = to_table
        self.fractions = fractions
        self.writer = pq.ParquetWriter(self.tmp, schema, compression="zstd")

    def write(self, batch: list[Any]) -> None:
        table = self.to_table(batch, self.fractions)
        self.writer.write_table(table)
        self.rows += table.num_rows

    def close(self) -> Path:
        self.writer.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self.writer.close()
        self.tmp.unlink(missing_ok=True)


_TS = pa.timestamp("us", tz="UTC")

CHOICES_SCHEMA = pa.schema(
    [
        ("choice_id", pa.int64()),
        ("round_id", pa.int64()),
        ("source", pa.string()),
        ("external_id", pa.string()),
        ("split", pa.string()),
        ("prompt", pa.string()),
        ("negative_prompt", pa.string()),
        ("contains_name", pa.bool_()),
        ("user_id", pa.string()),
        ("requester", pa.string()),
        ("is_requester", pa.bool_()),
        ("verdict", pa.string()),
        ("chosen_position", pa.int16()),
        ("chosen_index", pa.int16()),
        ("positions", pa.list_(pa.int16())),
        ("image_keys", pa.list_(pa.string())),
        ("model_versions", pa.list_(pa.string())),
        ("seeds", pa.list_(pa.int64())),
        ("params", pa.string()),
        ("round_created_at", _TS),
        ("created_at", _TS),
        ("updated_at", _TS),
    ]
)


# Columns copied as they come from the query (the rest are derived).
_COPIED = [n for n in CHOICES_SCHEMA.names if n not in ("split", "chosen_index", "model_versions")]


def _choice_table(batch: list[Any], fractions: dict) -> pa.Table:
    columns: dict[str, list[Any]] = {name: [row[name] for row in batch] for name in _COPIED}
    columns["model_versions"] = [row["models"] for row in batch]
    columns["split"] = [_split(row, **fractions) for row in batch]
    columns["chosen_index"] = [
        None if row["chosen_position"] is None else row["positions"].index(row["chosen_position"])
        for row in batch
    ]
    return pa.Table.from_pydict(columns, schema=CHOICES_SCHEMA)


_PAIR_FIELDS = [
    ("ranking_id", pa.int64()),
    ("round_id", pa.int64()),
    ("split", pa.string()),
    ("caption", pa.string()),
    ("user_id", pa.string()),
    ("image_0_uid", pa.string()),
    ("image_1_uid", pa.string()),
    ("label_0", pa.float64()),
    ("label_1", pa.float64()),
    ("model_0", pa.string()),
    ("model_1", pa.string()),
    ("best_image_uid", pa.string()),
    ("has_label", pa.bool_()),
    ("are_different", pa.bool_()),
    ("created_at", _TS),
]
PAIRS_SCHEMA = pa.schema(_PAIR_FIELDS)
PAIRS_SCHEMA_WITH_IMAGES = pa.schema(
    [*_PAIR_FIELDS, ("jpg_0", pa.binary()), ("jpg_1", pa.binary())]
)


def _pairs(row: Any) -> Iterable[tuple[int, int, float]]:
    """(index a, index b, label of a) for the labelled pairs of one choice: the chosen image
    against each other one, or every pair at 0.5 for a tie. Pairs keep the shown order."""
    keys = row["image_keys"]
    if row["verdict"] == "tie":
        for a in range(len(keys)):
            for b in range(a + 1, len(keys)):
                yield a, b, 0.5
        return
    chosen = row["positions"].index(row["chosen_position"])
    for other in range(len(keys)):
        if other != chosen:
            a, b = sorted((chosen, other))
            yield a, b, 1.0 if a == chosen else 0.0


def _pair_table(store: ImageStore | None) -> Any:
    schema = PAIRS_SCHEMA_WITH_IMAGES if store is not None else PAIRS_SCHEMA

    def to_table(batch: list[Any], fractions: dict) -> pa.Table:
        columns: dict[str, list[Any]] = {name: [] for name in schema.names}
        for row in batch:
            keys, models = row["image_keys"], row["models"]
            best = None
            if row["verdict"] == "pick":
                best = keys[row["positions"].index(row["chosen_position"])]
            split = _split(row, **fractions)
            for a, b, label in _pairs(row):
                values = {
                    "ranking_id": row["choice_id"],
                    "round_id": row["round_id"],
                    "split": split,
                    "caption": row["prompt"],
                    "user_id": row["user_id"],
                    "image_0_uid": keys[a],
                    "image_1_uid": keys[b],
                    "label_0": label,
                    "label_1": 1.0 - label,
                    "model_0": models[a],
                    "model_1": models[b],
                    "best_image_uid": best,
                    "has_label": True,
                    "are_different": keys[a] != keys[b],
                    "created_at": row["created_at"],
                }
                if store is not None:
                    values["jpg_0"] = store.get(keys[a])
                    values["jpg_1"] = store.get(keys[b])
                for name, value in values.items():
                    columns[name].append(value)
        return pa.Table.from_pydict(columns, schema=schema)

    return to_table


class _HPDWriter(_Writer):
    """The HPD layout: images under `preference_images/{id}_{j}{suffix}` (the stored bytes,
    unchanged), records streamed into `preference_train.json` / `preference_test.json`
    (validation-split prompts go to train, as HPD has no validation file). A record's id is
    its external id for imported rounds, else the round id."""

    def __init__(self, out: Path, store: ImageStore, **fractions: float) -> None:
        self.out = out
        self.store = store
        self.fractions = fractions
        (out / HPD_IMAGES).mkdir()
        self.files = {
            split: open(out / f".{name}.tmp", "w", encoding="utf-8")  # noqa: SIM115
            for split, name in HPD_FILES.items()
        }
        self.counts = dict.fromkeys(self.files, 0)
        self.ids: set[int] = set()

    def write(self, batch: list[Any]) -> None:
        for row in batch:
            external = row["external_id"]
            imported = row["source"] == "import" and external is not None and external.isdigit()
            record_id = int(external) if imported else row["round_id"]
            if record_id in self.ids:
                raise DatasetError(
                    f"two rounds would both be record {record_id} (an imported id equals a "
                    "round id); export them separately"
                )
            self.ids.add(record_id)
            files = []
            for j, key in enumerate(row["image_keys"]):
                name = f"{HPD_IMAGES}/{record_id}_{j}{Path(key).suffix}"
                (self.out / name).write_bytes(self.store.get(key))
                files.append(name)
            record = {
                "human_preference": row["positions"].index(row["chosen_position"]),
                "prompt": row["prompt"],
                "id": record_id,
                "file_path": files,
                "user_hash": row["user_id"],
                "contain_name": row["contains_name"],
            }
            split = "test" if _split(row, **self.fractions) == "test" else "train"
            fh = self.files[split]
            fh.write(("[\n" if self.counts[split] == 0 else ",\n") + json.dumps(record))
            self.counts[split] += 1
            self.rows += 1

    def close(self) -> Path:
        for split, fh in self.files.items():
            fh.write("\n]\n" if self.counts[split] else "[]\n")
            fh.close()
            os.replace(fh.name, self.out / HPD_FILES[split])
        return self.out

    def abort(self) -> None:
        for fh in self.files.values():
            fh.close()
        # The folder was new or empty: remove what this export wrote.
        for child in self.out.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()


# Columns copied as they come from the export query (the rest are derived).
_HF_COPIED = (
    *("choice_id", "round_id", "prompt", "negative_prompt", "user_id", "is_requester"),
    *("verdict", "image_keys", "seeds", "params", "created_at"),
)
# The Hugging Face split of each of our splits.
_HF_SPLITS = {"train": "train", "val": "validation", "test": "test"}

_HF_CARD = """---
configs:
- config_name: default
  data_files:
{files}
license: other
task_categories:
- text-to-image
tags:
- human-preference
---
# HPS choice platform export

Choices people made between generated images, exported by `hps export --format hf`.
One row per choice: the prompt, the images shown (in the order shown), the verdict (`pick`
with `chosen_index` into `images`, `tie` for "can't decide", `none` for "none of these"),
the model version that made each image, seeds and generation parameters. Users appear only
by pseudonym (`user_id`); flagged choices and banned, shadow-banned and forgotten users'
choices are not included. Load it with `datasets.load_dataset("<this folder>")`.

Rows: {counts}.
"""


class _HFWriter(_Writer):
    """A `datasets`-loadable folder: `data/<split>-00000-of-00001.parquet` with the
    features in the Parquet schema (so images decode), and `README.md` naming the splits."""

    def __init__(self, out: Path, store: ImageStore, fractions: dict) -> None:
        from datasets import Features, Image, List, Value

        self.out, self.store, self.fractions = out, store, fractions
        self.features = Features(
            {
                "choice_id": Value("int64"),
                "round_id": Value("int64"),
                "prompt": Value("string"),
                "negative_prompt": Value("string"),
                "user_id": Value("string"),
                "is_requester": Value("bool"),
                "verdict": Value("string"),
                "chosen_index": Value("int16"),
                "images": List(Image()),
                "image_keys": List(Value("string")),
                "model_versions": List(Value("string")),
                "seeds": List(Value("int64")),
                "params": Value("string"),
                "created_at": Value("timestamp[us, tz=UTC]"),
            }
        )
        self.schema = self.features.arrow_schema
        (out / "data").mkdir()
        self.writers: dict[str, pq.ParquetWriter] = {}
        self.counts: dict[str, int] = {}

    def _writer(self, split: str) -> pq.ParquetWriter:
        if split not in self.writers:
            path = self.out / "data" / f".{split}-00000-of-00001.parquet.tmp"
            self.writers[split] = pq.ParquetWriter(path, self.schema, compression="zstd")
            self.counts[split] = 0
        return self.writers[split]

    def write(self, batch: list[Any]) -> None:
        by_split: dict[str, list[Any]] = {}
        for row in batch:
            by_split.setdefault(_HF_SPLITS[_split(row, **self.fractions)], []).append(row)
        for split, rows in by_split.items():
            table = self._table(rows)
            self._writer(split).write_table(table)
            self.counts[split] += table.num_rows
            self.rows += table.num_rows

    def _table(self, rows: list[Any]) -> pa.Table:
        columns: dict[str, list[Any]] = {name: [row[name] for row in rows] for name in _HF_COPIED}
        columns["model_versions"] = [row["models"] for row in rows]
        columns["chosen_index"] = [
            None if r["chosen_position"] is None else r["positions"].index(r["chosen_position"])
            for r in rows
        ]
        columns["images"] = [
            [{"bytes": self.store.get(key), "path": Path(key).name} for key in row["image_keys"]]
            for row in rows
        ]
        return pa.Table.from_pydict(columns, schema=self.schema)

    def close(self) -> Path:
        files = []
        for split, writer in self.writers.items():
            writer.close()
            name = f"{split}-00000-of-00001.parquet"
            os.replace(self.out / "data" / f".{name}.tmp", self.out / "data" / name)
            files.append(f"  - split: {split}\n    path: data/{split}-*.parquet")
        counts = ", ".join(f"{split} {n}" for split, n in sorted(self.counts.items())) or "none"
        card = _HF_CARD.replace("{files}", "\n".join(files)).replace("{counts}", counts)
        (self.out / "README.md").write_text(card)
        return self.out

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.close()
        shutil.rmtree(self.out / "data", ignore_errors=True)
