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
from tests.colour_task import write_colour_hpd
from tests.factories import ready_round, stored_round

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
    records[0]["file_path"] = records[0]["file_path"][:1]
    (folder / "preference_train.json").write_text(json.dumps(records))
    with pytest.raises(DatasetError) as refused:
        await _import(pool, folder, tmp_path / "store")
    # Every bad record is named, by its number and its id, with what is wrong with it.
    assert str(refused.value) == (
        f"{folder}: 2 bad record(s), nothing imported:\n"
        "- preference_train.json record 1 (id 1000): 'file_path' lists 1 image(s); a round "
        "shows 2 to 16\n"
        "- preference_train.json record 3 (id 1002): 'human_preference' 7 is not an index of "
        "its 4 images"
    )
    records[0]["file_path"] = [f"preference_images/1000_{j}.jpg" for j in range(4)]
    records[2]["human_preference"] = 0
    (folder / records[1]["file_path"][0]).write_bytes(b"truncated")
    (folder / "preference_train.json").write_text(json.dumps(records))
    with pytest.raises(DatasetError, match=re.escape("1001_0.jpg is not a readable image")):
        await _import(pool, folder, tmp_path / "store")
    assert await pool.fetchval("SELECT count(*) FROM rounds") == 0
    assert not (tmp_path / "store").exists()
    with pytest.raises(DatasetError, match=re.escape("holds neither preference_train.json")):
        await _import(pool, tmp_path, tmp_path / "store")


