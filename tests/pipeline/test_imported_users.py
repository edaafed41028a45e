"""Imports cannot touch real users (migration 0010): imported users are `import:<user hash>`,
a namespace no Discord user's pseudonym is in, and records under a pseudonym a forgotten
user held are left out."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import asyncpg
import pyarrow.parquet as pq
import pytest

from db import datasets as db_datasets
from db import images, migrate, users
from db.choices import record_choice
from db.images import NewImage
from hps.store import LocalImageStore
from pipeline.datasets import export_dataset, import_hpd
from tests.colour_task import write_colour_hpd
from tests.factories import ready_round, stored_round


async def _import(pool: Any, folder: Path, store: Path) -> Any:
    async with pool.acquire() as conn:
        return await import_hpd(conn, LocalImageStore(store), folder, progress=False)


async def _export(pool: Any, out: Path, fmt: str, store: Path) -> Any:
    async with pool.acquire() as conn:
        return await export_dataset(conn, LocalImageStore(store), out, fmt, progress=False)


def _hpd_of(folder: Path, user_hash: str, **kwargs: Any) -> Path:
    """A small HPD folder whose every record is by `user_hash`."""
    write_colour_hpd(folder, n_train=3, n_test=1, k=2, **kwargs)
    for name in ("preference_train.json", "preference_test.json"):
        records = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps([{**r, "user_hash": user_hash} for r in records]))
    return folder


USER_SQL = """
SELECT u.*, (SELECT count(*) FROM choices c WHERE c.user_id = u.id) AS choices,
       (SELECT count(*) FROM rounds r WHERE r.requester_id = u.id) AS rounds
