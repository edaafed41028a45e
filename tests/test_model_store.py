"""Model versions in the store: published whole (the manifest last), fetched on first use
into a bounded cache, verified by hash (a corrupt cached file is fetched again), streamed
in parts; and read in place from a local store."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from hps.model_store import MANIFEST, ModelStore, is_key
from hps.settings import load_settings
from hps.storage import storage
from hps.store import CHUNK, LocalObjects, StoreError


def _version(folder: Path, weights: bytes, extra: str = "{}") -> Path:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "hps.json").write_text(extra)
    (folder / "sub").mkdir()
    (folder / "sub" / "config.json").write_text('{"rank": 4}')
    return folder


def _stores(s3_store: dict[str, Any], tmp_path: Path, machine: str, **store: Any) -> ModelStore:
    settings = load_settings(data_dir=tmp_path / machine, store={**s3_store, **store})
    return storage(settings).models


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def test_published_on_one_machine_fetched_verified_and_cached_on_another(
    s3_store: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = _version(tmp_path / "run" / "best", os.urandom(3000), '{"name": "c-1"}')
    trainer = _stores(s3_store, tmp_path, "trainer")
    published = trainer.publish(source, "c-1", "model.safetensors")
    assert is_key(published.key) and published.key == f"models/c-1/{published.sha256}"
    assert trainer.publish(source, "c-1", "model.safetensors") == published  # idempotent

    scorer = _stores(s3_store, tmp_path, "scorer")  # another machine: an empty cache
    folder = scorer.fetch(published.key)
    assert folder == tmp_path / "scorer" / "cache" / "models" / "c-1" / published.sha256
    assert {k: v for k, v in _files(folder).items() if k != MANIFEST} == _files(source)
    assert scorer.local_path(published.key) == str(folder)
    assert scorer.local_path("CompVis/stable-diffusion-v1-4") == "CompVis/stable-diffusion-v1-4"

    # A corrupt cached file (same size, other bytes) is detected by its hash and fetched again.
    weights = folder / "model.safetensors"
    weights.write_bytes(b"\0" * weights.stat().st_size)
    with caplog.at_level(logging.WARNING, logger="hps.model_store"):
        assert scorer.fetch(published.key) == folder
    assert (
        f"cached {published.key} is corrupt (model.safetensors): fetching it again" in caplog.text
    )
    assert weights.read_bytes() == (source / "model.safetensors").read_bytes()

    # Other contents under the same key are refused: a key names one content.
    (source / "hps.json").write_text('{"name": "changed"}')
    with pytest.raises(StoreError, match="published already, with other files"):
        trainer.publish(source, "c-1", "model.safetensors")


def test_an_interrupted_upload_is_never_a_version(
    s3_store: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _version(tmp_path / "adapter", os.urandom(2000))
    store = _stores(s3_store, tmp_path, "gpu")
    calls = []
    real_put_file = type(store.objects).put_file

    def dies_on_the_second_file(self: Any, key: str, path: Path) -> None:
        calls.append(key)
        if len(calls) == 2:
            raise ConnectionError("network gone mid-upload")
        real_put_file(self, key, path)

    monkeypatch.setattr(type(store.objects), "put_file", dies_on_the_second_file)
    with pytest.raises(ConnectionError):
        store.publish(source, "a-1", "model.safetensors")
    key = "/".join(calls[0].split("/")[:3])  # models/a-1/<sha256>
    assert store.manifest(key) is None  # no manifest: not published
    with pytest.raises(StoreError, match=f"model version {key} is not in s3://"):
        _stores(s3_store, tmp_path, "other").fetch(key)
    monkeypatch.undo()
    assert store.publish(source, "a-1", "model.safetensors").key == key  # the next attempt


def test_the_cache_keeps_the_most_recently_used_within_its_bound(
    s3_store: dict[str, Any], tmp_path: Path
) -> None:
    trainer = _stores(s3_store, tmp_path, "trainer")
    keys = [
        trainer.publish(
            _version(tmp_path / f"v{i}", os.urandom(400_000)), f"v{i}", "model.safetensors"
        ).key
        for i in range(3)
    ]
    # Room for two versions (each ~400 kB).
    worker = _stores(s3_store, tmp_path, "worker", cache_max_gib=900_000 / 1024**3)
    first, second = worker.fetch(keys[0]), worker.fetch(keys[1])
    os.utime(first, (1, 1))  # used long ago
    os.utime(second, (2, 2))
    worker.fetch(keys[0])  # used again now: second is now the least recently used
    third = worker.fetch(keys[2])
    assert first.is_dir() and third.is_dir() and not second.exists()


def test_large_files_go_up_in_parts_and_come_down_streamed(
    s3_store: dict[str, Any], tmp_path: Path
) -> None:
    import boto3

    from tests.s3 import ACCESS_KEY, REGION, SECRET_KEY

    big = _version(tmp_path / "big", os.urandom(2 * CHUNK + 123))
    trainer = _stores(s3_store, tmp_path, "trainer")
    key = trainer.publish(big, "big", "model.safetensors").key
    client = boto3.client(
        "s3", endpoint_url=s3_store["endpoint_url"], region_name=REGION,
        aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
    )  # fmt: skip
    bucket = s3_store["url"].removeprefix("s3://").split("/")[0]
    head = client.head_object(Bucket=bucket, Key=f"hps/{key}/model.safetensors")
    assert head["ETag"].endswith('-3"')  # a multipart upload of 3 parts
    blocks = [len(b) for b in trainer.objects.chunks(f"{key}/model.safetensors")]
    assert len(blocks) >= 2 and max(blocks) <= 2 * CHUNK and sum(blocks) == 2 * CHUNK + 123
    folder = _stores(s3_store, tmp_path, "worker").fetch(key)
    assert (folder / "model.safetensors").read_bytes() == (big / "model.safetensors").read_bytes()


def test_a_local_store_reads_versions_in_place_and_refuses_corrupt_ones(tmp_path: Path) -> None:
    store = ModelStore(LocalObjects(tmp_path / "data"), None, 10**9)
    key = store.publish(_version(tmp_path / "run", b"weights"), "c-2", "model.safetensors").key
    folder = store.fetch(key)
    assert folder == tmp_path / "data" / key
    assert json.loads((folder / MANIFEST).read_text())["weights"] == "model.safetensors"
    (folder / "hps.json").write_text("tampered")
    with pytest.raises(StoreError, match=f"model version {key} in the store is corrupt: hps.json"):
        store.fetch(key)


def test_concurrent_fetches_of_one_version_download_it_once(
    s3_store: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    source = _version(tmp_path / "run", os.urandom(300_000))
    key = _stores(s3_store, tmp_path, "trainer").publish(source, "c-3", "model.safetensors").key
    worker = _stores(s3_store, tmp_path, "worker")
    downloads, started = [], threading.Barrier(4)
    real = ModelStore._download

    def counted(self: ModelStore, key: str, entry: Path) -> None:
        downloads.append(key)
        real(self, key, entry)

    monkeypatch.setattr(ModelStore, "_download", counted)

    def fetch(_: int) -> bytes:
        started.wait()
        return (worker.fetch(key) / "model.safetensors").read_bytes()

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(fetch, range(4)))
    assert downloads == [key]  # the others waited on its lock and found it whole
    assert got == [(source / "model.safetensors").read_bytes()] * 4
    leftovers = [p.name for p in (worker.cache / "c-3").iterdir()]  # type: ignore[operator]
    assert leftovers == [key.rsplit("/", 1)[1]]  # no temporary folder left


def test_a_version_being_loaded_is_not_evicted(s3_store: dict[str, Any], tmp_path: Path) -> None:
    trainer = _stores(s3_store, tmp_path, "trainer")
    keys = [
        trainer.publish(
            _version(tmp_path / f"v{i}", os.urandom(400_000)), f"v{i}", "model.safetensors"
        ).key
        for i in range(3)
    ]
    # Room for one version: each fetch would evict every other.
    worker = _stores(s3_store, tmp_path, "worker", cache_max_gib=500_000 / 1024**3)
    with worker.opened(keys[0]) as loading:
        assert worker.fetch(keys[1]).is_dir()  # evicts nothing in use
        assert (Path(loading) / "model.safetensors").is_file()
    third = worker.fetch(keys[2])  # keys[0] is no longer in use: evicted now
    assert third.is_dir() and not Path(loading).exists()
    with worker.opened("CompVis/stable-diffusion-v1-4") as hub_id:
        assert hub_id == "CompVis/stable-diffusion-v1-4"


def test_a_damaged_manifest_is_fetched_again_or_refused_saying_so(
    s3_store: dict[str, Any], tmp_path: Path
) -> None:
    source = _version(tmp_path / "run", os.urandom(5000))
    trainer = _stores(s3_store, tmp_path, "trainer")
    key = trainer.publish(source, "c-9", "model.safetensors").key
    worker = _stores(s3_store, tmp_path, "worker")

    # In the cache (a partial write, a bad disk): fetched again, not a crash.
    cached = worker.fetch(key)
    (cached / MANIFEST).write_text('{"format": "hps-mo')
    assert worker.fetch(key) == cached
    assert json.loads((cached / MANIFEST).read_text())["name"] == "c-9"

    # In the store: refused with a line that says what to do, never loaded.
    trainer.objects.put(f"{key}/{MANIFEST}", b'{"truncated": ')
    with pytest.raises(StoreError) as caught:
        _stores(s3_store, tmp_path, "other").fetch(key)
    assert str(caught.value) == (
        f"the manifest of {key} is corrupt or does not describe that version: publish the "
        "version again (`hps store migrate` from the machine that has its files)"
    )
    # Publishing again repairs it.
    assert trainer.publish(source, "c-9", "model.safetensors").key == key
    assert (_stores(s3_store, tmp_path, "third").fetch(key) / "hps.json").is_file()
