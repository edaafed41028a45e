"""Dataset import and export: the HPD layout round trip, Parquet, Pick-a-Pic pairs, and who
is never exported."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from db import users
from db.choices import record_choice
from db.images import NewImage
from hps.store import LocalImageStore
from pipeline.data import DatasetError
from pipeline.datasets import export_dataset, import_hpd
from tests.factories import ready_round
from tests.tiny_clip import write_colour_hpd

SNAPSHOT_SQL = """
SELECT r.external_id, r.split, r.k, r.status, p.text, p.contains_name, u.pseudonym,
       c.verdict, c.chosen_position, c.is_requester,
       array_agg(i.sha256 ORDER BY i.position) AS images,
       array_agg(i.storage_key ORDER BY i.position) AS keys
FROM rounds r JOIN prompts p ON p.id = r.prompt_id JOIN choices c ON c.round_id = r.id
JOIN users u ON u.id = c.user_id JOIN images i ON i.round_id = r.id
GROUP BY r.id, p.id, u.id, c.id ORDER BY r.external_id
"""


async def _snapshot(pool: Any) -> list[dict[str, Any]]:
    return [dict(r) for r in await pool.fetch(SNAPSHOT_SQL)]


async def _import(pool: Any, folder: Path, images: Path) -> Any:
    async with pool.acquire() as conn:
        return await import_hpd(conn, LocalImageStore(images), folder, progress=False)


async def _export(pool: Any, out: Path, fmt: str, images: Path, **kwargs: Any) -> Any:
    async with pool.acquire() as conn:
        return await export_dataset(
            conn, LocalImageStore(images), out, fmt, progress=False, **kwargs
        )


def _records(folder: Path) -> dict[str, list[dict[str, Any]]]:
    return {
        split: sorted(
            json.loads((folder / f"preference_{split}.json").read_text()), key=lambda r: r["id"]
        )
        for split in ("train", "test")
    }


async def test_import_export_import_is_lossless(pool, other_pool, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source = write_colour_hpd(
        tmp_path / "a", n_train=12, n_test=5, k=(2, 3, 4), users=3, name_every=4
    )
    first = await _import(pool, source, tmp_path / "store1")
    assert (first.records, first.imported, first.skipped) == (17, 17, 0)
    again = await _import(pool, source, tmp_path / "store1")
    assert (again.imported, again.skipped) == (0, 17)  # idempotent
    snapshot = await _snapshot(pool)
    assert len(snapshot) == 17 and sum(r["contains_name"] for r in snapshot) == 5
    assert {r["split"] for r in snapshot} == {"train", "test"}
    assert all(r["status"] == "closed" and r["is_requester"] for r in snapshot)
    assert await pool.fetchval("SELECT count(*) FROM users WHERE source = 'import'") == 3

    exported = await _export(pool, tmp_path / "b", "hpd", tmp_path / "store1")
    assert (exported.rows, exported.choices) == (17, 17)
    assert _records(tmp_path / "b") == _records(source)
    for name in (p.name for p in (source / "preference_images").iterdir()):
        assert (tmp_path / "b" / "preference_images" / name).read_bytes() == (
            source / "preference_images" / name
        ).read_bytes()

    second = await _import(other_pool, tmp_path / "b", tmp_path / "store2")
    assert second.imported == 17
    assert await _snapshot(other_pool) == snapshot


async def test_a_malformed_dataset_is_refused_and_nothing_is_written(pool, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    folder = write_colour_hpd(tmp_path / "hpd", n_train=3, n_test=0)
    records = json.loads((folder / "preference_train.json").read_text())
    records[2]["human_preference"] = 7
    (folder / "preference_train.json").write_text(json.dumps(records))
    with pytest.raises(
        DatasetError,
        match=re.escape(
            "preference_train.json record 3: 'human_preference' 7 is not an index of its 4 images"
        ),
    ):
        await _import(pool, folder, tmp_path / "store")
    records[2]["human_preference"] = 0
    (folder / records[1]["file_path"][0]).write_bytes(b"truncated")
    (folder / "preference_train.json").write_text(json.dumps(records))
    with pytest.raises(DatasetError, match=re.escape("1001_0.jpg is not a readable image")):
        await _import(pool, folder, tmp_path / "store")
    assert await pool.fetchval("SELECT count(*) FROM rounds") == 0
    assert not (tmp_path / "store").exists()
    with pytest.raises(DatasetError, match=re.escape("holds neither preference_train.json")):
        await _import(pool, tmp_path, tmp_path / "store")


async def _choices_of_everyone(pool: Any) -> dict[str, int]:
    """Rounds with every kind of chooser; returns round ids by name."""
    rounds = {
        "picked": await ready_round(pool, requester=1, prompt="a red cube", k=3),
        "tied": await ready_round(pool, requester=2, prompt="a blue ball", k=3),
        "none": await ready_round(pool, requester=3, prompt="a green car", k=2),
        "flagged": await ready_round(pool, requester=4, prompt="a black cat", k=2),
        "banned": await ready_round(pool, requester=5, prompt="a white dog", k=2),
        "forgotten": await ready_round(pool, requester=6, prompt="an orange hat", k=2),
    }
    await record_choice(
        pool, round_id=rounds["picked"], discord_user_id=1, verdict="pick", position=2
    )
    await record_choice(pool, round_id=rounds["picked"], discord_user_id=8, verdict="tie")
    await record_choice(pool, round_id=rounds["tied"], discord_user_id=2, verdict="tie")
    await record_choice(pool, round_id=rounds["none"], discord_user_id=3, verdict="none")
    await users.ban(pool, 4, shadow=True, reason="spam", actor="mod")
    await record_choice(
        pool, round_id=rounds["flagged"], discord_user_id=4, verdict="pick", position=1
    )
    await record_choice(
        pool, round_id=rounds["banned"], discord_user_id=5, verdict="pick", position=1
    )
    await record_choice(
        pool, round_id=rounds["picked"], discord_user_id=5, verdict="pick", position=1
    )
    await users.ban(pool, 5, reason="abuse", actor="mod")
    await record_choice(
        pool, round_id=rounds["forgotten"], discord_user_id=6, verdict="pick", position=1
    )
    await record_choice(
        pool, round_id=rounds["tied"], discord_user_id=6, verdict="pick", position=3
    )
    await users.forget_user(pool, 6)
    return rounds


async def test_parquet_export_has_one_row_per_choice_and_no_excluded_user(
    pool, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    rounds = await _choices_of_everyone(pool)
    report = await _export(pool, tmp_path / "requester", "parquet", tmp_path / "store")
    table = pq.read_table(tmp_path / "requester" / "choices.parquet").to_pylist()
    assert report.rows == 3 and [r["round_id"] for r in table] == [
        rounds["picked"], rounds["tied"], rounds["none"]
    ]  # fmt: skip
    picked, tied, none = table
    assert (picked["verdict"], picked["chosen_position"], picked["chosen_index"]) == ("pick", 2, 1)
    assert picked["image_keys"][1].endswith(".png") and len(picked["image_keys"]) == 3
    assert picked["positions"] == [1, 2, 3] and picked["seeds"] == [1001, 1002, 1003]
    assert picked["model_versions"] == [None, None, None] and picked["params"] == "{}"
    assert picked["user_id"] == picked["requester"] and len(picked["user_id"]) == 32
    assert (tied["verdict"], tied["chosen_index"]) == ("tie", None)
    assert none["verdict"] == "none" and picked["split"] in ("train", "val", "test")
    assert picked["created_at"].tzinfo is not None

    everyone = await _export(
        pool, tmp_path / "all", "parquet", tmp_path / "store", all_choosers=True
    )
    rows = pq.read_table(tmp_path / "all" / "choices.parquet").to_pylist()
    assert everyone.rows == 4  # + user 8's tie; never users 4 (shadow), 5 (banned), 6 (forgotten)
    assert sorted((r["round_id"], r["verdict"]) for r in rows) == sorted(
        [(rounds["picked"], "pick"), (rounds["picked"], "tie"), (rounds["tied"], "tie"),
         (rounds["none"], "none")]
    )  # fmt: skip
    discord_ids = {str(i) for i in range(1, 10)}
    assert not discord_ids & {r["user_id"] for r in rows}
    with pytest.raises(DatasetError, match="exists and is not an empty folder"):
        await _export(pool, tmp_path / "all", "parquet", tmp_path / "store")


async def test_pickapic_pairs_label_picks_and_ties(pool, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rounds = await _choices_of_everyone(pool)
    report = await _export(
        pool, tmp_path / "pairs", "pickapic", tmp_path / "store", all_choosers=True
    )
    pairs = pq.read_table(tmp_path / "pairs" / "pairs.parquet").to_pylist()
    # The pick among 3: 2 pairs; user 8's tie among 3: 3 pairs; the requester's tie: 3 pairs.
    assert report.rows == len(pairs) == 8 and report.choices == 3
    pick = [p for p in pairs if p["round_id"] == rounds["picked"] and p["best_image_uid"]]
    assert [(p["label_0"], p["label_1"]) for p in pick] == [(0.0, 1.0), (1.0, 0.0)]
    chosen = pick[0]["best_image_uid"]
    assert all(chosen in (p["image_0_uid"], p["image_1_uid"]) for p in pick)
    ties = [p for p in pairs if p["best_image_uid"] is None]
    assert len(ties) == 6 and {(p["label_0"], p["label_1"]) for p in ties} == {(0.5, 0.5)}
    assert {p["caption"] for p in pairs} == {"a red cube", "a blue ball"}
    assert set(pq.read_schema(tmp_path / "pairs" / "pairs.parquet").names) >= {
        "caption", "image_0_uid", "image_1_uid", "label_0", "label_1", "model_0", "model_1",
        "user_id", "ranking_id",
    }  # fmt: skip


async def test_hf_export_loads_with_datasets_and_its_images_decode(
    pool, tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    import io

    from datasets import load_dataset
    from PIL import Image as PILImage

    from db import rounds as db_rounds

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    store = LocalImageStore(tmp_path / "store")
    colours = ["red", "green", "blue"]
    made = {}
    for requester, prompt in ((1, "a red cube"), (2, "a green cube"), (5, "a banned cube")):
        created = await db_rounds.create_round(
            pool, requester_discord_id=requester, prompt=prompt, k=3
        )
        await db_rounds.start_generating(pool, created.round.id)
        images = []
        for position, colour in enumerate(colours, start=1):
            buffer = io.BytesIO()
            PILImage.new("RGB", (8 * position, 8), colour).save(buffer, format="PNG")
            blob = store.put(buffer.getvalue())
            images.append(NewImage(position, blob.sha256, blob.key, seed=position))
        await db_rounds.finish_round(pool, created.round.id, images)
        made[requester] = created.round.id
    await record_choice(pool, round_id=made[1], discord_user_id=1, verdict="pick", position=3)
    await record_choice(pool, round_id=made[2], discord_user_id=2, verdict="tie")
    await record_choice(pool, round_id=made[5], discord_user_id=5, verdict="pick", position=1)
    await users.ban(pool, 5, reason="abuse", actor="mod")

    report = await _export(pool, tmp_path / "hf-out", "hf", tmp_path / "store")

    assert report.rows == 2 and (tmp_path / "hf-out" / "README.md").is_file()
    loaded = load_dataset(str(tmp_path / "hf-out"))
    rows = sorted((row for split in loaded.values() for row in split), key=lambda r: r["round_id"])
    assert [r["round_id"] for r in rows] == [made[1], made[2]]  # the banned user's is out
    picked, tied = rows
    assert (picked["verdict"], picked["chosen_index"]) == ("pick", 2)
    assert (tied["verdict"], tied["chosen_index"]) == ("tie", None)
    assert [image.size for image in picked["images"]] == [(8, 8), (16, 8), (24, 8)]
    assert picked["images"][2].getpixel((0, 0)) == (0, 0, 255)  # the chosen blue image
    assert picked["seeds"] == [1, 2, 3] and len(picked["user_id"]) == 32
    assert set(loaded) <= {"train", "validation", "test"}
