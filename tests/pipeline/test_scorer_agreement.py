"""`hps eval --scorers`: every reward model's agreement with people's choices on a split,
from an HPD folder (the command as a user runs it) or a Pick-a-Pic folder, stored for the
report and the bot."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from db.scorers import latest_agreement
from hps.settings import Settings
from pipeline.data import examples_from_folder, examples_from_pickapic, read_path
from pipeline.evaluate import evaluate_scorers
from pipeline.scorers import load_scorers
from tests.colour_task import colour_image, write_colour_hpd
from tests.pipeline.conftest import make_settings
from tests.test_cli import hps

NAMES = ["hps", "hpsv2", "pickscore", "aesthetic", "clip"]


def _env(tiny_scorers: dict[str, dict[str, str]], database_url: str, data_dir: Path) -> dict:
    env = {"HPS_DATABASE_URL": database_url, "HPS_DATA_DIR": str(data_dir)}
    for section, values in tiny_scorers.items():
        env.update({f"HPS_{section.upper()}__{k.upper()}": v for k, v in values.items()})
    return env


async def test_eval_scorers_reports_and_stores_each_scorers_agreement(
    pool, database_url: str, tiny_scorers: dict[str, dict[str, str]], tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    data = write_colour_hpd(tmp_path / "hpd", n_train=2, n_test=12, k=(4, 3), seed=5)
    out, env = tmp_path / "agreement.json", _env(tiny_scorers, database_url, tmp_path / "d")
    result = hps("eval", "--scorers", ",".join(NAMES), "--data", str(data), "--output", str(out),
                 "--batch-size", "8", env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Agreement with people's choices (95% intervals)" in result.stdout
    reports = json.loads(out.read_text())["reports"]
    assert list(reports) == NAMES

    # The same numbers as the scorers give in this process, on the same test examples.
    settings = make_settings(**tiny_scorers)
    test = [e for e in examples_from_folder(data) if e.split == "test"]
    expected = evaluate_scorers(load_scorers(NAMES, settings), test, read_path)
    for name in NAMES:
        mine, theirs = reports[name], expected[name]
        assert (mine["n"], mine["ties"], mine["pairwise_n"]) == (12, 0, 30)  # 6×3 + 6×2 pairs
        assert mine["chance"] == theirs["chance"] == pytest.approx((0.25 + 1 / 3) / 2)
        assert abs(mine["top1"] - theirs["top1"]) < 1e-9, name
        assert abs(mine["pairwise"] - theirs["pairwise"]) < 1e-9, name
        assert mine["per_k"].keys() == {"3", "4"}
    assert reports["hpsv2"]["model"].startswith("HPS v2.1 (")
    assert reports["aesthetic"]["scale"].startswith("aesthetic: the predicted mean rating")

    stored = await latest_agreement(pool)
    assert [r.scorer for r in stored] == NAMES
    assert {r.evaluated_at for r in stored} == {stored[0].evaluated_at}  # one evaluation
    assert stored[0].source == str(data) and stored[0].split == "test"
    assert [r.top1 for r in stored] == [reports[n]["top1"] for n in NAMES]
    assert [(r.top1_low, r.top1_high) for r in stored] == [
        tuple(reports[n]["top1_ci"]) for n in NAMES
    ]

    unknown = hps("eval", "--scorers", "hps,imagereward", "--data", str(data), env=env)
    assert unknown.returncode == 1
    assert "unknown scorer(s) imagereward: choose from hps, hpsv2, pickscore" in unknown.stderr


def _jpeg(colour: str, rng: random.Random) -> bytes:
    buffer = io.BytesIO()
    colour_image(colour, rng).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_pickapic(folder: Path) -> Path:
    """A Pick-a-Pic test split: picks either way, a tie (0.5/0.5) and an unlabelled row."""
    rng = random.Random(0)
    rows = [("a red cube", "red", "blue", 1.0, True), ("a green ball", "white", "green", 0.0, True),
            ("a blue car", "blue", "black", 0.5, True), ("a cat", "red", "red", 1.0, False),
            ("a yellow hat", "orange", "yellow", 0.0, True)]  # fmt: skip
    table = pa.table({
        "caption": [r[0] for r in rows],
        "jpg_0": [_jpeg(r[1], rng) for r in rows],
        "jpg_1": [_jpeg(r[2], rng) for r in rows],
        "label_0": [r[3] for r in rows],
        "label_1": [1.0 - r[3] for r in rows],
        "has_label": [r[4] for r in rows],
    })  # fmt: skip
    (folder / "data").mkdir(parents=True)
    pq.write_table(table, folder / "data" / "test-00000-of-00001.parquet")
    return folder


async def test_a_pick_a_pic_folder_is_a_choice_between_two_images(
    pool, database_url: str, tiny_scorers: dict[str, dict[str, str]], tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from cli.train import _agreement

    folder = write_pickapic(tmp_path / "pickapic")
    examples, read = examples_from_pickapic(folder, "test")
    assert [(e.prompt, e.chosen, e.k) for e in examples] == [
        ("a red cube", 0, 2), ("a green ball", 1, 2), ("a blue car", None, 2),
        ("a yellow hat", 1, 2),
    ]  # fmt: skip
    assert isinstance(read(examples[0].images[1]), bytes)

    settings: Settings = make_settings(database_url=database_url, **tiny_scorers)
    reports: dict[str, Any] = await _agreement(
        settings, ["pickscore", "clip"], None, folder, "test", True, 4
    )
    expected = evaluate_scorers(load_scorers(["pickscore", "clip"], settings), examples, read)
    for name, report in reports.items():
        counts = (report["n"], report["ties"], report["chance"], report["pairwise_n"])
        assert counts == (3, 1, 0.5, 3)  # the tie counted, not scored; the unlabelled left out
        assert (report["top1"], report["pairwise"]) == pytest.approx(
            (expected[name]["top1"], expected[name]["pairwise"])
        )
    stored = await latest_agreement(pool)
    assert [r.scorer for r in stored] == ["pickscore", "clip"] and stored[0].source == str(folder)


def test_the_agreement_tables_name_each_chance_beside_its_measure(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Top-1's chance is 1/K, pairwise's one half: each is named and shown beside its own."""
    import io

    from rich.console import Console

    import cli.train

    report = {"model": "m", "n": 40, "top1": 0.45, "top1_ci": [0.35, 0.55], "chance": 0.25,
              "pairwise": 0.7, "pairwise_ci": [0.65, 0.75], "pairwise_n": 120,
              "per_k": {"4": {}}}  # fmt: skip
    out = io.StringIO()
    monkeypatch.setattr(cli.train, "console", Console(file=out, width=300))
    cli.train.print_agreement({"pickscore": report})
    cli.train.print_reports({"classifier": report})
    text = out.getvalue().replace("┃", "│")
    lines = [line.split("│") for line in text.splitlines() if "│" in line]
    cells = [[c.strip() for c in line[1:-1]] for line in lines]
    assert cells == [
        ["scorer", "model", "choices", "top-1", "top-1 chance", "pairwise", "pairwise chance",
         "pairs"],
        ["pickscore", "m", "40", "45.0% [35.0%, 55.0%]", "25.0%", "70.0% [65.0%, 75.0%]",
         "50.0%", "120"],
        ["model", "choices", "top-1", "top-1 chance", "pairwise", "pairwise chance", "pairs"],
        ["classifier", "40", "45.0% [35.0%, 55.0%]", "25.0%", "70.0% [65.0%, 75.0%]", "50.0%",
         "120"],
    ]  # fmt: skip
