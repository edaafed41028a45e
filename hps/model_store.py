"""Model versions as immutable objects in the store, and the local cache workers load from.

A version's folder (a classifier's open_clip folder, an SD adapter's LoRA folder: whatever
a recipe's `register` stage publishes) is stored as

    models/<name>/<sha256>/<file>…              one object per file
    models/<name>/<sha256>/hps-manifest.json    every file's size and sha256, written last

`models/<name>/<sha256>` is the version's key, what `model_versions.artifact` holds; the
sha256 is that of its weights file, the one the registry has always recorded
(`model_versions.sha256`). So a key names one content, and a database registered before the
store existed turned its paths into keys by SQL alone (migration 0014). A key is never
published twice with other contents (`publish` refuses).

Publishing uploads every file (streamed; large files in parts, each checked by the server
against its SHA-256), then the manifest, and only then does the caller register the
version. An interrupted upload leaves objects no manifest and no row names: never a
version whose files are missing, and the next attempt writes them again.

`fetch(key)` returns a local folder holding the version, every file verified against the
manifest (whose weights entry must match the key): for a local store, the version's folder
in it; for an object store, this machine's cached copy (`cache_dir/models/<name>/<sha256>`),
downloaded on first use (streamed to disk, hashed as it arrives, published whole by a
rename) and verified again at every use, so that a corrupt cached file is detected and
fetched again. After a download, the least recently used versions (by last use) are
removed until the cache fits `store.cache_max_gib`; the version just fetched always stays.
Processes and threads sharing a cache folder take a file lock per version: exclusive while
fetching it (one download; the others wait and find it whole), shared while loading it
(`opened`), and eviction passes over a version whose lock it cannot take at once, so a
version being loaded is never removed under its loader.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hps.files import remove, replacing, sha256_file
from hps.store import LocalObjects, ObjectStore, StoreError, check_object_key

log = logging.getLogger(__name__)

MANIFEST = "hps-manifest.json"
FORMAT = "hps-model/1"
_KEY = re.compile(r"^models/([A-Za-z0-9][A-Za-z0-9._-]{0,99})/([0-9a-f]{64})$")
_SHA = re.compile(r"^[0-9a-f]{64}$")


def is_key(artifact: str) -> bool:
    """Whether a version's artifact names a published version (else: a folder or hub id,
    as a base model's does)."""
    return bool(_KEY.match(artifact))


def key_of(name: str, sha256: str) -> str:
    key = f"models/{name}/{sha256}"
    if not is_key(key):
        raise StoreError(f"no model key can be made of {name!r} and {sha256!r}")
    return key


def _parse(key: str) -> tuple[str, str]:
    match = _KEY.match(key)
    if match is None:
        raise StoreError(f"malformed model key {key!r}")
    return match[1], match[2]


def manifest_of(folder: Path, name: str, weights: str) -> dict[str, Any]:
    """The manifest of a version folder: every file (but a manifest) with size and sha256."""
    files = {}
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        top = rel.partition("/")[0]
        # A folder registered before the store existed holds its published copy in
        # <sha256>/ once `hps store migrate` moved it there (or began to): not its own file.
        if rel == MANIFEST or (top != rel and _SHA.match(top)):
            continue
        files[check_object_key(rel)] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    if weights not in files:
        raise StoreError(f"{folder} has no {weights}: not a saved model folder")
    return {"format": FORMAT, "name": name, "weights": weights, "files": files}


