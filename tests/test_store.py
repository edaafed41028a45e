"""The content-addressed image store."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from hps.store import ImageStore, LocalImageStore, StoreError


def test_put_is_content_addressed_and_deduplicated(tmp_path: Path) -> None:
    store = LocalImageStore(tmp_path)
    assert isinstance(store, ImageStore)
    data = b"\x89PNG fake image bytes"
    digest = hashlib.sha256(data).hexdigest()
    first = store.put(data)
    second = store.put(data)
    assert first.key == f"{digest[:2]}/{digest[2:4]}/{digest}.png" == second.key
    assert (first.created, second.created) == (True, False)
    assert store.get(first.key) == data and store.exists(first.key)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [tmp_path / first.key]


def test_a_crash_while_writing_leaves_nothing(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    store = LocalImageStore(tmp_path)

    def crash(src: str, dst: str) -> None:
        raise OSError("disk pulled out")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk pulled out"):
        store.put(b"some image")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_concurrent_writers_of_the_same_bytes_store_one_file(tmp_path: Path) -> None:
    store = LocalImageStore(tmp_path)
    data = os.urandom(200_000)
    with ThreadPoolExecutor(8) as pool:
        blobs = list(pool.map(lambda _: store.put(data), range(32)))
    assert len({b.key for b in blobs}) == 1
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 1 and files[0].read_bytes() == data


def test_bad_keys_are_refused(tmp_path: Path) -> None:
    store = LocalImageStore(tmp_path)
    for key in ("../../etc/passwd", "ab/cd/xyz.png", ""):
        with pytest.raises(StoreError):
            store.get(key)
    with pytest.raises(StoreError, match="no blob"):
        store.get("ab/cd/" + "ab" * 32 + ".png")
    blob = store.put(b"x", suffix=".jpg")
    assert blob.key.endswith(".jpg") and store.delete(blob.key) and not store.delete(blob.key)


def test_replacing_publishes_whole_or_leaves_the_target_as_it_was(tmp_path: Path) -> None:
    from hps.files import replacing, write_json_atomically

    target = tmp_path / "manifest.json"
    write_json_atomically(target, {"stage": 1})
    with pytest.raises(RuntimeError), replacing(target) as tmp:
        tmp.write_text('{"stage": 2, "half')
        raise RuntimeError("crash mid-write")
    assert target.read_text() == '{\n  "stage": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]

    folder = tmp_path / "adapter"
    for weights in (b"old", b"new"):  # a folder replaces the one there
        with replacing(folder, folder=True, unique=False) as tmp:
            (tmp / "weights").write_bytes(weights)
    assert [p.name for p in folder.iterdir()] == ["weights"]
    assert (folder / "weights").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "manifest.json"]


async def test_what_is_read_is_checked_against_its_key(tmp_path: Path) -> None:
    store = LocalImageStore(tmp_path)
    blob = store.put(b"an image")
    (tmp_path / blob.key).write_bytes(b"an imagf")  # a flipped bit on the disk
    with pytest.raises(StoreError, match="is corrupt: its bytes do not match its key"):
        store.get(blob.key)
    with pytest.raises(StoreError, match="is corrupt"):
        await store.get_async(blob.key)
