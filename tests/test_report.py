"""`hps report`: the numbers behind the plots, the files, and the page in a real browser."""

from __future__ import annotations

import asyncio
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from db.reports import report_data
from pipeline.report import build_plots, write_report
from tests.seed import DAY1, seed

ROOT = Path(__file__).resolve().parents[1]
PLOTS = ["choices_per_day", "rounds_by_status", "classifier_accuracy", "ab_win_rates", "hps_scores",
         "scorer_agreement"]  # fmt: skip


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


async def test_report_data_holds_the_example_numbers(pool) -> None:  # type: ignore[no-untyped-def]
    await seed(pool)
    data = await report_data(pool, bins=10)
    assert [(str(r["day"]), r["choices"], r["picks"], r["ties"], r["nones"])
            for r in data["choices_per_day"]] == [
        ("2026-11-01", 6, 4, 1, 1), ("2026-11-02", 7, 6, 1, 0), ("2026-11-03", 2, 2, 0, 0)
    ]  # fmt: skip
    assert [(r["status"], r["rounds"]) for r in data["rounds_by_status"]] == [
        ("queued", 1), ("ready", 8), ("closed", 4), ("failed", 1)
    ]  # fmt: skip
    assert [(r["name"], r["top1"], r["untuned_top1"]) for r in data["classifier_accuracy"]] == [
        ("classifier-a", 0.405, 0.33), ("classifier-b", 0.435, 0.33)
    ]  # fmt: skip
    # The adapter: 4 wins of 5 decided rounds on day 2, then 5 of 7.
    adapter = [(str(r["day"]), r["rounds"], r["wins"]) for r in data["ab_win_rate_over_time"]]
    assert adapter == [("2026-11-02", 5, 4), ("2026-11-03", 7, 5)]
    # Only the serving classifier's scores: day 1's images were scored by classifier-a.
    assert [(r["name"], r["status"]) for r in data["score_classifier"]] == [
        ("classifier-b", "serving")
    ]
    histogram = data["score_histograms"]
    counts = {v: sum(r["images"] for r in histogram if r["version"] == v) for v in
              {r["version"] for r in histogram}}  # fmt: skip
    assert counts == {"sd_adapter-ab": 16, "sd_base:CompVis/stable-diffusion-v1-4": 16}
    assert {r["bin"] for r in histogram} <= set(range(1, 11))
    assert (histogram[0]["lo"], histogram[0]["hi"]) == (21.0, 26.5)  # not day 1's 20.0
    summary = {r["version"]: (r["images"], r["mean_hps"]) for r in data["score_summary"]}
    assert summary == {
        "sd_adapter-ab": (16, pytest.approx(23.90625)),
        "sd_base:CompVis/stable-diffusion-v1-4": (16, pytest.approx(21.75)),
    }


async def test_without_serving_scores_the_report_shows_the_latest_classifier_that_scored(
    pool,
) -> None:  # type: ignore[no-untyped-def]
    from db import models

    ids = await seed(pool)
    newer = await models.register(pool, kind="classifier", name="classifier-c", artifact="/c")
    await models.promote(pool, newer.id, actor="test")  # serves, has scored nothing yet
    data = await report_data(pool, bins=10)
    assert [(r["id"], r["status"]) for r in data["score_classifier"]] == [
        (ids["classifier_b"], "retired")
    ]
    assert sum(r["images"] for r in data["score_histograms"]) == 32
    plots = {p.name: p for p in build_plots(data)}
    assert "all scored by classifier classifier-b (retired; the serving one has scored no " in (
        plots["hps_scores"].caption
    )


async def test_report_files_are_self_contained(pool, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    await seed(pool)
    page = write_report(await report_data(pool), tmp_path / "report", DAY1)
    text = page.read_text()
    for name in PLOTS:
        png = tmp_path / "report" / f"{name}.png"
        with Image.open(io.BytesIO(png.read_bytes())) as image:
            assert image.format == "PNG" and image.width > 400
        assert f"<section id='{name}'>" in text
    # Everything is inside the page: no file, network or script source outside it.
    assert text.count("src='data:image/png;base64,") == len(PLOTS)
    assert not re.search(r"(src|href)=['\"](?!data:)", text)
    assert "Generated 2026-11-01 12:00 UTC" in text
    assert "<td>sd_adapter-ab</td>" in text and "<td>0.714</td>" in text  # 5 of 7
    assert "all scored by classifier classifier-b (serving); other classifiers" in text


async def test_the_report_shows_the_latest_scorer_agreement(pool, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from db.scorers import record_agreement

    def report(top1: float, model: str) -> dict:
        return {"model": model, "scale": "s", "examples": "f", "n": 80, "ties": 3, "top1": top1,
                "top1_ci": [top1 - 0.1, top1 + 0.1], "chance": 0.25, "pairwise": 0.6,
                "pairwise_ci": [0.55, 0.65], "pairwise_n": 240}  # fmt: skip

    await record_agreement(pool, source="choices", split="test", reports={"hps": report(0.2, "a")})
    await record_agreement(pool, source="/data/hpd", split="test",
                           reports={"pickscore": report(0.412, "PickScore (p)"),
                                    "aesthetic": report(0.301, "LAION (x)")})  # fmt: skip
    data = await report_data(pool)
    assert [(r["scorer"], r["top1"]) for r in data["scorer_agreement"]] == [
        ("pickscore", 0.412), ("aesthetic", 0.301)
    ]  # fmt: skip
    text = write_report(data, tmp_path / "report", DAY1).read_text()
    section = text[text.index("<section id='scorer_agreement'>") :]
    assert "on the test split of /data/hpd, evaluated " in section
    assert "<td>pickscore</td><td>PickScore (p)</td><td>80</td><td>0.412</td>" in section


def test_an_empty_database_still_makes_a_report(tmp_path: Path) -> None:
    empty = {
        name: []
        for name in ("choices_per_day", "rounds_by_status", "classifier_accuracy",
                     "ab_win_rate_over_time", "score_histograms", "score_summary",
                     "score_classifier")
    }  # fmt: skip
    text = write_report(empty, tmp_path).read_text()
    assert text.count("No data.") == len(PLOTS)
    assert "all scored by the configured HPS model (no registered classifier" in text


@pytest.mark.skipif(
    _chromium() is None and not os.environ.get("REQUIRE_CHROMIUM"),
    reason="chromium is not installed (`.ci/run` installs it)",
)
async def test_the_report_renders_in_headless_chromium(
    pool, database_url: str, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """Run as a user runs it (`hps report`), then open the page in headless Chromium: every
    plot must have decoded, and the rendered page must not be blank."""
    assert _chromium() is not None, "REQUIRE_CHROMIUM is set but chromium is missing"
    await seed(pool)
    await asyncio.to_thread(_make_and_render, database_url, tmp_path)


def _make_and_render(database_url: str, tmp_path: Path) -> None:
    out = tmp_path / "report"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPS_")}
    env.update(HPS_DATABASE_URL=database_url, HPS_DATA_DIR=str(tmp_path / "data"))
    made = subprocess.run(
        [sys.executable, "-m", "cli", "report", str(out)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    flags = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=10000",
    ]  # fmt: skip
    url = (out / "report.html").as_uri()
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert f'data-plots-decoded="{len(PLOTS)}"' in dom.stdout
    shot = tmp_path / "page.png"
    subprocess.run(
        [*flags, f"--screenshot={shot}", "--window-size=1200,2400", url],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    with Image.open(shot) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # plots drawn, not a blank page