def _encode(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


def _checked_manifest(raw: bytes, key: str) -> dict[str, Any]:
    """A manifest read from the store, refused unless it describes `key`'s version."""
    name, sha = _parse(key)
    try:
        manifest = json.loads(raw)
        files = manifest["files"]
        weights = files[manifest["weights"]]
        ok = manifest.get("format") == FORMAT and weights["sha256"] == sha
        ok = ok and manifest.get("name") == name
        for rel, entry in files.items():
            check_object_key(rel)
            ok = ok and isinstance(entry["size"], int) and isinstance(entry["sha256"], str)
    except (ValueError, KeyError, TypeError, StoreError):
        ok = False
    if not ok:
        raise StoreError(
            f"the manifest of {key} is corrupt or does not describe that version: publish "
            "the version again (`hps store migrate` from the machine that has its files)"
        )
    return manifest


def verify(folder: Path, manifest: dict[str, Any]) -> list[str]:
    """The files of `folder` that are missing or differ from the manifest (empty: all good)."""
    bad = []
    for rel, entry in manifest["files"].items():
        path = folder / rel
        same_size = path.is_file() and path.stat().st_size == entry["size"]
        if not same_size or sha256_file(path) != entry["sha256"]:
            bad.append(rel)
    return bad


@dataclass(frozen=True)
class Published:
    key: str
    sha256: str  # of the weights
    size: int  # bytes of all its files


@contextlib.contextmanager
def _locked(path: Path, shared: bool = False) -> Iterator[None]:
    """A lock on `path` (flock: held by this open file, so threads exclude each other too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _locked_now(path: Path) -> Iterator[bool]:
    """An exclusive lock on `path` if it can be had at once: yields whether it was."""
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class ModelStore:
    """Published model versions; `cache` None reads a local store's folders in place."""

    def __init__(self, objects: ObjectStore, cache: Path | None, cache_max_bytes: int) -> None:
        self.objects, self.cache, self.cache_max_bytes = objects, cache, cache_max_bytes

    # -- publishing ----------------------------------------------------------------------

    def manifest(self, key: str) -> dict[str, Any] | None:
        """The published manifest of `key`, or None if it is not (wholly) published."""
        _parse(key)
        try:
            raw = self.objects.get(f"{key}/{MANIFEST}")
        except StoreError:
            return None
        return _checked_manifest(raw, key)

    def publish(self, folder: Path, name: str, weights: str) -> Published:
        """Store the version folder `folder` (holding its `weights` file) under
        `models/<name>/<sha256 of weights>`: every file, then the manifest. Publishing the
        same folder again does nothing; other contents under that key are refused."""
        manifest = manifest_of(folder, name, weights)
        sha = manifest["files"][weights]["sha256"]
        key = key_of(name, sha)
        size = sum(entry["size"] for entry in manifest["files"].values())
        try:
            existing = self.manifest(key)
        except StoreError as exc:  # a damaged manifest: the files and it are written again
            log.warning("%s: publishing it again", exc)
            existing = None
        if existing is not None:
            if existing != manifest:
                raise StoreError(f"{key} is published already, with other files")
            return Published(key, sha, size)
        for rel in manifest["files"]:
            self.objects.put_file(f"{key}/{rel}", Path(folder) / rel)
        self.objects.put(f"{key}/{MANIFEST}", _encode(manifest))
        log.info("published %s (%d files, %d bytes)", key, len(manifest["files"]), size)
        return Published(key, sha, size)

    # -- loading -------------------------------------------------------------------------

    def local_path(self, artifact: str) -> str:
        """What a loader opens for a version's artifact: the fetched folder of a published
        version, else the artifact itself (a base model's hub id or folder)."""
        return str(self.fetch(artifact)) if is_key(artifact) else artifact

    @contextlib.contextmanager
    def opened(self, artifact: str) -> Iterator[str]:
        """`local_path` held for the block: a cached version cannot be evicted while the
        block loads it (another process's fetch passes over it)."""
        if not is_key(artifact) or self.cache is None:
            yield self.local_path(artifact)
            return
        name, sha = _parse(artifact)
        while True:
            entry = self.fetch(artifact)
            with _locked(self._lock_of(name, sha), shared=True):
                # Evicted between the fetch and the lock (rare): fetch it again.
                if (entry / MANIFEST).is_file():
                    yield str(entry)
                    return

    def _lock_of(self, name: str, sha: str) -> Path:
        assert self.cache is not None
        return self.cache / ".locks" / f"{name}-{sha}.lock"

    def fetch(self, key: str) -> Path:
        """A local folder holding the version `key`, verified (see the module docstring)."""
        name, sha = _parse(key)
        if self.cache is None:
            return self._in_place(key)
        entry = self.cache / name / sha
        with _locked(self._lock_of(name, sha)):
            manifest_file = entry / MANIFEST
            if manifest_file.is_file():
                try:
                    bad = verify(entry, _checked_manifest(manifest_file.read_bytes(), key))
                except StoreError:
                    bad = [MANIFEST]
                if not bad:
                    os.utime(entry)  # its last use, for the eviction order
                    return entry
                log.warning("cached %s is corrupt (%s): fetching it again", key, ", ".join(bad))
                remove(entry)
            elif entry.exists():  # a folder without its manifest (not one of ours): replaced
                remove(entry)
            self._download(key, entry)
        self._evict(keep=entry)
        return entry

    def _in_place(self, key: str) -> Path:
        assert isinstance(self.objects, LocalObjects)
        folder = self.objects.path(key)
        if not (folder / MANIFEST).is_file():
            raise StoreError(
                f"model version {key} is not in {self.objects.description}: "
                "run `hps store migrate` on the machine that has its files"
            )
        bad = verify(folder, _checked_manifest((folder / MANIFEST).read_bytes(), key))
        if bad:
            raise StoreError(f"model version {key} in the store is corrupt: {', '.join(bad)}")
        return folder

    def _download(self, key: str, entry: Path) -> None:
        try:
            raw = self.objects.get(f"{key}/{MANIFEST}")
        except StoreError:
            raise StoreError(f"model version {key} is not in {self.objects.description}") from None
        manifest = _checked_manifest(raw, key)
        with replacing(entry, folder=True) as tmp:
            for rel, expected in manifest["files"].items():
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                digest, size = hashlib.sha256(), 0
                with open(target, "wb") as fh:
                    for block in self.objects.chunks(f"{key}/{rel}"):
                        fh.write(block)
                        digest.update(block)
                        size += len(block)
                if (size, digest.hexdigest()) != (expected["size"], expected["sha256"]):
                    raise StoreError(f"the store's {key}/{rel} does not match its manifest")
            (tmp / MANIFEST).write_bytes(raw)
        size = sum(e["size"] for e in manifest["files"].values())
        log.info("fetched %s into the model cache (%d bytes)", key, size)

    def _evict(self, keep: Path) -> None:
        """Remove the least recently used versions until the cache fits its bound."""
        assert self.cache is not None
        with _locked(self.cache / ".locks" / "evict.lock"):
            entries = []
            for manifest_file in self.cache.glob(f"*/*/{MANIFEST}"):
                entry = manifest_file.parent
                try:
                    files = json.loads(manifest_file.read_bytes())["files"]
                    used = entry.stat().st_mtime
                except (OSError, ValueError, KeyError):
                    continue
                entries.append((used, sum(f["size"] for f in files.values()), entry))
            total = sum(size for _, size, _ in entries)
            for _, size, entry in sorted(entries, key=lambda e: e[0]):
                if total <= self.cache_max_bytes:
                    break
                if entry == keep:
                    continue
                with _locked_now(self._lock_of(entry.parent.name, entry.name)) as free:
                    if not free:  # being fetched or loaded now: not removed under its user
                        continue
                    remove(entry)
                total -= size
                log.info("evicted %s/%s from the model cache", entry.parent.name, entry.name)
            if total > self.cache_max_bytes:
                log.warning(
                    "the model cache holds %d bytes, above store.cache_max_gib: the versions "
                    "in use alone are larger",
                    total,
                )