async def _choices_of_everyone(pool: Any, store: LocalImageStore | None = None) -> dict[str, int]:
    """Rounds with every kind of chooser (their image files in `store` if given); returns
    round ids by name."""

    async def made(requester: int, prompt: str, k: int) -> int:
        if store is None:
            return await ready_round(pool, requester=requester, prompt=prompt, k=k)
        return await stored_round(pool, store, requester=requester, prompt=prompt, k=k)

    rounds = {
        "picked": await made(1, "a red cube", 3),
        "tied": await made(2, "a blue ball", 3),
        "none": await made(3, "a green car", 2),
        "flagged": await made(4, "a black cat", 2),
        "banned": await made(5, "a white dog", 2),
        "forgotten": await made(6, "an orange hat", 2),
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


def _pairs(out: Path) -> list[dict[str, Any]]:
    """Every pair of a pickapic export's train, validation and test files."""
    files = sorted((out / "data").glob("*.parquet"))
    files = [f for f in files if "_unique" not in f.name]
    return [row for f in files for row in pq.read_table(f).to_pylist()]


async def test_pairs_label_picks_and_ties_and_weigh_each_choice_alike(pool, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store = LocalImageStore(tmp_path / "store")
    rounds = await _choices_of_everyone(pool, store)
    report = await _export(
        pool, tmp_path / "pairs", "pickapic", tmp_path / "store", all_choosers=True, ties="half"
    )
    pairs = _pairs(tmp_path / "pairs")
    # The pick among 3: 2 pairs; user 8's tie among 3: 3 pairs; the requester's tie: 3 pairs.
    assert report.rows == len(pairs) == 8 and report.choices == 3
    pick = [p for p in pairs if p["round_id"] == rounds["picked"] and p["best_image_uid"]]
    assert [(p["label_0"], p["label_1"]) for p in pick] == [(0.0, 1.0), (1.0, 0.0)]
    chosen = pick[0]["best_image_uid"]
    assert all(chosen in (p["image_0_uid"], p["image_1_uid"]) for p in pick)
    ties = [p for p in pairs if p["best_image_uid"] is None]
    assert len(ties) == 6 and {(p["label_0"], p["label_1"]) for p in ties} == {(0.5, 0.5)}
    assert {p["caption"] for p in pairs} == {"a red cube", "a blue ball"}
    # Each choice weighs 1 in all, each pair has its own ranking id, and PickScore's
    # denominator is (choices of the prompt) x (pairs of the choice).
    by_choice: dict[int, list[dict[str, Any]]] = {}
    for p in pairs:
        by_choice.setdefault(p["choice_id"], []).append(p)
    assert sorted(sum(p["weight"] for p in ps) for ps in by_choice.values()) == [1.0] * 3
    assert len({p["ranking_id"] for p in pairs}) == 8
    assert all(p["ranking_id"] // 128 == p["choice_id"] for p in pairs)
    red = {
        p["choice_id"]: p["num_example_per_prompt"] for p in pairs if p["caption"] == "a red cube"
    }
    assert sorted(red.values()) == [2 * 2, 2 * 3]  # 2 choices: a pick (2 pairs), a tie (3)
    assert {p["model_0"] for p in pairs} == {"unknown"}
    stored = {p["image_0_uid"]: p["jpg_0"] for p in pairs}
    assert all(store.get(key) == data for key, data in stored.items())

    dropped = await _export(pool, tmp_path / "drop", "pickapic", tmp_path / "store",
                            all_choosers=True)  # fmt: skip
    assert dropped.rows == 2 and dropped.choices == 1  # ties are left out by default
    assert {(p["label_0"], p["num_example_per_prompt"]) for p in _pairs(tmp_path / "drop")} == {
        (0.0, 2), (1.0, 2)
    }  # fmt: skip


async def test_hf_export_loads_with_datasets_and_its_images_decode(
    pool, tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    import io

    from datasets import load_dataset, load_from_disk
    from PIL import Image as PILImage

    from db import rounds as db_rounds

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
    assert sum(report.splits.values()) == 2
    for loaded in (
        load_dataset(str(tmp_path / "hf-out"), cache_dir=str(tmp_path / "hf")),
        load_from_disk(str(tmp_path / "hf-out")),  # PickScore's `from_disk`
    ):
        assert {s: len(rows) for s, rows in loaded.items()} == report.splits
        rows = sorted((row for split in loaded.values() for row in split),
                      key=lambda r: r["round_id"])  # fmt: skip
        assert [r["round_id"] for r in rows] == [made[1], made[2]]  # the banned user's is out
        picked, tied = rows
        assert (picked["verdict"], picked["chosen_index"], picked["chosen_position"]) == (
            "pick", 2, 3
        )  # fmt: skip
        assert (tied["verdict"], tied["chosen_index"], tied["chosen_position"]) == (
            "tie",
            None,
            None,
        )
        assert [image.size for image in picked["images"]] == [(8, 8), (16, 8), (24, 8)]
        assert picked["images"][2].getpixel((0, 0)) == (0, 0, 255)  # the chosen blue image
        assert picked["seeds"] == [1, 2, 3] and len(picked["user_id"]) == 32
        assert picked["positions"] == [1, 2, 3] and picked["is_requester"]
        assert picked["requester"] == picked["user_id"] and picked["contains_name"] is False
        assert picked["round_created_at"] <= picked["created_at"] <= picked["updated_at"]
        assert picked["created_at"].tzinfo is not None and picked["source"] == "discord"


async def test_another_dataset_reusing_the_ids_is_imported_and_reimports_add_nothing(
    pool, other_pool, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    # Two different datasets numbering their records alike (ids 1000..1005 in both).
    first = write_colour_hpd(tmp_path / "first", n_train=4, n_test=2, seed=0)
    second = write_colour_hpd(tmp_path / "second", n_train=4, n_test=2, seed=1)
    store = tmp_path / "store"
    assert (await _import(pool, first, store)).imported == 6
    reused = await _import(pool, second, store)
    assert (reused.imported, reused.skipped) == (6, 0)  # not taken for the first one
    for folder in (first, second):
        again = await _import(pool, folder, store)
        assert (again.imported, again.skipped) == (0, 6)
    assert await pool.fetchval("SELECT count(*) FROM rounds") == 12

    # Our export of both holds 12 records with distinct ids; importing it from its new
    # folder into the same database adds nothing, into another one adds everything.
    exported = await _export(pool, tmp_path / "out", "hpd", store)
    assert exported.rows == 12
    records = [r for rs in _records(tmp_path / "out").values() for r in rs]
    assert len({r["id"] for r in records}) == 12
    assert {r["id"] for r in records} & set(range(1000, 1006)) == set(range(1000, 1006))
    back = await _import(pool, tmp_path / "out", store)
    assert (back.imported, back.skipped) == (0, 12)
    assert (await _import(other_pool, tmp_path / "out", tmp_path / "store2")).imported == 12


async def test_import_keys_of_earlier_imports_are_computed_by_migration_0008(
    pool, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    import importlib.util

    path = Path(__file__).parents[2] / "db" / "migrations" / "versions" / "0008_datasets.py"
    spec = importlib.util.spec_from_file_location("migration_0008", path)
    assert spec is not None and spec.loader is not None
    migration = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(migration)

    folder = write_colour_hpd(tmp_path / "hpd", n_train=3, n_test=1, k=(2, 3))
    await _import(pool, folder, tmp_path / "store")
    keys = "SELECT id, import_key FROM rounds ORDER BY id"
    computed = [tuple(r) for r in await pool.fetch(keys)]
    assert len(computed) == 4 and all(key for _, key in computed)
    await pool.execute("UPDATE rounds SET import_key = NULL")  # as before the migration
    await pool.execute(migration.BACKFILL_SQL)
    assert [tuple(r) for r in await pool.fetch(keys)] == computed


async def test_prompt_spellings_round_trip_and_any_import_flags_a_name(
    pool, other_pool, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from pipeline.data import examples_from_db

    folder = write_colour_hpd(tmp_path / "hpd", n_train=3, n_test=0)
    records = json.loads((folder / "preference_train.json").read_text())
    # Three spellings of one prompt (alike once normalised); only the last names someone.
    spellings = ["a red cube", "A  Red Cube", "ａ red CUBE "]
    for record, spelling in zip(records, spellings, strict=True):
        record["prompt"] = spelling
    records[2]["contain_name"] = True
    (folder / "preference_train.json").write_text(json.dumps(records))
    await _import(pool, folder, tmp_path / "store")

    assert await pool.fetchval("SELECT count(*) FROM prompts") == 1
    assert await pool.fetchval("SELECT contains_name FROM prompts")
    assert await examples_from_db(pool) == []  # a prompt naming someone is not trained on
    named = await examples_from_db(pool, include_contains_name=True)
    assert sorted(e.prompt for e in named) == sorted(spellings)
    await _export(pool, tmp_path / "out", "hpd", tmp_path / "store")
    exported = _records(tmp_path / "out")["train"]
    assert [r["prompt"] for r in exported] == spellings
    assert [r["contain_name"] for r in exported] == [True, True, True]
    await _import(other_pool, tmp_path / "out", tmp_path / "store2")
    assert await _snapshot(other_pool) == await _snapshot(pool)

    # A later import of records already there still flags their prompt.
    unflagged = write_colour_hpd(tmp_path / "plain", n_train=2, n_test=0, seed=5)
    await _import(other_pool, unflagged, tmp_path / "store2")
    flag = "SELECT contains_name FROM prompts WHERE text = $1"
    prompt = json.loads((unflagged / "preference_train.json").read_text())[0]["prompt"]
    assert await other_pool.fetchval(flag, prompt) is False
    flagged = json.loads((unflagged / "preference_train.json").read_text())
    flagged[0]["contain_name"] = True
    (unflagged / "preference_train.json").write_text(json.dumps(flagged))
    again = await _import(other_pool, unflagged, tmp_path / "store2")
    assert (again.imported, again.skipped) == (0, 2)
    assert await other_pool.fetchval(flag, prompt) is True


async def test_export_splits_keep_each_prompt_on_one_side_as_training_does(
    pool, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from db.prompts import prompt_hash
    from pipeline.data import assign_split, examples_from_db

    def placed(prompt: str) -> str:
        return assign_split(prompt_hash(prompt), None, val_fraction=0.1, test_fraction=0.1)

    candidates = [f"a red cube number {i}" for i in range(200)]
    hashed_train = next(p for p in candidates if placed(p) == "train")
    hashed_test = next(p for p in candidates if placed(p) == "test")
    # An imported test record of a prompt the hash puts in train, and an imported train
    # record of a prompt the hash puts in test; each prompt also has a live /dream round.
    folder = write_colour_hpd(tmp_path / "hpd", n_train=1, n_test=1, k=2)
    files = {}
    for split, prompt in (("test", hashed_train), ("train", hashed_test)):
        path = folder / f"preference_{split}.json"
        records = json.loads(path.read_text())
        records[0]["prompt"] = prompt
        path.write_text(json.dumps(records))
        files[prompt] = split
    await _import(pool, folder, tmp_path / "store")
    live = {}
    for requester, prompt in enumerate((hashed_train, hashed_test), start=1):
        live[prompt] = await ready_round(pool, requester=requester, prompt=prompt, k=2)
        await record_choice(
            pool, round_id=live[prompt], discord_user_id=requester, verdict="pick", position=1
        )

    await _export(pool, tmp_path / "out", "parquet", tmp_path / "store")
    rows = pq.read_table(tmp_path / "out" / "choices.parquet").to_pylist()
    assert len(rows) == 4 and {r["split"] for r in rows} == {"test"}
    training = {e.key: e.split for e in await examples_from_db(pool)}
    assert training == {f"choice:{r['choice_id']}": r["split"] for r in rows}


async def test_a_text_is_one_prompt_on_one_side_whatever_its_negative_prompts(
    pool, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """The classifier and the exports see the text only: one text with no negative prompt
    and with two others is one prompt (one group, one split) for training, the exports and
    the DPO pairs. By the old key, (text, negative), "blurry" put it in test and "" in
    train: the same caption on both sides."""
    from db.prompts import prompt_hash, text_hash
    from hps.settings import AdaptSettings
    from pipeline.adapt.pairs import pairs_from_db
    from pipeline.data import assign_split, examples_from_db

    text = "a red castle at night"
    fractions = {"val_fraction": 0.1, "test_fraction": 0.1}
    old = {n: assign_split(prompt_hash(text, n), None, **fractions) for n in ("", "blurry")}
    assert old == {"": "train", "blurry": "test"}  # what the old key did with this text
    store = tmp_path / "store"
    for requester, negative in enumerate(("", "blurry", "grainy"), start=1):
        round_id = await stored_round(pool, LocalImageStore(store), requester=requester,
                                      prompt=text, k=2, negative_prompt=negative)  # fmt: skip
        await record_choice(pool, round_id=round_id, discord_user_id=requester, verdict="pick",
                            position=1)  # fmt: skip
    assert await pool.fetchval("SELECT count(DISTINCT id) FROM prompts") == 3
    examples = await examples_from_db(pool, **fractions)
    assert len(examples) == 3
    assert {(e.group, e.split) for e in examples} == {(text_hash(text), "train")}
    await _export(pool, tmp_path / "out", "parquet", store)
    rows = pq.read_table(tmp_path / "out" / "choices.parquet").to_pylist()
    assert [r["split"] for r in rows] == ["train"] * 3
    await _export(pool, tmp_path / "pickapic", "pickapic", store)
    train = pq.read_table(next((tmp_path / "pickapic" / "data").glob("train-*.parquet")))
    assert train.column("num_example_per_prompt").to_pylist() == [3] * 3  # one prompt
    found = await pairs_from_db(pool, AdaptSettings(), held_out=lambda t: False, **fractions)
    assert [p.side for p in found.pairs] == ["train"] * 3


def test_a_chosen_image_that_was_not_shown_is_a_clear_error() -> None:
    from pipeline.datasets import _choice_tables

    row = {
        "choice_id": 7, "round_id": 3, "source": "discord", "external_id": None,
        "split": None, "prompt": "a red cube", "negative_prompt": "", "text_hash": "h",
        "prompt_tested": False, "prompt_undeclared": True, "contains_name": False,
        "user_id": "u", "requester": "u", "is_requester": True, "verdict": "pick",
        "chosen_position": 2, "positions": [1, 3], "image_keys": ["a.png", "c.png"],
        "models": [None, None], "seeds": [1, 3], "params": "{}", "round_created_at": None,
        "created_at": None, "updated_at": None,
    }  # fmt: skip
    with pytest.raises(
        DatasetError,
        match=re.escape(
            "choice 7 (round 3): the chosen image (position 2) is not among the images shown "
            "(positions 1, 3)"
        ),
    ):
        _choice_tables([row], {"val_fraction": 0.1, "test_fraction": 0.1})


async def test_pickapic_with_images_reads_each_image_once_in_bounded_tables(
    pool, tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    import pipeline.datasets as datasets

    folder = write_colour_hpd(tmp_path / "hpd", n_train=3, n_test=0, k=4)
    await _import(pool, folder, tmp_path / "store")
    reads: list[str] = []
    original = LocalImageStore.get

    def counting_get(self: LocalImageStore, key: str) -> bytes:
        reads.append(key)
        return original(self, key)

    monkeypatch.setattr(LocalImageStore, "get", counting_get)
    monkeypatch.setattr(datasets, "IMAGE_PAIRS_PER_TABLE", 4)
    report = await _export(pool, tmp_path / "pairs", "pickapic", tmp_path / "store")
    assert report.rows == 9  # 3 picks among 4 images: 3 pairs each
    assert len(reads) == len(set(reads)) == 12  # each image read once
    files = [pq.ParquetFile(f) for f in (tmp_path / "pairs" / "data").glob("*.parquet")]
    groups = [f.metadata.row_group(i).num_rows for f in files for i in range(f.num_row_groups)]
    assert max(groups) <= 4
    pairs = _pairs(tmp_path / "pairs")
    stored = LocalImageStore(tmp_path / "store")
    assert len(pairs) == 9
    assert all(p["jpg_0"] == original(stored, p["image_0_uid"]) for p in pairs)


REFUSED = {
    ("hpd", "all"): "--format hpd holds the requesters' picks only: an HPD record is the pick "
    "of the person who asked for the images (and importing it makes them its requester); use "
    "--format parquet, hf or pickapic for everyone's choices",
    ("hpd", "ties"): "--ties applies to --format pickapic (pairs) only: HPD records name one "
    "preferred image, so ties are never in them",
    ("parquet", "ties"): "--ties applies to --format pickapic (pairs) only: --format parquet "
    "keeps every verdict as it is (ties as verdict 'tie')",
    ("hf", "ties"): "--ties applies to --format pickapic (pairs) only: --format hf keeps every "
    "verdict as it is (ties as verdict 'tie')",
}


async def test_every_option_of_every_format_is_honoured_or_refused(pool, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Each format x --choosers x --images x --ties: the export does what the options say,
    or refuses with a message and writes nothing."""
    store = LocalImageStore(tmp_path / "store")
    await _choices_of_everyone(pool, store)
    for fmt in ("hpd", "parquet", "pickapic", "hf"):
        for choosers in ("requester", "all"):
            for images in (False, True):
                for ties in (None, "drop", "half"):
                    out = tmp_path / f"{fmt}-{choosers}-{images}-{ties}"
                    refusal = REFUSED.get((fmt, "all")) if choosers == "all" else None
                    if ties is not None and fmt != "pickapic":
                        refusal = refusal or REFUSED[(fmt, "ties")]
                    kwargs = {"all_choosers": choosers == "all", "with_images": images}
                    if refusal:
                        with pytest.raises(DatasetError) as refused:
                            await _export(pool, out, fmt, tmp_path / "store", ties=ties, **kwargs)
                        assert str(refused.value) == refusal
                        assert not out.exists()
                        continue
                    report = await _export(pool, out, fmt, tmp_path / "store", ties=ties, **kwargs)
                    everyone = choosers == "all"
                    if fmt == "hpd":  # the requesters' picks, with their image files
                        assert (report.rows, len(list((out / "preference_images").iterdir()))) == (
                            1,
                            3,
                        )
                    elif fmt in ("parquet", "hf"):  # every verdict; + user 8's tie on "picked"
                        assert report.rows == (4 if everyone else 3)
                    elif ties == "half":  # pick: 2 pairs; the ties among 3: 3 pairs each
                        assert report.rows == (8 if everyone else 5)
                    else:  # ties dropped (the default)
                        assert report.rows == 2
                    keys = [p.relative_to(out / "images").as_posix()
                            for p in (out / "images").rglob("*.png")]  # fmt: skip
                    if fmt == "parquet" and images:  # the image files beside it
                        table = pq.read_table(out / "choices.parquet").to_pylist()
                        wanted = {k for row in table for k in row["image_keys"]}
                        assert sorted(keys) == sorted(wanted) and len(keys) == 3 + 3 + 2
                        assert all((out / "images" / k).read_bytes() == store.get(k) for k in keys)
                    else:
                        assert keys == []
                    assert not (out / ".partial").exists()


async def test_a_failed_export_leaves_its_folder_empty(pool, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store = LocalImageStore(tmp_path / "store")
    rounds = await _choices_of_everyone(pool, store)
    key = await pool.fetchval(
        "SELECT storage_key FROM images WHERE round_id = $1 AND position = 2", rounds["picked"]
    )
    store.delete(key)
    for fmt in ("hpd", "parquet", "pickapic", "hf"):
        out = tmp_path / fmt
        with pytest.raises(DatasetError) as failed:
            await _export(pool, out, fmt, tmp_path / "store", with_images=fmt == "parquet",
                          ties="half" if fmt == "pickapic" else None)  # fmt: skip
        assert (
            str(failed.value)
            == f"image {key} of round {rounds['picked']} is not in the image store"
        )
        assert list(out.iterdir()) == []


def test_the_cli_refuses_an_option_the_format_cannot_honour(tmp_path: Path) -> None:
    from tests.test_cli import hps

    env = {"HPS_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}  # never reached
    refused = hps("export", str(tmp_path / "out"), "--format", "hpd", "--choosers", "all", env=env)
    assert refused.returncode != 0 and not (tmp_path / "out").exists()
    assert "--format hpd holds the requesters' picks only" in refused.stderr
