"""Dataset import and export: the paper's HPD layout in; HPD, Parquet, Pick-a-Pic pairs or a
Hugging Face `datasets` folder out.

Import (`hps import FOLDER`): an HPD-layout folder becomes closed rounds (source `import`,
external id = the record's id, the file's split kept, the prompt's exact spelling kept),
their images (copied into the content-addressed store) and the requester's pick, made by the
imported user `import:<user_hash>` (`db.users`: a namespace no Discord user's pseudonym is in,
so an import never touches a real user, live or forgotten). Records under a pseudonym a
forgotten user held are left out. The whole folder is checked before anything is written;
each record is written in one transaction. A record is the same record as one already
imported when its content is (the prompt, the images in order and the pick:
`db.datasets.import_key`), not its id, which is unique only within its dataset: running an
import again, or importing our own export of it from another folder, adds nothing, while
another dataset reusing the ids is imported whole.

Export (`hps export OUT --format ...`), streamed from a server-side cursor in batches (one
database snapshot), so memory stays bounded however many choices there are; written in
`OUT/.partial/` and moved into place at the end, so a failed export leaves OUT empty:
- `hpd`: the HPD layout again (the requesters' picks; images copied out of the store);
- `parquet`: `choices.parquet`, one row per choice: prompt, image keys, chosen position,
  model versions, seeds, generation parameters, timestamps, pseudonymous user ids; with
  `--images`, the image files beside it (`images/<image key>`), so it stands alone;
- `pickapic`: pairs in the Pick-a-Pic layout (`PAIRS_SCHEMA`), image bytes included, as a
  `datasets` folder with Pick-a-Pic's splits (train, validation, test, validation_unique,
  test_unique), read as PickScore's trainer and Diffusion-DPO's train.py read Pick-a-Pic;
- `hf`: one row per choice with the images, as a `datasets` folder (train, validation,
  test).
`pipeline.dataset_folder` writes the `datasets` folders: `datasets.load_dataset(OUT)` and
`datasets.load_from_disk(OUT)` both open them, in datasets 2.x to 5.x. Splits are training's
(`pipeline.data.prompt_split`: a prompt is on one side only). Users appear only by
pseudonym; flagged choices and banned, shadow-banned and forgotten users' choices are never
exported (`db.datasets`). An option a format cannot honour is refused before anything is
written (`check_export_options`).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import shutil
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
from db import users as db_users
from db.images import NewImage
from hps.files import publish
from hps.store import ImageStore, StoreError
from pipeline.data import (
    HPD_FILES,
    HPD_IMAGES,
    DatasetError,
    HPDRecord,
    chosen_index,
    prompt_split,
    read_hpd,
)
from pipeline.dataset_folder import IMAGE_TYPE, TIMESTAMP, DatasetFolder

log = logging.getLogger(__name__)

FORMATS = ("hpd", "parquet", "pickapic", "hf")
TIES = ("drop", "half")
IMAGE_BATCH_ROWS = 128
# Pick-a-Pic pairs are written this many at a time per split: a round of K images makes up
# to K(K-1)/2 pairs, each carrying two images.
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
    forgotten: int = 0  # left out: under a pseudonym a forgotten user held


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
    files = await asyncio.to_thread(
        lambda: {path: _check_image(path) for record in records for path in record.files}
    )
    keys = {record.id: _import_key(record, files) for record in records}
    existing = await db_datasets.imported_keys(conn, list(keys.values()))
    retired = await db_users.retired_hashes(conn, {record.user_hash for record in records})
    imported = skipped = forgotten = 0
    for record in tqdm(records, desc="import", unit="round", disable=not progress):
        if record.user_hash in retired:
            forgotten += 1  # nothing of theirs is written, not even their images
            continue
        if keys[record.id] in existing:
            skipped += 1
            if record.contain_name:  # this import flags it, even if the first did not
                await db_prompts.ensure_prompt(conn, record.prompt, contains_name=True)
            continue
        imported_round = await _imported_round(record, keys[record.id], store, files)

        async def store_again(record: HPDRecord = record) -> None:
            # Under the held keys: a deletion of equal bytes may have come in between.
            for path in record.files:
                data = await asyncio.to_thread(path.read_bytes)
                await store.ensure_async(data, suffix=files[path].suffix)

        outcome = await db_datasets.import_round(conn, imported_round, store_again)
        if outcome == db_datasets.IMPORTED:
            imported += 1
        elif outcome == db_datasets.FORGOTTEN:
            forgotten += 1  # forgotten meanwhile
        else:
            skipped += 1  # the same content twice in this folder, or imported meanwhile
    log.info(
        "imported %d rounds from %s (%d already there, %d of forgotten users left out)",
        *(imported, folder, skipped, forgotten),
    )
    return ImportReport(len(records), imported, skipped, forgotten)


async def _imported_round(
    record: HPDRecord, key: str, store: ImageStore, files: dict[Path, _ImageFile]
) -> db_datasets.ImportedRound:
    """The record's round, its images stored (the store's async API: an object store's
    requests never block the event loop)."""
    images = []
    for position, path in enumerate(record.files, start=1):
        info = files[path]
        data = await asyncio.to_thread(path.read_bytes)
        blob = await store.put_async(data, suffix=info.suffix)
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
        user_hash=record.user_hash,
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
    splits: dict[str, int] | None = None  # rows per split of a `datasets` folder


def check_export_options(
    fmt: str, *, all_choosers: bool, with_images: bool, ties: str | None
) -> str | None:
    """Refuse (`DatasetError`) an option the format cannot honour; returns the `ties` rule
    to use (pickapic's default: `drop`). `with_images` is honoured by every format: hpd,
    pickapic and hf always carry the images, parquet writes them beside its file."""
    if fmt not in FORMATS:
        raise DatasetError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if ties is not None and ties not in TIES:
        raise DatasetError(f"unknown --ties {ties!r}; choose drop or half")
    if fmt == "hpd" and all_choosers:
        raise DatasetError(
            "--format hpd holds the requesters' picks only: an HPD record is the pick of the "
            "person who asked for the images (and importing it makes them its requester); "
            "use --format parquet, hf or pickapic for everyone's choices"
        )
    if ties is not None and fmt != "pickapic":
        held = (
            "HPD records name one preferred image, so ties are never in them"
            if fmt == "hpd"
            else f"--format {fmt} keeps every verdict as it is (ties as verdict 'tie')"
        )
        raise DatasetError(f"--ties applies to --format pickapic (pairs) only: {held}")
    if fmt == "pickapic":
        return ties or "drop"
    return None


def _split(row: Any, val_fraction: float, test_fraction: float) -> str:
    """The split training places this round in (`pipeline.data.prompt_split`: a prompt is
    test on all its rounds or on none)."""
    return prompt_split(
        row["text_hash"],
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


def _image(store: ImageStore, key: str, row: Any) -> bytes:
    try:
        return store.get(key)
    except StoreError:
        raise DatasetError(
            f"image {key} of round {row['round_id']} is not in the image store"
        ) from None


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
    ties: str | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    batch_size: int = 10_000,
    progress: bool = True,
) -> ExportReport:
    """Export the choices to the folder `out` (new or empty) in format `fmt` (see the module
    docstring; `ties`: pickapic's `drop` or `half`)."""
    ties = check_export_options(fmt, all_choosers=all_choosers, with_images=with_images, ties=ties)
    _prepare_target(out)
    stage = out / ".partial"
    stage.mkdir()
    if fmt in ("hf", "pickapic") or with_images:
        # Rows carry image bytes (a few MB each): keep a batch, and the next one read
        # meanwhile, small enough to stay bounded in memory.
        batch_size = min(batch_size, IMAGE_BATCH_ROWS)
    fractions = {"val_fraction": val_fraction, "test_fraction": test_fraction}
    if fmt == "hpd":
        verdicts: tuple[str, ...] = ("pick",)
    elif fmt == "pickapic":
        verdicts = ("pick", "tie") if ties == "half" else ("pick",)
    else:
        verdicts = ("pick", "tie", "none")
    bar = tqdm(desc=f"export {fmt}", unit="choice", disable=not progress)
    writer: _Writer | None = None
    pending: asyncio.Future[None] | None = None  # a batch being written in a thread
    choices = 0
    try:
        async with db_datasets.export_snapshot(conn):
            if fmt == "hpd":
                writer = _HPDWriter(stage, store, fractions)
            elif fmt == "parquet":
                writer = _ChoicesWriter(stage, store if with_images else None, fractions)
            elif fmt == "hf":
                writer = _HFWriter(stage, store, fractions)
            else:
                counts = await db_datasets.export_prompt_choices(
                    conn, all_choosers=all_choosers, verdicts=verdicts, min_shown=2
                )
                writer = _PairsWriter(stage, store, fractions, ties or "drop", counts)
            # Each batch is written in a thread while the next one is read.
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
            splits = writer.close()
    except BaseException:
        if pending is not None:
            await asyncio.wait([pending])  # the thread writes no more in the folder
        if writer is not None:
            writer.abort()
        shutil.rmtree(stage, ignore_errors=True)
        raise
    finally:
        bar.close()
    for child in stage.iterdir():
        publish(child, out / child.name, durable=False)
    stage.rmdir()
    return ExportReport(fmt, writer.rows, choices, out, splits)


class _Writer:
    """Writes batches of exported choices into the staging folder; `close` finishes (and
    returns the rows per split of a `datasets` folder), `abort` only closes files."""

    rows = 0

    def write(self, batch: list[Any]) -> None:
        raise NotImplementedError

    def close(self) -> dict[str, int] | None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError


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
        ("round_created_at", TIMESTAMP),
        ("created_at", TIMESTAMP),
        ("updated_at", TIMESTAMP),
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


class _ChoicesWriter(_Writer):
    """`choices.parquet`; with a store, each image file once under `images/<image key>`."""

    def __init__(self, stage: Path, store: ImageStore | None, fractions: dict) -> None:
        self.stage, self.store, self.fractions = stage, store, fractions
        self.writer = pq.ParquetWriter(
            stage / "choices.parquet", CHOICES_SCHEMA, compression="zstd"
        )

    def write(self, batch: list[Any]) -> None:
        for table in _choice_tables(batch, self.fractions):
            self.writer.write_table(table)
            self.rows += table.num_rows
        if self.store is None:
            return
        for row in batch:
            for key in row["image_keys"]:
                target = self.stage / "images" / key
                if not target.exists():  # other choices of the round wrote it already
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(_image(self.store, key, row))

    def close(self) -> None:
        self.writer.close()

    def abort(self) -> None:
        self.writer.close()


# Pick-a-Pic's columns, with the dtypes PickScore's trainer (trainer/datasetss/
# clip_hf_dataset.py, trainer/criterions/clip_criterion.py) and Diffusion-DPO's train.py read,
# then ours. `user_id` is a pseudonym (a string; Pick-a-Pic's is an integer: neither reader
# reads it). `__index_level_0__` is the row's number in its split: Pick-a-Pic has the
# column (it was made with pandas) and PickScore's `limit_examples_per_prompt` drops it.
PAIRS_SCHEMA = pa.schema(
    [
        ("are_different", pa.bool_()),
        ("best_image_uid", pa.string()),
        ("caption", pa.string()),
        ("created_at", TIMESTAMP),
        ("has_label", pa.bool_()),
        ("image_0_uid", pa.string()),
        ("image_1_uid", pa.string()),
        ("jpg_0", pa.binary()),
        ("jpg_1", pa.binary()),
        ("label_0", pa.float64()),
        ("label_1", pa.float64()),
        ("model_0", pa.string()),
        ("model_1", pa.string()),
        ("ranking_id", pa.int64()),
        ("user_id", pa.string()),
        ("num_example_per_prompt", pa.int64()),
        ("__index_level_0__", pa.int64()),
        ("choice_id", pa.int64()),
        ("round_id", pa.int64()),
        ("weight", pa.float64()),
        ("is_requester", pa.bool_()),
        ("contains_name", pa.bool_()),
    ]
)
PAIR_SPLITS = ("train", "validation", "test", "validation_unique", "test_unique")
# Our splits as Hugging Face names them.
_HF_SPLITS = {"train": "train", "val": "validation", "test": "test"}
# A pair's ranking_id: its choice's id times this, plus the pair's number in its choice
# (fewer: a round shows at most 16 images, 120 pairs).
RANKING_IDS_PER_CHOICE = 128
UNKNOWN_MODEL = "unknown"


def _pairs(k: int, chosen: int | None) -> list[tuple[int, int, float]]:
    """(index a, index b, label of a) for the labelled pairs of one choice among k images:
    the chosen image against each other one (k-1 pairs), or every pair at 0.5 for a tie
    (k(k-1)/2 pairs). Pairs keep the shown order (a < b)."""
    if chosen is None:
        return [(a, b, 0.5) for a in range(k) for b in range(a + 1, k)]
    return [
        (min(chosen, other), max(chosen, other), 1.0 if chosen < other else 0.0)
        for other in range(k)
        if other != chosen
    ]


_PAIRS_CARD = """
# HPS choice platform export: Pick-a-Pic pairs

Pairs of images shown for one prompt and which one a person preferred, written by
`hps export --format pickapic` in the layout of Pick-a-Pic (`yuvalkirstain/pickapic_v1`).
Rows: {counts}.

Load it with `datasets.load_dataset("<this folder>")` or `datasets.load_from_disk(...)`.
Splits: `train`, `validation`, `test` (by prompt: a prompt is in one of them only, so no
test prompt is in train), and `validation_unique` / `test_unique`: per prompt, the first
pair of its earliest pick in validation / test.

Each choice among K images becomes pairs: a pick, K-1 pairs (the chosen image against each
other, `label_0`/`label_1` 1.0/0.0); a tie ("can't decide", only with `--ties half`), all
K(K-1)/2 pairs at 0.5/0.5. So that one choice weighs the same however many pairs it makes:
`weight` is 1 / (pairs of its choice), and `num_example_per_prompt` is (choices of its prompt)
x (pairs of its choice): PickScore weighs each row by 1 / `num_example_per_prompt`, which
gives every prompt the same weight and every choice within it the same share. Readers that
weigh rows alike (Diffusion-DPO) count a pick among K images K-1 times: sample rows by
`weight` for one per choice. Each pair has its own `ranking_id` (`choice_id` x 128 + the
pair's number; `choice_id` groups a choice's pairs).

Ties: {ties}. Diffusion-DPO's train.py drops 0.5/0.5 rows only when its `--dataset_name`
contains "pickapic"; elsewhere it trains a tie as image 0 preferred.

`jpg_0`/`jpg_1` are the image files' bytes (PNG or JPEG), `image_0_uid`/`image_1_uid` their
keys in the platform's image store, `model_0`/`model_1` the model version that made each
("unknown" where not recorded), `user_id` the chooser's pseudonym, `is_requester` whether
they asked for the images, `contains_name` whether the prompt names a person (HPD leaves
those out of training).
"""

_TIES_TEXT = {
    "drop": "left out (`--ties drop`, the default): every row is a pick",
    "half": "kept as 0.5/0.5 pairs (`--ties half`)",
}


class _PairsWriter(_Writer):
    """Pick-a-Pic pairs into a `datasets` folder. Each image of a round is read once however
    many pairs it is in, and at most `IMAGE_PAIRS_PER_TABLE` pairs (all splits together) are
    held before they are written, so memory stays bounded whatever K is. `prompt_choices`:
    per prompt, its choices that make pairs (for `num_example_per_prompt`)."""

    def __init__(
        self,
        stage: Path,
        store: ImageStore,
        fractions: dict,
        ties: str,
        prompt_choices: dict[str, int],
    ) -> None:
        self.store, self.fractions, self.prompt_choices = store, fractions, prompt_choices
        self.folder = DatasetFolder(stage, PAIRS_SCHEMA)
        self.columns = {split: _empty(PAIRS_SCHEMA) for split in PAIR_SPLITS}
        self.numbered = dict.fromkeys(PAIR_SPLITS, 0)  # each split's `__index_level_0__`
        self.held = 0  # pairs in `columns`
        self.unique: dict[str, set[str]] = {"validation": set(), "test": set()}
        self.ties = ties

    def write(self, batch: list[Any]) -> None:
        for row in batch:
            keys, models = row["image_keys"], row["models"]
            chosen = _chosen(row) if row["verdict"] == "pick" else None
            pairs = _pairs(len(keys), chosen)
            if not pairs:
                continue  # a round that showed one image
            split = _HF_SPLITS[_split(row, **self.fractions)]
            per_prompt = self.prompt_choices[row["text_hash"]] * len(pairs)
            blobs: dict[int, bytes] = {}  # this round's images, each read once
            for number, (a, b, label) in enumerate(pairs):
                for index in (a, b):
                    if index not in blobs:
                        blobs[index] = _image(self.store, keys[index], row)
                values = {
                    "are_different": keys[a] != keys[b],
                    "best_image_uid": keys[chosen] if chosen is not None else None,
                    "caption": row["prompt"],
                    "created_at": row["created_at"],
                    "has_label": True,
                    "image_0_uid": keys[a],
                    "image_1_uid": keys[b],
                    "jpg_0": blobs[a],
                    "jpg_1": blobs[b],
                    "label_0": label,
                    "label_1": 1.0 - label,
                    "model_0": models[a] or UNKNOWN_MODEL,
                    "model_1": models[b] or UNKNOWN_MODEL,
                    "ranking_id": row["choice_id"] * RANKING_IDS_PER_CHOICE + number,
                    "user_id": row["user_id"],
                    "num_example_per_prompt": per_prompt,
                    "choice_id": row["choice_id"],
                    "round_id": row["round_id"],
                    "weight": 1.0 / len(pairs),
                    "is_requester": row["is_requester"],
                    "contains_name": row["contains_name"],
                }
                self._add(split, values)
                seen = self.unique.get(split)
                if seen is not None and chosen is not None and row["text_hash"] not in seen:
                    seen.add(row["text_hash"])  # the prompt's one row there: its own weight
                    self._add(
                        f"{split}_unique", {**values, "num_example_per_prompt": 1, "weight": 1.0}
                    )

    def _add(self, split: str, values: dict[str, Any]) -> None:
        columns = self.columns[split]
        for name, value in values.items():
            columns[name].append(value)
        columns["__index_level_0__"].append(self.numbered[split])
        self.numbered[split] += 1
        self.held += 1
        if self.held >= IMAGE_PAIRS_PER_TABLE:  # all splits together: memory stays bounded
            self._flush()

    def _flush(self) -> None:
        for split in PAIR_SPLITS:
            table = pa.Table.from_pydict(self.columns[split], schema=self.folder.schema)
            self.folder.write(split, table)  # (nothing for an empty table)
            if not split.endswith("_unique"):  # copies of rows in validation and test
                self.rows += table.num_rows
            self.columns[split] = _empty(PAIRS_SCHEMA)
        self.held = 0

    def close(self) -> dict[str, int]:
        self._flush()
        counts = self.folder.counts
        text = ", ".join(f"{split} {counts[split]}" for split in PAIR_SPLITS if split in counts)
        body = _PAIRS_CARD.format(counts=text or "none", ties=_TIES_TEXT[self.ties])
        return self.folder.close(PAIR_SPLITS, body)

    def abort(self) -> None:
        self.folder.abort()


def _empty(schema: pa.Schema) -> dict[str, list[Any]]:
    return {name: [] for name in schema.names}


class _HPDWriter(_Writer):
    """The HPD layout: images under `preference_images/{id}_{j}{suffix}` (the stored bytes,
    unchanged), records streamed into `preference_train.json` / `preference_test.json`
    (validation-split prompts go to train, as HPD has no validation file). A record's id is
    its external id for imported rounds, else the round id; one already taken (two imported
    datasets reusing ids, or an imported id equal to a round id) becomes
    `RENUMBERED_FROM + round id`, so a database of several datasets still exports whole (and
    importing the export again is still a no-op: imports match records by content).
    `user_hash` is an imported user's own dataset hash (without `import:`), so the export
    imports back as the same users; a Discord user's pseudonym otherwise."""

    def __init__(self, stage: Path, store: ImageStore, fractions: dict) -> None:
        self.stage = stage
        self.store = store
        self.fractions = fractions
        (stage / HPD_IMAGES).mkdir()
        self.files = {
            split: open(stage / name, "w", encoding="utf-8")  # noqa: SIM115
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
                (self.stage / name).write_bytes(_image(self.store, key, row))
                files.append(name)
            record = {
                "human_preference": _chosen(row),
                "prompt": row["prompt"],
                "id": record_id,
                "file_path": files,
                "user_hash": db_users.imported_hash(row["user_id"]) or row["user_id"],
                "contain_name": row["contains_name"],
            }
            split = "test" if _split(row, **self.fractions) == "test" else "train"
            fh = self.files[split]
            fh.write(("[\n" if self.counts[split] == 0 else ",\n") + json.dumps(record))
            self.counts[split] += 1
            self.rows += 1

    def close(self) -> None:
        if self.renumbered:
            log.warning("%d record id(s) were taken: renumbered from 10**12", self.renumbered)
        for split, fh in self.files.items():
            fh.write("\n]\n" if self.counts[split] else "[]\n")
            fh.close()

    def abort(self) -> None:
        for fh in self.files.values():
            fh.close()


HF_SCHEMA = pa.schema(
    [
        ("choice_id", pa.int64()),
        ("round_id", pa.int64()),
        ("source", pa.string()),
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
        ("images", pa.list_(IMAGE_TYPE)),
        ("image_keys", pa.list_(pa.string())),
        ("model_versions", pa.list_(pa.string())),
        ("seeds", pa.list_(pa.int64())),
        ("params", pa.string()),
        ("round_created_at", TIMESTAMP),
        ("created_at", TIMESTAMP),
        ("updated_at", TIMESTAMP),
    ]
)
HF_SPLITS = ("train", "validation", "test")
# Columns copied as they come from the export query (the rest are derived).
_HF_COPIED = [n for n in HF_SCHEMA.names if n not in ("chosen_index", "images", "model_versions")]

_HF_CARD = """
# HPS choice platform export

Choices people made between generated images, written by `hps export --format hf`. Rows:
{counts}. Load it with `datasets.load_dataset("<this folder>")` or
`datasets.load_from_disk("<this folder>")`. Splits are by prompt: a prompt is in one split
only.

One row per choice: the prompt (`contains_name`: it names a person), the images shown
(`images`, in the order shown, at `positions` 1..K), the verdict (`pick` with
`chosen_position` and `chosen_index` into `images`; `tie` for "can't decide"; `none` for
"none of these"), the chooser (`user_id`, a pseudonym; `is_requester`: they asked for the
images; `requester`), the model version that made each image, seeds, generation parameters
(JSON), when the round was asked for (`round_created_at`) and when the choice was made
(`created_at`) and last changed (`updated_at`). Users appear only by pseudonym; flagged
choices and banned, shadow-banned and forgotten users' choices are not included.
"""


class _HFWriter(_Writer):
    """One row per choice, with the images (`datasets.Image`), into a `datasets` folder."""

    def __init__(self, stage: Path, store: ImageStore, fractions: dict) -> None:
        self.store, self.fractions = store, fractions
        self.folder = DatasetFolder(stage, HF_SCHEMA, image_columns=("images",))

    def write(self, batch: list[Any]) -> None:
        by_split: dict[str, list[Any]] = {}
        for row in batch:
            by_split.setdefault(_HF_SPLITS[_split(row, **self.fractions)], []).append(row)
        for split, rows in by_split.items():
            table = self._table(rows)
            self.folder.write(split, table)
            self.rows += table.num_rows

    def _table(self, rows: list[Any]) -> pa.Table:
        columns: dict[str, list[Any]] = {name: [row[name] for row in rows] for name in _HF_COPIED}
        columns["model_versions"] = [row["models"] for row in rows]
        columns["chosen_index"] = [_chosen(row) for row in rows]
        columns["images"] = [
            [
                {"bytes": _image(self.store, key, row), "path": Path(key).name}
                for key in row["image_keys"]
            ]
            for row in rows
        ]
        return pa.Table.from_pydict(columns, schema=self.folder.schema)

    def close(self) -> dict[str, int]:
        counts = self.folder.counts
        text = ", ".join(f"{split} {counts[split]}" for split in HF_SPLITS if split in counts)
        return self.folder.close(HF_SPLITS, _HF_CARD.format(counts=text or "none"))

    def abort(self) -> None:
        self.folder.abort()