FROM users u WHERE u.pseudonym = $1
"""


async def _user(pool: Any, pseudonym: str) -> dict[str, Any] | None:
    record = await pool.fetchrow(USER_SQL, pseudonym)
    return dict(record) if record else None


async def test_an_import_never_puts_picks_on_a_live_user(pool, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    round_id = await ready_round(pool, requester=1, k=2)
    await record_choice(pool, round_id=round_id, discord_user_id=1, verdict="pick", position=1)
    live = (await users.get_user(pool, 1)).pseudonym
    before = await _user(pool, live)

    report = await _import(pool, _hpd_of(tmp_path / "hpd", live), tmp_path / "store")

    assert (report.imported, report.skipped, report.forgotten) == (4, 0, 0)
    assert await _user(pool, live) == before  # the same row, one choice, one round
    assert (before["choices"], before["rounds"], before["source"]) == (1, 1, "discord")
    imported = await _user(pool, f"import:{live}")
    assert (imported["source"], imported["discord_id"], imported["choices"]) == ("import", None, 4)
    # Exports tell them apart; the HPD export names the imported user by its own hash, so it
    # imports back as the same user.
    await _export(pool, tmp_path / "parquet", "parquet", tmp_path / "store")
    rows = pq.read_table(tmp_path / "parquet" / "choices.parquet").to_pylist()
    assert sorted(r["user_id"] for r in rows) == [live] + [f"import:{live}"] * 4


async def test_an_import_never_puts_picks_on_a_forgotten_users_tombstone(
    pool, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    round_id = await ready_round(pool, requester=2, k=2)
    await record_choice(pool, round_id=round_id, discord_user_id=2, verdict="pick", position=2)
    forgotten = await users.forget_user(pool, 2)
    tombstone = await pool.fetchval("SELECT pseudonym FROM users WHERE id = $1", forgotten.user_id)
    before = await _user(pool, tombstone)
    assert (before["choices"], before["rounds"]) == (0, 0) and before["forgotten_at"]

    report = await _import(pool, _hpd_of(tmp_path / "hpd", tombstone), tmp_path / "store")

    assert report.imported == 4
    assert await _user(pool, tombstone) == before  # still empty, still the tombstone
    imported = await _user(pool, f"import:{tombstone}")
    assert (imported["choices"], imported["forgotten_at"]) == (4, None)


async def test_a_forgotten_user_stays_forgotten_when_an_old_export_is_imported_again(
    pool, other_pool, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    store = LocalImageStore(tmp_path / "store")
    dataset = write_colour_hpd(tmp_path / "dataset", n_train=3, n_test=1, k=2, users=2)
    assert (await _import(pool, dataset, tmp_path / "store")).imported == 4
    for prompt in ("my first prompt", "my second prompt"):
        round_id = await stored_round(pool, store, requester=3, prompt=prompt, k=2)
        await record_choice(pool, round_id=round_id, discord_user_id=3, verdict="pick", position=2)
    old = (await users.get_user(pool, 3)).pseudonym
    await _export(pool, tmp_path / "old-export", "hpd", tmp_path / "store")
    records = [
        r
        for name in ("preference_train.json", "preference_test.json")
        for r in json.loads((tmp_path / "old-export" / name).read_text())
    ]
    assert sorted(r["user_hash"] for r in records) == [old, old, "user0000", "user0000",
                                                       "user0001", "user0001"]  # fmt: skip
    forgotten = await users.forget_user(pool, 3)
    for key in forgotten.orphaned_image_keys:  # as the bot does after forgetting
        store.delete(key)
    rounds_before = await pool.fetchval("SELECT count(*) FROM rounds")

    report = await _import(pool, tmp_path / "old-export", tmp_path / "store")

    assert (report.records, report.imported, report.skipped, report.forgotten) == (6, 0, 4, 2)
    assert await pool.fetchval("SELECT count(*) FROM rounds") == rounds_before
    assert await _user(pool, old) is None and await _user(pool, f"import:{old}") is None
    assert not any(store.exists(key) for key in forgotten.orphaned_image_keys)
    # Only the hash is kept, beside nothing that dates or names the tombstone.
    digest = hashlib.sha256(old.encode()).hexdigest()
    assert [tuple(r) for r in await pool.fetch("SELECT * FROM retired_pseudonyms")] == [(digest,)]
    # Another database never saw them forgotten: there the export imports whole.
    assert (await _import(other_pool, tmp_path / "old-export", tmp_path / "store2")).imported == 6


async def test_the_database_keeps_imported_users_apart_and_forgotten_ones_out(pool) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(asyncpg.CheckViolationError):  # a Discord user in the import namespace
        await pool.execute("INSERT INTO users (pseudonym) VALUES ('import:abc')")
    with pytest.raises(asyncpg.CheckViolationError):  # an imported user outside it
        await pool.execute("INSERT INTO users (pseudonym, source) VALUES ('abc', 'import')")
    round_id = await ready_round(pool, requester=4, k=2)
    await record_choice(pool, round_id=round_id, discord_user_id=4, verdict="pick", position=1)
    old = (await users.get_user(pool, 4)).pseudonym
    await users.forget_user(pool, 4)
    assert await users.retired_hashes(pool, [old, "someone else"]) == {old}
    assert await users.ensure_imported_user(pool, old) is None
    # The guard in the record's own transaction (a forget between the check and the write).
    record = db_datasets.ImportedRound(
        external_id="1",
        import_key="k" * 64,
        split="train",
        prompt="a red cube",
        contains_name=False,
        user_hash=old,
        images=[NewImage(p, f"{p}" * 64, f"{p}{p}/{p}{p}/{p * 64}.png") for p in (1, 2)],
        chosen_position=1,
    )
    assert await db_datasets.import_round(pool, record) == db_datasets.FORGOTTEN
    assert await pool.fetchval("SELECT count(*) FROM rounds") == 0
    # A user row deleted outright retires its pseudonym too, and analysts cannot read them.
    await ready_round(pool, requester=5, k=2)
    deleted = await pool.fetchval("DELETE FROM rounds RETURNING requester_id")
    gone = await pool.fetchval("DELETE FROM users WHERE id = $1 RETURNING pseudonym", deleted)
    assert await users.retired_hashes(pool, [gone]) == {gone}
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL ROLE hps_analyst")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetch("SELECT * FROM retired_pseudonyms")


BEFORE_0010_SQL = """
INSERT INTO users (id, discord_id, pseudonym, source, forgotten_at) OVERRIDING SYSTEM VALUE
VALUES (1, 101, 'live1', 'discord', NULL), (2, NULL, 'tomb1', 'discord', now()),
       (3, NULL, 'hash1', 'import', NULL);
INSERT INTO prompts (id, text, norm_hash) OVERRIDING SYSTEM VALUE VALUES (1, 'a red cube', 'h');
INSERT INTO rounds (id, prompt_id, requester_id, source, k, status) OVERRIDING SYSTEM VALUE
VALUES (1, 1, 1, 'import', 2, 'closed'), (2, 1, 2, 'import', 2, 'closed'),
       (3, 1, 3, 'import', 2, 'closed'), (4, 1, 1, 'discord', 2, 'ready');
INSERT INTO images (round_id, position, sha256, storage_key)
SELECT r, p, repeat(p::text, 64), 'k' || r || p
FROM generate_series(1, 4) r, generate_series(1, 2) p;
INSERT INTO choices (round_id, user_id, verdict, chosen_position, is_requester)
VALUES (1, 1, 'pick', 1, true), (2, 2, 'pick', 2, true), (3, 3, 'pick', 1, true),
       (4, 1, 'pick', 2, true);
