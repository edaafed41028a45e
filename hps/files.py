"""Files and folders that appear whole or not at all.

`replacing(target)` hands out a temporary name beside `target`; what the block writes there
is flushed to disk and renamed into place when the block ends (a rename is atomic on POSIX),
then the rename itself is flushed. A reader never sees half a file, and a crash leaves the
old target (or none) and at most a stray `.<name>.tmp-*`. Every write-then-rename of the
project goes through here.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes (hex), read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


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


def temporary(target: Path, *, folder: bool = False, unique: bool = True) -> Path:
    """A name beside `target` to build it under: `.<name>.tmp-<random>`, or with `unique`
    false `.<name>.tmp` (one writer only; a stale one left by a crash is removed). With
    `folder` it is made, by a plain `mkdir`: the mode the umask gives (typically 0755), as
    the published folder should have; `tempfile.mkdtemp` would make it 0700 (owner only)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    while True:
        suffix = f"-{secrets.token_hex(6)}" if unique else ""
        tmp = target.parent / f".{target.name}.tmp{suffix}"
        if not unique:
            remove(tmp)
        if not folder:
            return tmp
        try:
            tmp.mkdir()
        except FileExistsError:
            continue
        return tmp


def publish(tmp: Path, target: Path, *, durable: bool = True) -> None:
    """Rename `tmp` over `target` (an existing folder there is removed first: a folder cannot
    be renamed over one with files), flushing it to disk before and the rename after."""
    if durable and not tmp.is_symlink():
        fsync_tree(tmp) if tmp.is_dir() else fsync(tmp)
    if tmp.is_dir() and not tmp.is_symlink() and target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    os.replace(tmp, target)
    if durable:
        fsync(target.parent)


def remove(path: Path) -> None:
    """Remove a file, link or folder if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def replacing(
    target: Path, *, folder: bool = False, durable: bool = True, unique: bool = True
) -> Iterator[Path]:
    """Build `target` under a temporary name (see `temporary`) and publish it when the block
    ends; if the block raises, the temporary is removed and `target` is left as it was."""
    tmp = temporary(target, folder=folder, unique=unique)
    try:
        yield tmp
        publish(tmp, target, durable=durable)
    except BaseException:
        remove(tmp)
        raise


def write_atomically(path: Path, data: bytes | str, *, durable: bool = True) -> None:
    """Write a whole file through `replacing`."""
    with replacing(path, durable=durable) as tmp:
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)


def write_json_atomically(path: Path, data: Any) -> None:
    """`data` as indented JSON, through `replacing`."""
    write_atomically(path, json.dumps(data, indent=2) + "\n")
