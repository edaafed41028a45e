"""Exports read by the code they exist for, as that code reads them (`tests/pipeline/
peer_readers.py`: PickScore's dataset and loss weights, Diffusion-DPO's train.py, HPSv2's HPD
reader) and by `datasets` (this version's `load_dataset` and `load_from_disk`, and the
feature types datasets 2.x and 3.x know)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from db import users
from db.choices import record_choice
from db.prompts import prompt_hash
from hps.store import LocalImageStore
from pipeline.data import assign_split
from pipeline.dataset_folder import FEATURE_TYPES
from pipeline.datasets import HF_SPLITS, PAIR_SPLITS, export_dataset
from tests.factories import stored_round
from tests.pipeline import peer_readers

RESOLUTION = 16


def _prompts(n_per_split: dict[str, int]) -> dict[str, list[str]]:
    """Prompts the hash places in each split (at the default 10 % / 10 %)."""
    found: dict[str, list[str]] = {split: [] for split in n_per_split}
    for i in range(1000):
        prompt = f"a cube number {i}"
        split = assign_split(prompt_hash(prompt), None, val_fraction=0.1, test_fraction=0.1)
        if len(found[split]) < n_per_split[split]:
            found[split].append(prompt)
    return found


async def _choices(pool: Any, store: LocalImageStore) -> dict[str, Any]:
    """Choices over prompts of every split: returns the prompts and round ids by name."""
    prompts = _prompts({"train": 2, "val": 1, "test": 1})
    a, b = prompts["train"]
    (c,), (d,) = prompts["val"], prompts["test"]
    plan = {  # name: (requester, prompt, K, verdict, position)
        "a3": (1, a, 3, "pick", 2),
        "a4": (2, a, 4, "pick", 4),
        "b3": (3, b, 3, "tie", None),
        "c2": (4, c, 2, "pick", 1),
        "c3": (5, c, 3, "pick", 3),
        "d3": (6, d, 3, "pick", 1),
        "a2": (7, a, 2, "none", None),
        "banned": (10, a, 3, "pick", 1),
    }
    rounds = {}
    for name, (requester, prompt, k, verdict, position) in plan.items():
        rounds[name] = await stored_round(pool, store, requester=requester, prompt=prompt, k=k)
        await record_choice(
            pool,
            round_id=rounds[name],
            discord_user_id=requester,
            verdict=verdict,
            position=position,
        )
    await record_choice(pool, round_id=rounds["a3"], discord_user_id=9, verdict="pick", position=1)
    await users.ban(pool, 10, reason="abuse", actor="mod")
    return {"prompts": {"a": a, "b": b, "c": c, "d": d}, "rounds": rounds}


async def _export(pool: Any, out: Path, fmt: str, store: Path, **kwargs: Any) -> Any:
    async with pool.acquire() as conn:
        return await export_dataset(
            conn, LocalImageStore(store), out, fmt, progress=False, **kwargs
        )


@pytest.fixture(scope="module")
def processor(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A CLIP processor as PickScore's `AutoProcessor` gives (CLIP's tokenizer, 77 tokens;
    small images to keep the test fast)."""
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    from pipeline.tiny_models import write_clip_tokenizer_files

    folder = write_clip_tokenizer_files(tmp_path_factory.mktemp("tokenizer"))
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)
    images = CLIPImageProcessor(
        size={"shortest_edge": RESOLUTION}, crop_size={"height": RESOLUTION, "width": RESOLUTION}
    )
    return CLIPProcessor(image_processor=images, tokenizer=tokenizer)


def _dpo_transform(data: bytes) -> torch.Tensor:
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize(RESOLUTION, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(RESOLUTION),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ]
    )(Image.open(io.BytesIO(data)).convert("RGB"))


