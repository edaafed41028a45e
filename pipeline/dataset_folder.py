"""A Hugging Face `datasets` folder that the field's code opens, whichever way it loads one.

`hps export --format pickapic|hf` write their splits through `DatasetFolder`, which streams
each split's tables into two layouts in one folder:

- `data/<split>-00000-of-00001.parquet` and a dataset card (`README.md`) whose `configs:`
  names every split: `datasets.load_dataset(OUT)` gives every split, by its card in
  `datasets` >= 2.14 and by the file names (`data/<split>-NNNNN-of-NNNNN`) in older ones
  (PickScore pins 2.10.1);
- `dataset_dict.json` and `<split>/` (`data-00000-of-00001.arrow`, `state.json`,
  `dataset_info.json`), the layout `Dataset.save_to_disk` writes: `datasets.load_from_disk(OUT)`
  opens it (PickScore's `from_disk` option).

So the rows are stored twice (Parquet, compressed, and Arrow, as `load_from_disk` maps it).
The features (how `datasets` types each column: `Image` decodes to PIL) are written in the
form `datasets` 2.x and 3.x read as well as 4.x and later: `Value`, `Sequence` for lists (never
`List`, which only 4.x knows) and `Image`. A split without rows is left out of both layouts:
`load_dataset` fails on an empty data file in every version.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

# How `datasets` stores an `Image`: the encoded bytes and a file name.
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
TIMESTAMP = pa.timestamp("us", tz="UTC")

# Arrow types and the `Value` dtype names `datasets` gives them (the same in 2.x to 5.x).
_VALUE_DTYPES = {
    pa.string(): "string",
    pa.binary(): "binary",
    pa.bool_(): "bool",
    pa.int16(): "int16",
    pa.int64(): "int64",
    pa.float64(): "float64",
    TIMESTAMP: "timestamp[us, tz=UTC]",
}
# The feature types a folder's features use: all known to datasets 2.x and 3.x.
FEATURE_TYPES = ("Value", "Sequence", "Image")

PARQUET_FILE = "data/{split}-00000-of-00001.parquet"
ARROW_FILE = "data-00000-of-00001.arrow"


def features(schema: pa.Schema, image_columns: Collection[str] = ()) -> dict[str, Any]:
    """The `datasets` features of `schema` as JSON (`Features.to_dict()` of datasets 2.x):
    the columns named in `image_columns` (an image, or a list of images) are `Image`."""
    return {field.name: _feature(field.type, image=field.name in image_columns) for field in schema}


def _feature(arrow_type: pa.DataType, *, image: bool) -> dict[str, Any]:
    if pa.types.is_list(arrow_type):
        return {
            "feature": _feature(arrow_type.value_type, image=image),
            "length": -1,
            "_type": "Sequence",
        }
    if image:
        if arrow_type != IMAGE_TYPE:
            raise TypeError(f"an image column is stored as {IMAGE_TYPE}, not {arrow_type}")
        return {"_type": "Image"}
    return {"dtype": _VALUE_DTYPES[arrow_type], "_type": "Value"}


def card(splits: Sequence[str], body: str) -> str:
    """A dataset card naming each split's Parquet files (the `configs:` of datasets >= 2.14),
    then `body`."""
    files = "".join(f"  - split: {split}\n    path: data/{split}-*.parquet\n" for split in splits)
    configs = f"configs:\n- config_name: default\n  data_files:\n{files}" if splits else ""
    return (
        f"---\n{configs}license: other\ntask_categories:\n- text-to-image\ntags:\n"
        f"- human-preference\n---\n{body}"
    )


class DatasetFolder:
    """Streams the tables of each split into `root` in both layouts (module docstring). Tables
    must have `self.schema`; call `close(body)` at the end, or `abort()` on failure (which
    only closes the files: the caller removes the folder)."""

    def __init__(self, root: Path, schema: pa.Schema, image_columns: Collection[str] = ()) -> None:
        self.root = root
        self.features = features(schema, image_columns)
        metadata = {"huggingface": json.dumps({"info": {"features": self.features}})}
        self.schema = schema.with_metadata(metadata)
        self.counts: dict[str, int] = {}
        self._parquet: dict[str, pq.ParquetWriter] = {}
        self._arrow: dict[str, tuple[pa.RecordBatchStreamWriter, pa.NativeFile]] = {}

    def write(self, split: str, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        if split not in self.counts:
            (self.root / "data").mkdir(exist_ok=True)
            (self.root / split).mkdir()
            self._parquet[split] = pq.ParquetWriter(
                self.root / PARQUET_FILE.format(split=split), self.schema, compression="zstd"
            )
            sink = pa.OSFile(str(self.root / split / ARROW_FILE), "wb")
            self._arrow[split] = (pa.ipc.new_stream(sink, self.schema), sink)
            self.counts[split] = 0
        self._parquet[split].write_table(table)
        self._arrow[split][0].write_table(table)
        self.counts[split] += table.num_rows

    def close(self, splits: Sequence[str], body: str) -> dict[str, int]:
        """Finish the files and write the folder's descriptions; `splits` orders the splits
        (those without rows are left out). Returns the rows of each split written."""
        self._close_files()
        written = [split for split in splits if split in self.counts]
        for split in written:
            state = {
                "_data_files": [{"filename": ARROW_FILE}],
                "_fingerprint": uuid.uuid4().hex[:16],
                "_format_columns": None,
                "_format_kwargs": {},
                "_format_type": None,
                "_output_all_columns": False,
                "_split": split,
            }
            info = {"description": "", "citation": "", "homepage": "", "license": ""}
            _write_json(self.root / split / "state.json", state)
            _write_json(
                self.root / split / "dataset_info.json", {**info, "features": self.features}
            )
        _write_json(self.root / "dataset_dict.json", {"splits": written})
        (self.root / "README.md").write_text(card(written, body), encoding="utf-8")
        return {split: self.counts[split] for split in written}

    def abort(self) -> None:
        self._close_files()

    def _close_files(self) -> None:
        for writer in self._parquet.values():
            writer.close()
        for stream, sink in self._arrow.values():
            stream.close()
            sink.close()
        self._parquet.clear()
        self._arrow.clear()


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


# ---- reading Pick-a-Pic pairs ----------------------------------------------------------------

PAIR_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")


class PairFolderError(ValueError):
    """A folder that holds no Pick-a-Pic pairs as `parquet_splits` reads them; says why."""


def parquet_splits(folder: Path) -> dict[str, list[Path]]:
    """The Parquet files of each split of a `datasets` folder, by the names the hub and
    `DatasetFolder` give them (`data/<split>-NNNNN-of-NNNNN[-<hash>].parquet`), in order:
    what `hps export --format pickapic` writes and Pick-a-Pic as published
    (`yuvalkirstain/pickapic_v1`, `_v2`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PairFolderError(f"{folder} is not a folder")
    splits: dict[str, list[Path]] = {}
    for path in sorted(folder.rglob("*.parquet")):
        splits.setdefault(path.name.split("-")[0], []).append(path)
    if not splits:
        raise PairFolderError(f"{folder} holds no Parquet files (a Pick-a-Pic-format folder)")
    return splits


def read_pairs(files: Sequence[Path], batch_rows: int = 64) -> Any:
    """The rows of Pick-a-Pic pair files, one dict at a time (`caption`, `jpg_0` and
    `jpg_1` as bytes, `label_0`), streamed a few rows at a time: the images stay on disk
    until read. Raises `PairFolderError` for a file without those columns."""
    for path in files:
        parquet = pq.ParquetFile(path)
        missing = [c for c in PAIR_COLUMNS if c not in parquet.schema_arrow.names]
        if missing:
            raise PairFolderError(f"{path.name} has no column {', '.join(missing)}")
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=list(PAIR_COLUMNS)):
            for row in batch.to_pylist():
                for column in ("jpg_0", "jpg_1"):  # an `Image` feature: {bytes, path}
                    if isinstance(row[column], dict):
                        row[column] = row[column]["bytes"]
                yield row
