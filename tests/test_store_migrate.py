"""Moving to the store: migration 0014 turns registered paths into keys, `hps db upgrade`
moves a local store's older model folders into its layout, and `hps store migrate --to`
copies images and model versions into a bucket, verifying hashes, resumable and
idempotent."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from typer.testing import CliRunner

from cli import app
from db import migrate
from hps.model_store import MANIFEST
from hps.settings import get_settings, load_settings
from hps.storage import storage
from tests.s3 import store_env

JOB = "INSERT INTO jobs (kind, payload) VALUES ('score', $1::jsonb)"
INSERT = """
INSERT INTO model_versions (kind, name, artifact, sha256, status)
VALUES ($1, $2, $3, $4, 'candidate')
"""


def _legacy_version(data_dir: Path, name: str) -> tuple[Path, str]:
    """A model folder as registration left it before the store: data_dir/models/<name>."""
    folder = data_dir / "models" / name
    folder.mkdir(parents=True)
    weights = name.encode() * 1000
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "hps.json").write_text(f'{{"name": "{name}"}}')
    return folder, hashlib.sha256(weights).hexdigest()


def _image(data_dir: Path, data: bytes, name: str | None = None) -> str:
    digest = hashlib.sha256(data).hexdigest()
    key = f"{digest[:2]}/{digest[2:4]}/{name or digest}.png"
    (data_dir / "images" / key).parent.mkdir(parents=True, exist_ok=True)
    (data_dir / "images" / key).write_bytes(data)
    return key


async def _sql(url: str, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


def _artifacts(url: str) -> dict[str, str]:
    rows = asyncio.run(_sql(url, "SELECT name, artifact FROM model_versions"))
    return {r["name"]: r["artifact"] for r in rows}


def _hps(*args: str) -> Any:
    get_settings.cache_clear()
    try:
        return CliRunner().invoke(app, list(args))
    finally:  # the command's log handler wrote to the runner's stream, closed now
        root = logging.getLogger()
        for handler in [h for h in root.handlers if getattr(h, "_hps", False)]:
            root.removeHandler(handler)


def test_registered_folders_become_keys_and_move_into_the_stores_layout(
    empty_database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "data"
    folder, sha = _legacy_version(data_dir, "classifier-7")
    migrate.upgrade(empty_database_url, "0010")
    asyncio.run(_sql(empty_database_url, INSERT, "classifier", "classifier-7", str(folder), sha))
    asyncio.run(_sql(empty_database_url, INSERT, "sd_base", "sd_base:x", "CompVis/sd", None))
    asyncio.run(_sql(empty_database_url, INSERT, "sd_adapter", "by-hand", "/m/a", None))

    monkeypatch.setenv("HPS_DATABASE_URL", empty_database_url)
    result = _hps("db", "upgrade")
    assert result.exit_code == 0, result.output
    key = f"models/classifier-7/{sha}"
    assert _artifacts(empty_database_url) == {
        "classifier-7": key, "sd_base:x": "CompVis/sd", "by-hand": "/m/a",
    }  # fmt: skip
    assert "moved 1 model version(s) into the store's layout" in result.output
    # The files now live where the local store reads them, verified at every load.
    assert sorted(p.name for p in folder.iterdir()) == [sha]
    local = storage(load_settings(data_dir=data_dir)).models
    assert local.fetch(key) == data_dir / key
    assert (data_dir / key / "hps.json").read_text() == '{"name": "classifier-7"}'

    migrate.downgrade(empty_database_url, "0010")  # keys back to the folders holding them
    assert _artifacts(empty_database_url)["classifier-7"] == str((data_dir / key).resolve())
    migrate.upgrade(empty_database_url)
    assert _artifacts(empty_database_url)["classifier-7"] == key


def test_hps_store_migrate_copies_images_and_versions_into_a_bucket_resumably(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3_store: dict[str, Any]
) -> None:
    data_dir = tmp_path / "data"
    _, sha = _legacy_version(data_dir, "classifier-3")
    key = f"models/classifier-3/{sha}"
    asyncio.run(_sql(database_url, INSERT, "classifier", "classifier-3", key, sha))
    images = [_image(data_dir, bytes([i]) * 500) for i in range(3)]
    corrupt = _image(data_dir, b"bytes that do not match the name", name="f" * 64)
    unused = _image(data_dir, b"a file nothing names (a forgotten person's, say)")
    asyncio.run(_sql(database_url, JOB, json.dumps({"image_keys": [*images, corrupt]})))
    for name, value in store_env({k: v for k, v in s3_store.items() if k != "url"}).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HPS_DATABASE_URL", database_url)

    checked = _hps("store", "check")  # the configured store: the folder
    assert checked.exit_code == 0 and f"the folder {data_dir}: reachable" in checked.output

    first = _hps("store", "migrate", "--to", s3_store["url"])
    assert first.exit_code == 1  # something could not be copied: said, not hidden
    assert (
        "images: 3 copied, 0 already there, 1 corrupt (not copied), 1 unused (not copied)"
        in first.output
    )
    assert f"corrupt image (its bytes do not match its name): {corrupt}" in first.output
    assert "model versions: 1 copied, 0 already there" in first.output

    (data_dir / "images" / corrupt).unlink()
    again = _hps("store", "migrate", "--to", s3_store["url"])
    assert again.exit_code == 0, again.output
    assert "images: 0 copied, 3 already there, 1 unused (not copied)" in again.output
    assert "model versions: 0 copied, 1 already there" in again.output

    bucket = storage(load_settings(data_dir=tmp_path / "gpu-node", store=s3_store))
    assert sorted(k for k, _ in bucket.images.objects.listing()) == sorted(images)
    assert unused not in images
    fetched = bucket.models.fetch(key)  # a GPU node with an empty cache
    assert (fetched / "model.safetensors").read_bytes() == b"classifier-3" * 1000
    assert (fetched / MANIFEST).is_file()


def test_hps_store_gc_lists_then_deletes_only_the_images_nothing_uses(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3_store: dict[str, Any]
) -> None:
    bucket = storage(load_settings(data_dir=tmp_path / "data", store=s3_store)).images
    used = [bucket.put(bytes([i]) * 300).key for i in range(2)]
    unused = bucket.put(b"nothing names this one").key
    asyncio.run(_sql(database_url, JOB, json.dumps({"image_keys": used})))
    for name, value in store_env(s3_store).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HPS_DATABASE_URL", database_url)

    listed = _hps("store", "gc")  # a dry run by default
    assert listed.exit_code == 0, listed.output
    assert f"unused: {unused}" in listed.output and "1 of 3 images" in listed.output
    assert bucket.exists(unused)

    # A writer holding the unused image's key (a round committing equal bytes): gc says so
    # and deletes nothing of that batch.
    from datetime import timedelta

    from db import images

    monkeypatch.setitem(
        images.delete_unreferenced.__kwdefaults__, "lock_timeout", timedelta(0.3 / 86400)
    )
    held, release = threading.Event(), threading.Event()

    async def hold() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            async with conn.transaction():
                await images.hold_keys(conn, [unused])
                held.set()
                await asyncio.to_thread(release.wait, 30)
        finally:
            await conn.close()

    holder = threading.Thread(target=asyncio.run, args=(hold(),))
    holder.start()
    try:
        assert held.wait(30)
        refused = _hps("store", "gc", "--delete")
    finally:
        release.set()
        holder.join()
    assert refused.exit_code == 1
    assert "could not lock" in refused.output and "run `hps store gc --delete` again" in (
        " ".join(refused.output.split())
    )
    assert bucket.exists(unused)

    deleted = _hps("store", "gc", "--delete")
    assert deleted.exit_code == 0, deleted.output
    assert "deleted 1 unused images of 3" in deleted.output
    assert not bucket.exists(unused) and all(bucket.exists(k) for k in used)