SELECT setval(pg_get_serial_sequence(t, 'id'), 10) FROM unnest('{users,prompts,rounds}'::text[]) t;
"""

OWNERS_SQL = """
SELECT r.id, requester.pseudonym AS requester, chooser.pseudonym AS chooser
FROM rounds r JOIN users requester ON requester.id = r.requester_id
JOIN choices c ON c.round_id = r.id JOIN users chooser ON chooser.id = c.user_id
ORDER BY r.id
"""


async def test_migration_0010_moves_the_picks_an_import_put_on_discord_users(
    database_url: str,
) -> None:
    await asyncio.to_thread(migrate.downgrade, database_url, "0008")
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(BEFORE_0010_SQL)
        await asyncio.to_thread(migrate.upgrade, database_url)
        owners = [tuple(r) for r in await conn.fetch(OWNERS_SQL)]
        assert owners == [
            (1, "import:live1", "import:live1"),  # off the live user
            (2, "import:tomb1", "import:tomb1"),  # off the tombstone
            (3, "import:hash1", "import:hash1"),  # an imported user, now in its namespace
            (4, "live1", "live1"),  # the live user's own round stays theirs
        ]
        sources = dict(await conn.fetch("SELECT pseudonym, source FROM users"))
        assert sources == {
            "live1": "discord", "tomb1": "discord", "import:live1": "import",
            "import:tomb1": "import", "import:hash1": "import",
        }  # fmt: skip
        await asyncio.to_thread(migrate.downgrade, database_url, "0008")
        pseudonyms = {r[0] for r in await conn.fetch("SELECT pseudonym FROM users")}
        # Back to bare hashes, but for those a Discord user holds.
        assert pseudonyms == {"live1", "tomb1", "import:live1", "import:tomb1", "hash1"}
        await asyncio.to_thread(migrate.upgrade, database_url)
    finally:
        await conn.close()


# A forget as it was before migration 0015: the person's rows and pseudonym go, their
# imported copy stays.
FORGET_BEFORE_0015_SQL = """
DELETE FROM choices WHERE user_id = (SELECT id FROM users WHERE discord_id = $1);
DELETE FROM choice_events WHERE user_id = (SELECT id FROM users WHERE discord_id = $1);
DELETE FROM rounds WHERE requester_id = (SELECT id FROM users WHERE discord_id = $1);
UPDATE users SET discord_id = NULL, pseudonym = 'tombstone', forgotten_at = now()
WHERE discord_id = $1;
"""


async def test_migration_0015_forgets_the_imported_copies_of_people_forgotten_before(
    pool, database_url: str, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    store = LocalImageStore(tmp_path / "store")
    dataset = write_colour_hpd(tmp_path / "dataset", n_train=3, n_test=1, k=2, users=2)
    assert (await _import(pool, dataset, tmp_path / "store")).imported == 4
    for prompt in ("my first prompt", "my second prompt"):
        round_id = await stored_round(pool, store, requester=3, prompt=prompt, k=2)
        await record_choice(pool, round_id=round_id, discord_user_id=3, verdict="pick", position=2)
    old = (await users.get_user(pool, 3)).pseudonym
    await _export(pool, tmp_path / "export", "hpd", tmp_path / "store")
    # Imported back: the dataset's records are known, the person's come in as their copy.
    assert (await _import(pool, tmp_path / "export", tmp_path / "store")).imported == 2
    copy_keys = {
        r["storage_key"]
        for r in await pool.fetch(
            "SELECT i.storage_key FROM images i JOIN rounds r ON r.id = i.round_id"
            " JOIN users u ON u.id = r.requester_id WHERE u.pseudonym = $1",
            f"import:{old}",
        )
    }
    assert len(copy_keys) == 4
    before = await pool.fetchval("SELECT count(*) FROM rounds")
    await asyncio.to_thread(migrate.downgrade, database_url, "0014")
    conn = await asyncpg.connect(database_url)
    try:
        for statement in FORGET_BEFORE_0015_SQL.strip().split(";\n"):
            await conn.execute(statement, 3)
        assert await conn.fetchval(
            "SELECT count(*) FROM users WHERE pseudonym = $1", f"import:{old}"
        ) == 1  # fmt: skip
        await asyncio.to_thread(migrate.upgrade, database_url)
        assert await conn.fetchval(
            "SELECT count(*) FROM users WHERE pseudonym LIKE $1", f"%{old}%"
        ) == 0  # fmt: skip
        # Their two rounds and their copies are gone; the dataset's four rounds stay.
        assert await conn.fetchval("SELECT count(*) FROM rounds") == before - 4 == 4
        assert await conn.fetchval("SELECT count(*) FROM prompts WHERE text LIKE 'my %'") == 0
        pending = {r[0] for r in await conn.fetch("SELECT storage_key FROM image_deletions")}
        assert pending == copy_keys
    finally:
        await conn.close()
    # The files go as any forget's: the bot's sweep deletes them.
    assert (await images.delete_pending(pool, store.delete)).deleted == 4
    assert not any(store.exists(k) for k in copy_keys)
