"""The store on S3 (moto's server on loopback, spoken to by obstore over HTTP): images as on
a folder, through both the blocking and the async forms; settings; and the one line a
process says at start when the bucket, the credentials or the endpoint are wrong."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hps.settings import ConfigError, load_settings
from hps.storage import storage
from hps.store import ImageStore, LocalImageStore, S3Objects, StoreError, StoreUnavailable
from tests.s3 import SECRET_KEY, s3_auth, store_env, store_section

ROOT = Path(__file__).resolve().parents[1]


def _settings(section: dict[str, Any], tmp_path: Path) -> Any:
    return load_settings(data_dir=tmp_path / "data", store=section)


async def test_images_on_s3_are_keyed_and_deduplicated_as_on_a_folder(
    s3_store: dict[str, Any], tmp_path: Path
) -> None:
    store = storage(_settings(s3_store, tmp_path)).images
    assert isinstance(store, ImageStore) and isinstance(store.objects, S3Objects)
    data = b"\x89PNG fake image bytes"
    digest = hashlib.sha256(data).hexdigest()
    first = await store.put_async(data)
    second = store.put(data)  # the blocking form, as a thread would call it
    assert first.key == f"{digest[:2]}/{digest[2:4]}/{digest}.png" == second.key
    assert first.key == LocalImageStore(tmp_path / "local").put(data).key  # same keys
    assert (first.created, second.created) == (True, False)
    assert await store.get_async(first.key) == data == store.get(first.key)
    assert store.exists(first.key)
    # Under the URL's prefix, below images/.
    keys = [k for k, _ in store.objects.listing()]
    assert keys == [first.key] and store.objects.description.startswith(
        f"{s3_store['url']}/images at http://127.0.0.1:"
    )
    missing = "ab/cd/" + "ab" * 32 + ".png"
    with pytest.raises(StoreError, match="no blob"):
        await store.get_async(missing)
    with pytest.raises(StoreError, match="malformed"):
        store.get("../../etc/passwd")
    assert store.delete(first.key) and not store.delete(first.key)
    assert not store.exists(first.key)


def test_store_settings_are_checked_and_secrets_redacted(tmp_path: Path) -> None:
    section = store_section("http://127.0.0.1:9", "my-bucket", prefix="prod/hps")
    settings = _settings(section, tmp_path)
    assert settings.store.is_s3 and settings.store_folder is None
    assert settings.cache_dir == tmp_path / "data" / "cache"
    assert settings.redacted()["store"]["secret_access_key"] == "********"
    assert SECRET_KEY not in str(settings.redacted())
    assert SECRET_KEY in settings.secret_values()
    assert _settings({}, tmp_path).store_folder == tmp_path / "data"  # the default
    with pytest.raises(ConfigError, match=r"HPS_STORE__URL \(store.url\): .*credentials"):
        _settings({"url": "s3://key:secret@bucket/x"}, tmp_path)
    with pytest.raises(ConfigError, match=r"HPS_STORE__URL \(store.url\): .*s3://bucket/prefix"):
        _settings({"url": "gs://bucket"}, tmp_path)
    with pytest.raises(ConfigError) as caught:
        _settings({**section, "endpoint_url": "https://key:s3cr3t@minio.example"}, tmp_path)
    assert (
        "HPS_STORE__ENDPOINT_URL (store.endpoint_url): Value error, must not hold credentials"
        in str(caught.value)
    )
    assert "s3cr3t" not in str(caught.value)
    with pytest.raises(ConfigError, match=r"store.endpoint_url\): Value error, must be an http"):
        _settings({**section, "endpoint_url": "minio.example:9000"}, tmp_path)


def test_a_missing_bucket_bad_credentials_or_no_server_is_one_line_naming_the_setting(
    s3_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    missing = storage(_settings(store_section(s3_endpoint, "no-such-bucket"), tmp_path))
    with pytest.raises(StoreUnavailable) as caught:
        missing.check()
    assert str(caught.value) == (
        f"cannot use the object store s3://no-such-bucket/hps at {s3_endpoint}: the bucket "
        "'no-such-bucket' does not exist. Check store.url (HPS_STORE__URL), or create the bucket."
    )

    refused = storage(_settings(store_section(s3_endpoint, s3_bucket), tmp_path))
    s3_auth(s3_endpoint, on=True)
    try:
        with pytest.raises(StoreUnavailable) as caught:
            refused.check()
    finally:
        s3_auth(s3_endpoint, on=False)
    assert str(caught.value) == (
        f"the object store s3://{s3_bucket}/hps at {s3_endpoint} refused the credentials "
        "(InvalidAccessKeyId). Check store.access_key_id and store.secret_access_key "
        "(HPS_STORE__ACCESS_KEY_ID, HPS_STORE__SECRET_ACCESS_KEY)."
    )
    refused.check()  # accepted again

    nobody = storage(_settings(store_section("http://127.0.0.1:9", s3_bucket), tmp_path))
    with pytest.raises(StoreUnavailable) as caught:
        nobody.check()
    assert str(caught.value) == (
        f"cannot reach the object store s3://{s3_bucket}/hps at http://127.0.0.1:9: connection "
        "failed. Check store.endpoint_url (HPS_STORE__ENDPOINT_URL) and store.url (HPS_STORE__URL)."
    )


def test_a_worker_with_a_missing_bucket_stops_at_start_with_that_line(
    s3_endpoint: str, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPS_")}
    env.update(store_env(store_section(s3_endpoint, "no-such-bucket")), HPS_DATA_DIR=str(tmp_path))
    env["HPS_DATABASE_URL"] = "postgresql://nobody@127.0.0.1:9/none"  # never reached
    result = subprocess.run(
        [sys.executable, "-m", "cli", "worker", "--kinds", "score"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"error: cannot use the object store s3://no-such-bucket/hps at {s3_endpoint}: the "
        "bucket 'no-such-bucket' does not exist. Check store.url (HPS_STORE__URL), or create "
        "the bucket."
    ]
    assert SECRET_KEY not in result.stderr + result.stdout


async def test_forgetting_deletes_the_users_images_from_the_bucket(
    pool: Any, s3_store: dict[str, Any], tmp_path: Path
) -> None:
    from db import users
    from tests.factories import stored_round

    store = storage(_settings(s3_store, tmp_path)).images
    await stored_round(pool, store, requester=41, k=3)
    kept = await stored_round(pool, store, requester=42, k=2)
    assert len(list(store.objects.listing())) == 5
    result = await users.forget_user(pool, 41, delete=store.delete)  # under the key locks
    assert result is not None and result.files_deleted == 3
    left = sorted(k for k, _ in store.objects.listing())
    rows = await pool.fetch("SELECT storage_key FROM images WHERE round_id = $1", kept)
    assert left == sorted(r["storage_key"] for r in rows)


async def test_an_upload_to_a_store_that_hangs_gives_up_at_its_deadline(
    tmp_path: Path,
) -> None:
    """A server that accepts connections and never answers: the upload (made inside a
    round's transaction) fails at the deadline with a line naming the setting, rather than
    holding the transaction for minutes."""
    import socket
    import time

    listener = socket.create_server(("127.0.0.1", 0))  # accepts (the backlog), never answers
    endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        section = {**store_section(endpoint, "hung"), "upload_timeout_seconds": 0.5}
        images = storage(_settings(section, tmp_path)).images
        for upload in (images.put_async, images.ensure_async):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as caught:
                await upload(b"image bytes", ".png")
            assert time.monotonic() - started < 3
            assert str(caught.value).startswith(
                f"the object store s3://hung/hps/images at {endpoint} did not store "
            )
            assert "within 0.5 s. Check store.endpoint_url (HPS_STORE__ENDPOINT_URL)" in str(
                caught.value
            )
            assert "raise store.upload_timeout_seconds (HPS_STORE__UPLOAD_TIMEOUT_SECONDS)" in str(
                caught.value
            )
    finally:
        listener.close()


async def test_import_writes_images_to_the_bucket_without_blocking_the_event_loop(
    pool: Any, s3_store: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`hps import` into an object store uses the async API only: a blocking S3 call in the
    event loop would stall every other task of the process (the bot's, the worker's)."""
    from pipeline.datasets import import_hpd
    from tests.colour_task import write_colour_hpd

    def blocking(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a blocking S3 call in the event loop")

    for name in ("put", "create", "get", "size", "exists", "delete"):
        monkeypatch.setattr(S3Objects, name, blocking)
    store = storage(_settings(s3_store, tmp_path)).images
    hpd = write_colour_hpd(tmp_path / "hpd", n_train=3, n_test=1, k=2)
    async with pool.acquire() as conn:
        report = await import_hpd(conn, store, hpd, progress=False)
    assert report.imported == 4
    keys = [r["storage_key"] for r in await pool.fetch("SELECT storage_key FROM images")]
    assert len(keys) == 8
    for key in keys:
        assert hashlib.sha256(await store.get_async(key)).hexdigest() in key