async def test_pairs_load_in_pickscore_as_pick_a_pic_does(pool, tmp_path: Path, processor) -> None:  # type: ignore[no-untyped-def]
    from datasets import load_dataset, load_from_disk

    store = LocalImageStore(tmp_path / "store")
    made = await _choices(pool, store)
    out = tmp_path / "pairs"
    report = await _export(pool, out, "pickapic", tmp_path / "store")
    # Requesters' picks only (ties dropped by default): a3 2 pairs, a4 3, c2 1, c3 2, d3 2.
    expected = {"train": 5, "validation": 3, "test": 2, "validation_unique": 1, "test_unique": 1}
    assert report.splits == expected and report.rows == 10
    cache = str(tmp_path / "hf")
    for loaded in (load_dataset(str(out), cache_dir=cache), load_from_disk(str(out))):
        assert {split: len(rows) for split, rows in loaded.items()} == expected
        captions = {split: set(loaded[split]["caption"]) for split in loaded}
        prompts = made["prompts"]
        assert captions["train"] == {prompts["a"]}  # b only tied; c, d elsewhere
        assert captions["validation"] == captions["validation_unique"] == {prompts["c"]}
        assert captions["test"] == captions["test_unique"] == {prompts["d"]}
        assert {label for split in loaded for label in loaded[split]["label_0"]} == {0.0, 1.0}

    def dataset(split: str, **options: Any) -> peer_readers.PickScoreDataset:
        cfg = peer_readers.PickScoreConfig(
            dataset_name=str(out), dataset_config_name=None, cache_dir=cache, **options
        )
        return peer_readers.PickScoreDataset(cfg, processor, split)

    train = dataset("train")
    batch = next(
        iter(torch.utils.data.DataLoader(train, batch_size=5, collate_fn=train.collate_fn))
    )
    assert batch["input_ids"].shape == (5, 77)
    assert batch["pixel_values_0"].shape == batch["pixel_values_1"].shape == (5, 3, 16, 16)
    assert batch["pixel_values_0"].dtype == torch.float32
    assert batch["label_0"].dtype == torch.float32  # torch.tensor of the float64 column
    assert torch.equal(batch["label_0"] + batch["label_1"], torch.ones(5))
    # PickScore's loss weighs example i by 1/num_example_per_prompt[i] (normalised): each of
    # the prompt's two choices (a pick among 3: 2 pairs, among 4: 3 pairs) weighs the same.
    weights = peer_readers.pickscore_example_weights(batch["num_example_per_prompt"])
    per_choice: dict[int, float] = defaultdict(float)
    for choice_id, weight in zip(train.dataset["choice_id"], weights.tolist(), strict=True):
        per_choice[choice_id] += weight
    assert sorted(round(w, 6) for w in per_choice.values()) == [0.5, 0.5]  # float32
    # The preferred image is the one chosen.
    for row in train.dataset:
        preferred = row["jpg_0"] if row["label_0"] == 1.0 else row["jpg_1"]
        assert preferred == store.get(row["best_image_uid"])

    # Its evaluation splits (validation_unique, test_unique), from_disk, and the per-prompt
    # limit (which drops `__index_level_0__`).
    assert len(dataset("validation_unique")) == len(dataset("test_unique")) == 1
    assert len(dataset("train", from_disk=True)) == 5
    assert len(dataset("train", limit_examples_per_prompt=1)) == 1


