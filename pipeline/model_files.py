"""What identifies a model and its files on disk; no torch here, so that the registry and
the CLI's registry commands start fast."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from db.promotion import describe_model

SCALE = "hps"  # 100 × cosine similarity
METADATA_FILE = "hps.json"
OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class ModelSpec:
    """What to load (see `pipeline.hps_model`): a saved folder, a weights file, a model
    config or an architecture name; a pretrained tag or file; a checkpoint over it."""

    model: str
    pretrained: str | None = None
    checkpoint: str | None = None

    def describe(self) -> str:
        return describe_model(self.model, self.pretrained, self.checkpoint)

    def as_dict(self) -> dict[str, str | None]:
        return {"model": self.model, "pretrained": self.pretrained, "checkpoint": self.checkpoint}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=list) + "\n")


def fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder` (and it): before a rename publishes a
    folder, so that a crash cannot leave it published with empty or partial files."""
    for root, _, files in os.walk(folder):
        for name in files:
            fsync(Path(root) / name)
        fsync(Path(root))


def make_temp_dir(target: Path) -> Path:
    """A new, uniquely named folder beside `target` to build it in before renaming it into
    place. Made by a plain `mkdir`, so it has the mode the umask gives (typically 0755), as
    the published folder should; `tempfile.mkdtemp` would make it 0700 (owner only)."""
    while True:
        tmp = target.parent / f".{target.name}.tmp-{secrets.token_hex(6)}"
        try:
            tmp.mkdir()
        except FileExistsError:
            continue
        return tmp
