"""Content-addressed image store.

A blob's key is derived from the SHA-256 of its bytes: `ab/cd/abcd…ef.png` (two levels of
two-hex-digit shards keep directories small). Writing the same bytes twice stores them once.
Files are written through `hps.files.replacing` (a temporary name, fsync, rename), so a
reader never sees a partial file and a crash leaves at most a stray temp file.

`ImageStore` is the interface; `LocalImageStore` implements it on a filesystem. An
S3-compatible store would implement the same four methods (`put`, `get`, `exists`,
`delete`) with the same keys.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from hps.files import replacing

_KEY = re.compile(r"^[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{64}\.[a-z0-9]{1,5}$")
_SUFFIX = re.compile(r"^\.[a-z0-9]{1,5}$")


class StoreError(Exception):
    """A key that is malformed or not in the store."""


@dataclass(frozen=True)
class StoredBlob:
    key: str
    sha256: str
    size: int
    created: bool  # False when the same bytes were already stored


def key_for(sha256: str, suffix: str) -> str:
    """The storage key of a blob with this digest and file suffix (e.g. `.png`)."""
    if not _SUFFIX.match(suffix):
        raise StoreError(f"bad suffix {suffix!r}")
    return f"{sha256[:2]}/{sha256[2:4]}/{sha256}{suffix}"


def check_key(key: str) -> str:
    if not _KEY.match(key):
        raise StoreError(f"malformed storage key {key!r}")
    return key


@runtime_checkable
class ImageStore(Protocol):
    def put(self, data: bytes, suffix: str = ".png") -> StoredBlob: ...
    def get(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> bool: ...


class LocalImageStore:
    """The image store on a local (or network-mounted) filesystem."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        """The file holding `key` (local stores only)."""
        return self.root / check_key(key)

    def put(self, data: bytes, suffix: str = ".png") -> StoredBlob:
        digest = hashlib.sha256(data).hexdigest()
        key = key_for(digest, suffix)
        target = self.root / key
        if target.exists():
            return StoredBlob(key, digest, len(data), created=False)
        # Atomic; two writers of the same bytes both succeed with one file.
        with replacing(target) as tmp:
            tmp.write_bytes(data)
            tmp.chmod(0o644)
        return StoredBlob(key, digest, len(data), created=True)

    def get(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            raise StoreError(f"no blob {key!r} in the store") from None

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def delete(self, key: str) -> bool:
        try:
            self.path(key).unlink()
        except FileNotFoundError:
            return False
        return True