async def test_pairs_train_diffusion_dpo_on_the_chosen_image_and_no_test_prompt(
    pool, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    store = LocalImageStore(tmp_path / "store")
    made = await _choices(pool, store)
    out = tmp_path / "export"  # a --dataset_name without "pickapic" in it
    assert "pickapic" not in str(out)
    await _export(pool, out, "pickapic", tmp_path / "store")
    cache = str(tmp_path / "hf")
    batches = peer_readers.diffusion_dpo_batches(str(out), resolution=RESOLUTION, cache_dir=cache)
    rows = pq.read_table(out / "data" / "train-00000-of-00001.parquet").to_pylist()
    assert len(batches) == len(rows) == 5
    assert {b["caption"][0] for b in batches} == {made["prompts"]["a"]}  # train: no test prompt
    for batch, row in zip(batches, rows, strict=True):
        chosen = store.get(row["best_image_uid"])
        other = row["jpg_1"] if row["image_0_uid"] == row["best_image_uid"] else row["jpg_0"]
        assert torch.equal(batch["pixel_values"][0, :3], _dpo_transform(chosen))
        assert torch.equal(batch["pixel_values"][0, 3:], _dpo_transform(other))

    # Why ties are dropped by default: with --ties half, Diffusion-DPO drops the 0.5/0.5 rows
    # only if "pickapic" is in its --dataset_name; elsewhere it trains a tie as image 0
    # preferred.
    half = tmp_path / "half"
    await _export(pool, half, "pickapic", tmp_path / "store", ties="half")
    with_ties = peer_readers.diffusion_dpo_batches(
        str(half), resolution=RESOLUTION, cache_dir=cache
    )
    assert len(with_ties) == 5 + 3  # + the tie among 3 images of prompt b: 3 pairs
    named = tmp_path / "pickapic_half"
    named.symlink_to(half)
    assert len(peer_readers.diffusion_dpo_batches(str(named), resolution=RESOLUTION,
                                                  cache_dir=cache)) == 5  # fmt: skip


async def test_hpd_export_loads_in_hpsv2s_reader(pool, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import open_clip
    from torchvision import transforms

    store = LocalImageStore(tmp_path / "store")
    made = await _choices(pool, store)
    out = tmp_path / "hpd"
    assert (await _export(pool, out, "hpd", tmp_path / "store")).rows == 5
    to_tensor = transforms.Compose([transforms.Resize((16, 16)), transforms.ToTensor()])
    labels, shown = [], []
    for name in ("preference_train.json", "preference_test.json"):
        dataset = peer_readers.HPDDataset(str(out / name), str(out), to_tensor, open_clip.tokenize)
        items = [dataset[i] for i in range(len(dataset))]
        assert dataset.failed == []
        images, num_images, batch_labels, captions = peer_readers.collate_pref(items)
        assert images.shape == (int(num_images.sum()), 3, 16, 16)
        assert captions.shape == (len(items), 77)
        labels += batch_labels.tolist()
        shown += num_images.tolist()
    rounds = made["rounds"]
    picks = {rounds[n]: p - 1 for n, p in (("a3", 2), ("a4", 4), ("c2", 1), ("c3", 3), ("d3", 1))}
    records = [
        r
        for name in ("preference_train.json", "preference_test.json")
        for r in json.loads((out / name).read_text())
    ]
    assert sorted(labels) == sorted(picks.values())
    assert sorted(shown) == [2, 3, 3, 3, 4]
    assert sorted(r["id"] for r in records) == sorted(picks)  # record id = round id


def _types(feature: Any) -> set[str]:
    """Every `_type` in a features JSON."""
    if isinstance(feature, dict):
        found = {feature["_type"]} if isinstance(feature.get("_type"), str) else set()
        return found.union(*(_types(value) for value in feature.values()))
    return set()


async def test_datasets_folders_use_only_feature_types_datasets_2_and_3_know(
    pool, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """datasets 2.x and 3.x know no `List` (4.x does): an export whose features name it
    fails there (PickScore pins 2.10.1). Both layouts carry the features: the Parquet
    schema's metadata (`load_dataset`) and each split's dataset_info.json (`load_from_disk`);
    they must agree with the stored Arrow types."""
    from datasets import Features

    store = LocalImageStore(tmp_path / "store")
    await _choices(pool, store)
    for fmt, splits in (("pickapic", PAIR_SPLITS), ("hf", HF_SPLITS)):
        out = tmp_path / fmt
        report = await _export(pool, out, fmt, tmp_path / "store", all_choosers=True)
        assert set(report.splits) == set(splits)
        assert json.loads((out / "dataset_dict.json").read_text()) == {"splits": list(splits)}
        card = (out / "README.md").read_text()
        for split in splits:
            assert f"  - split: {split}\n    path: data/{split}-*.parquet\n" in card
            schema = pq.read_schema(out / "data" / f"{split}-00000-of-00001.parquet")
            features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
            info = json.loads((out / split / "dataset_info.json").read_text())
            assert info["features"] == features
            assert _types(features) <= set(FEATURE_TYPES)
            assert "Sequence" in _types(features) or fmt == "pickapic"
            assert Features.from_dict(features).arrow_schema.equals(schema)
        if fmt == "hf":
            assert features["images"] == {"feature": {"_type": "Image"}, "length": -1,
                                          "_type": "Sequence"}  # fmt: skip


# Python interpreters with other `datasets` versions (e.g. a venv with datasets==2.10.1 and
# one with 3.6.0), colon-separated: this test then loads the exports with each.
OLD_DATASETS = os.environ.get("OLD_DATASETS_PYTHONS", "")

LOAD_SCRIPT = """
import json, sys
import datasets
from datasets import load_dataset, load_from_disk
out, cache, config = sys.argv[1:4]
config = None if config == "-" else config
seen = {"version": datasets.__version__}
for how, loaded in (("load_dataset", load_dataset(out, config, cache_dir=cache)),
                    ("load_from_disk", load_from_disk(out))):
    seen[how] = {split: rows.num_rows for split, rows in loaded.items()}
    row = loaded["train"][0]
    seen[how + "_row"] = {k: type(v).__name__ for k, v in row.items() if k in
                          ("jpg_0", "label_0", "images", "image_keys", "created_at")}
print(json.dumps(seen))
"""


@pytest.mark.skipif(not OLD_DATASETS, reason="OLD_DATASETS_PYTHONS is not set")
async def test_exports_load_with_older_datasets_versions(pool, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store = LocalImageStore(tmp_path / "store")
    await _choices(pool, store)
    for fmt in ("pickapic", "hf"):
        out = tmp_path / fmt
        report = await _export(pool, out, fmt, tmp_path / "store")
        for python in OLD_DATASETS.split(":"):
            version = (await asyncio.to_thread(
                subprocess.run,
                [python, "-c", "import datasets; print(datasets.__version__)"],
                capture_output=True, text=True, check=True,
            )).stdout.strip()  # fmt: skip
            # PickScore's literal config name "null" works where cards' configs are unknown.
            config = "null" if version < "2.14" else "-"
            run = await asyncio.to_thread(
                subprocess.run,
                [python, "-c", LOAD_SCRIPT, str(out), str(tmp_path / f"hf-{version}"), config],
                capture_output=True, text=True, env={**os.environ, "HF_DATASETS_OFFLINE": "1"},
            )  # fmt: skip
            assert run.returncode == 0, run.stderr[-2000:]
            seen = json.loads(run.stdout.strip().splitlines()[-1])
            assert seen["load_dataset"] == seen["load_from_disk"] == report.splits, seen
            rows = seen["load_dataset_row"]
            if fmt == "pickapic":
                assert rows == {"jpg_0": "bytes", "label_0": "float", "created_at": "datetime"}
            else:
                assert rows == {"images": "list", "image_keys": "list", "created_at": "datetime"}
