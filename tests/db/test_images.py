"""Image files shared by content: a file is deleted only when nothing uses it, even while
another round with the same bytes is being written."""

from __future__ import annotations

import asyncio
from pathlib import Path

from db import images, rounds
from db.connect import transaction
from hps.store import LocalImageStore
from tests.factories import queued_round

PNG = b"\x89PNG\r\n\x1a\n the same bytes twice"


async def _generating_round(pool, requester: int) -> int:  # type: ignore[no-untyped-def]
    round_id = await queued_round(pool, requester=requester, k=2)
    assert await rounds.start_generating(pool, round_id) is not None
    return round_id


def _rows(round_id: int, key: str, sha256: str) -> list[images.NewImage]:
    return [images.NewImage(position=p, sha256=sha256, storage_key=key) for p in (1, 2)]


async def test_a_deletion_waits_for_a_writer_of_the_same_bytes_and_keeps_the_file(
    pool, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    store = LocalImageStore(tmp_path)
    blob = store.put(PNG)
    round_id = await _generating_round(pool, requester=1)
    async with pool.acquire() as writing, transaction(writing) as conn:
        assert await rounds.finish_round(conn, round_id, _rows(round_id, blob.key, blob.sha256))
        deleting = asyncio.create_task(images.delete_unreferenced(pool, [blob.key], store.delete))
        await asyncio.sleep(0.3)
        assert not deleting.done()  # the writer holds the key until it commits
    assert await asyncio.wait_for(deleting, 5) == 0
    assert store.exists(blob.key)


async def test_a_writer_after_a_deletion_stores_the_file_again(pool, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The writer stored its bytes, found them already there (a forgotten round's), and the
    deletion removed them before the writer's transaction: putting them again under the
    held key brings the file back before the row that names it commits."""
    store = LocalImageStore(tmp_path)
    blob = store.put(PNG)
    assert await images.delete_unreferenced(pool, [blob.key], store.delete) == 1
    assert not store.exists(blob.key)
    round_id = await _generating_round(pool, requester=2)
    async with transaction(pool) as conn:
        assert await rounds.finish_round(conn, round_id, _rows(round_id, blob.key, blob.sha256))
        assert store.put(PNG).created  # written again, under the held key
    assert store.exists(blob.key)
    assert await images.delete_unreferenced(pool, [blob.key], store.delete) == 0
