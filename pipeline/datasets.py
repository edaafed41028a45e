"""Dataset import and export: the paper's HPD layout in, and HPD, Parquet or Pick-a-Pic out.

Import (`hps import FOLDER`): an HPD-layout folder becomes closed rounds (source `import`,
external id = the record's id, the file's split kept, the prompt's exact spelling kept),
their images (copied into the content-addressed store) and the requester's pick. The whole
folder is checked before anything is written; each record is written in one transaction.
A record is the same record as one already imported when its content is (the prompt, the
images in order and the pick: `db.datasets.import_key`), not its id, which is unique only
within its dataset: running an import again, or importing our own export of it from
another folder, adds nothing, while another dataset reusing the ids is imported whole.

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
import hashlib
import io
import json
import logging
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm.auto import tqdm

from db import datasets as db_datasets
from db import prompts as db_prompts
from db.images import NewImage
from hps.files import publish, temporary
from hps.store import ImageStore
from pipeline.data import (
    HPD_FILES,
    HPD_IMAGES,
    DatasetError,
    HPDRecord,
    chosen_index,
    prompt_split,
    read_hpd,
)

log = logging.getLogger(__name__)

FORMATS = ("hpd", "parquet", "pickapic", "hf")
IMAGE_BATCH_ROWS = 128
# Pick-a-Pic pairs with image bytes are written this many at a time: a round of K images
# makes up to K(K-1)/2 pairs, each carrying two images.
IMAGE_PAIRS_PER_TABLE = 256
# HPD export: records whose id is taken get this plus their round id.
RENUMBERED_FROM = 10**12
_SUFFIX_OF_FORMAT = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif"}


# ---- import ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportReport:
    records: int
    imported: int
    skipped: int  # already imported


@dataclass(frozen=True)
class _ImageFile:
    width: int
    height: int
    suffix: str
    sha256: str


def _check_image(path: Path) -> _ImageFile:
    """Size, file suffix (from its header) and sha256 of an image file."""
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            suffix = _SUFFIX_OF_FORMAT.get(image.format or "", ".img")
            size = image.size
    except (OSError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"{path} is not a readable image ({exc})") from None
    return _ImageFile(size[0], size[1], suffix, hashlib.sha256(data).hexdigest())


def _import_key(record: HPDRecord, files: dict[Path, _ImageFile]) -> str:
    return db_datasets.import_key(
        db_prompts.prompt_hash(record.prompt),
        [files[path].sha256 for path in record.files],
        record.human_preference + 1,
    )


async def import_hpd(
    conn: asyncpg.Connection, store: ImageStore, folder: Path, *, progress: bool = True
) -> ImportReport:
    """Import an HPD-layout folder (see the module docstring). Raises `DatasetError`, with
    nothing written, if any record or image is malformed."""
    records = read_hpd(folder)
    files = {path: _check_image(path) for record in records for path in record.files}
    keys = {record.id: _import_key(record, files) for record in records}
    existing = await db_datasets.imported_keys(conn, list(keys.values()))
    imported = skipped = 0
    for record in tqdm(records, desc="import", unit="round", disable=not progress):
        if keys[record.id] in existing:
            skipped += 1
            if record.contain_name:  # this import flags it, even if the first did not
                await db_prompts.ensure_prompt(conn, record.prompt, contains_name=True)
            continue
        imported_round = _imported_round(record, keys[record.id], store, files)

        def store_again(record: HPDRecord = record) -> None:
            # Under the held keys: a deletion of equal bytes may have come in between.
            for path in record.files:
                store.put(path.read_bytes(), suffix=files[path].suffix)

        if await db_datasets.import_round(conn, imported_round, store_again) is None:
            skipped += 1  # the same content twice in this folder, or imported meanwhile
        else:
            imported += 1
    log.info("imported %d rounds from %s (%d already there)", imported, folder, skipped)
    return ImportReport(len(records), imported, skipped)


def _imported_round(
    record: HPDRecord, key: str, store: ImageStore, files: dict[Path, _ImageFile]
) -> db_datasets.ImportedRound:
    images = []
    for position, path in enumerate(record.files, start=1):
        info = files[path]
        blob = store.put(path.read_bytes(), suffix=info.suffix)
        if blob.sha256 != info.sha256:
            raise DatasetError(f"{path} changed while it was being imported; import again")
        images.append(
            NewImage(position, blob.sha256, blob.key, width=info.width, height=info.height)
        )
    return db_datasets.ImportedRound(
        external_id=str(record.id),
        import_key=key,
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
    """The split training places this round in (`pipeline.data.prompt_split`: a prompt is
    test on all its rounds or on none)."""
    return prompt_split(
        row["norm_hash"],
        row["split"],
        prompt_tested=row["prompt_tested"],
        prompt_undeclared=row["prompt_undeclared"],
        val_fraction=val_fraction,
        test_fraction=test_fraction,
    )


def _chosen(row: Any) -> int | None:
    """The index of the chosen image among the shown ones (None: a tie or "none")."""
    where = f"choice {row['choice_id']} (round {row['round_id']})"
    return chosen_index(row["positions"], row["chosen_position"], where)


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
        writer = _ParquetWriter(out / "choices.parquet", _choice_tables, CHOICES_SCHEMA, fractions)
        verdicts = ("pick", "tie", "none")
    elif fmt == "hf":
        writer = _HFWriter(out, store, fractions)
        verdicts = ("pick", "tie", "none")
    else:
        schema = PAIRS_SCHEMA_WITH_IMAGES if with_images else PAIRS_SCHEMA
        writer = _ParquetWriter(
            out / "pairs.parquet", _pair_tables(store if with_images else None), schema, fractions
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
    """Batches of records → a Parquet file, written under a temporary name, renamed at the
    end. `to_tables(batch, fractions)` makes the tables of one batch."""

    def __init__(self, path: Path, to_tables: Any, schema: pa.Schema, fractions: dict) -> None:
        self.path = path
        self.tmp = temporary(path, unique=False)
        self.to_tables = to_tables
        self.fractions = fractions
        self.writer = pq.ParquetWriter(self.tmp, schema, compression="zstd")

    def write(self, batch: list[Any]) -> None:
        for table in self.to_tables(batch, self.fractions):
            self.writer.write_table(table)
            self.rows += table.num_rows

    def close(self) -> Path:
        self.writer.close()
        publish(self.tmp, self.path, durable=False)
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


def _choice_tables(batch: list[Any], fractions: dict) -> list[pa.Table]:
    columns: dict[str, list[Any]] = {name: [row[name] for row in batch] for name in _COPIED}
    columns["model_versions"] = [row["models"] for row in batch]
    columns["split"] = [_split(row, **fractions) for row in batch]
    columns["chosen_index"] = [_chosen(row) for row in batch]
    return [pa.Table.from_pydict(columns, schema=CHOICES_SCHEMA)]


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


def _pairs(row: Any, chosen: int | None) -> Iterable[tuple[int, int, float]]:
    """(index a, index b, label of a) for the labelled pairs of one choice: the chosen image
    against each other one, or every pair at 0.5 for a tie. Pairs keep the shown order."""
    keys = row["image_keys"]
    if chosen is None:  # a tie
        for a in range(len(keys)):
            for b in range(a + 1, len(keys)):
                yield a, b, 0.5
        return
    for other in range(len(keys)):
        if other != chosen:
            a, b = sorted((chosen, other))
            yield a, b, 1.0 if a == chosen else 0.0


def _pair_tables(store: ImageStore | None) -> Any:
    """Batches of choices → tables of pairs. With image bytes (`store`), each image of a
    round is read once however many pairs it is in, and tables hold at most
    `IMAGE_PAIRS_PER_TABLE` pairs, so memory stays bounded whatever K is."""
    schema = PAIRS_SCHEMA_WITH_IMAGES if store is not None else PAIRS_SCHEMA
    limit = IMAGE_PAIRS_PER_TABLE if store is not None else None

    def to_tables(batch: list[Any], fractions: dict) -> Iterator[pa.Table]:
        columns: dict[str, list[Any]] = {name: [] for name in schema.names}
        for row in batch:
            keys, models = row["image_keys"], row["models"]
            chosen = _chosen(row) if row["verdict"] == "pick" else None
            best = keys[chosen] if chosen is not None else None
            split = _split(row, **fractions)
            blobs: dict[int, bytes] = {}  # this round's images, each read once
            for a, b, label in _pairs(row, chosen):
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
                    for index in (a, b):
                        if index not in blobs:
                            blobs[index] = store.get(keys[index])
                    values["jpg_0"], values["jpg_1"] = blobs[a], blobs[b]
                for name, value in values.items():
                    columns[name].append(value)
                if limit is not None and len(columns["ranking_id"]) >= limit:
                    yield pa.Table.from_pydict(columns, schema=schema)
                    columns = {name: [] for name in schema.names}
        if columns["ranking_id"]:
            yield pa.Table.from_pydict(columns, schema=schema)

    return to_tables


class _HPDWriter(_Writer):
    """The HPD layout: images under `preference_images/{id}_{j}{suffix}` (the stored bytes,
    unchanged), records streamed into `preference_train.json` / `preference_test.json`
    (validation-split prompts go to train, as HPD has no validation file). A record's id is
    its external id for imported rounds, else the round id; one already taken (two imported
    datasets reusing ids, or an imported id equal to a round id) becomes
    `RENUMBERED_FROM + round id`, so a database of several datasets still exports whole (and
    importing the export again is still a no-op: imports match records by content)."""

    def __init__(self, out: Path, store: ImageStore, **fractions: float) -> None:
        self.out = out
        self.store = store
        self.fractions = fractions
        (out / HPD_IMAGES).mkdir()
        self.files = {
            split: open(temporary(out / name, unique=False), "w", encoding="utf-8")  # noqa: SIM115
            for split, name in HPD_FILES.items()
        }
        self.counts = dict.fromkeys(self.files, 0)
        self.ids: set[int] = set()
        self.renumbered = 0

    def write(self, batch: list[Any]) -> None:
        for row in batch:
            external = row["external_id"]
            imported = row["source"] == "import" and external is not None and external.isdigit()
            record_id = int(external) if imported else row["round_id"]
            if record_id in self.ids:
                record_id = RENUMBERED_FROM + row["round_id"]
                if record_id in self.ids:  # only if a dataset used ids that large
                    raise DatasetError(
                        f"round {row['round_id']}: no free record id for it (its id and "
                        f"{record_id} are both taken)"
                    )
                self.renumbered += 1
            self.ids.add(record_id)
            files = []
            for j, key in enumerate(row["image_keys"]):
                name = f"{HPD_IMAGES}/{record_id}_{j}{Path(key).suffix}"
                (self.out / name).write_bytes(self.store.get(key))
                files.append(name)
            record = {
                "human_preference": _chosen(row),
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
        if self.renumbered:
            log.warning("%d record id(s) were taken: renumbered from 10**12", self.renumbered)
        for split, fh in self.files.items():
            fh.write("\n]\n" if self.counts[split] else "[]\n")
            fh.close()
            publish(Path(fh.name), self.out / HPD_FILES[split], durable=False)
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
            path = self.out / "data" / f"{split}-00000-of-00001.parquet"
            self.writers[split] = pq.ParquetWriter(
                temporary(path, unique=False), self.schema, compression="zstd"
            )
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
        columns["chosen_index"] = [_chosen(row) for row in rows]
        columns["images"] = [
            [{"bytes": self.store.get(key), "path": Path(key).name} for key in row["image_keys"]]
            for row in rows
        ]
        return pa.Table.from_pydict(columns, schema=self.schema)

    def close(self) -> Path:
        files = []
        for split, writer in self.writers.items():
            writer.close()
            path = self.out / "data" / f"{split}-00000-of-00001.parquet"
            publish(Path(writer.where), path, durable=False)
            files.append(f"  - split: {split}\n    path: data/{split}-*.parquet")
        counts = ", ".join(f"{split} {n}" for split, n in sorted(self.counts.items())) or "none"
        card = _HF_CARD.replace("{files}", "\n".join(files)).replace("{counts}", counts)
        (self.out / "README.md").write_text(card)
        return self.out

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.close()
        shutil.rmtree(self.out / "data", ignore_errors=True)
