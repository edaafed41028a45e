"""`hps report`: the numbers behind the plots, the files, a year of data, and the page in a
real browser."""

from __future__ import annotations

import asyncio
import io
import os
import re
import shutil
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from PIL import Image

from db import models
from db.connect import init_connection
from hps.settings import AdaptSettings
from pipeline.adapt.live import Design, decide
from pipeline.evaluate import wilson_interval as wilson
from pipeline.report import boundaries, build_plots, choose_period, collect, write_report
from tests.seed import DAY1, seed

ROOT = Path(__file__).resolve().parents[1]
PLOTS = [
    "choices_over_time", "choosers_over_time", "rounds_by_status", "time_to_ready",
    "failure_rate", "classifier_accuracy", "live_test", "hps_scores", "position_bias",
    "agreement", "user_activity", "top_hps_picked", "scorer_agreement", "live_by_recipe",
]  # fmt: skip
ADAPT = AdaptSettings()
BASE = "sd_base:CompVis/stable-diffusion-v1-4"


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _day(text: str) -> date:
    return date.fromisoformat(text)


async def test_report_data_holds_the_example_numbers(pool) -> None:  # type: ignore[no-untyped-def]
    await seed(pool)
    data = await collect(pool, ADAPT, bins=10)
    span = data["span"]
    assert (span.since, span.period) == (DAY1, "day")
    # Day 2's flagged vote (a shadow-banned user's) is not counted, only said.
    assert [(str(r["period"]), r["choices"], r["picks"], r["ties"], r["nones"], r["flagged"],
             r["requester_choices"], r["other_choices"])
            for r in data["choices_over_time"]] == [
        ("2026-11-01", 6, 4, 1, 1, 0, 4, 2), ("2026-11-02", 6, 5, 1, 0, 1, 6, 0),
        ("2026-11-03", 2, 2, 0, 0, 0, 2, 0),
    ]  # fmt: skip
    assert [(str(r["period"]), r["rounds"], r["finished"], r["failed"], r["median_seconds"])
            for r in data["rounds_over_time"]] == [
        ("2026-11-01", 4, 4, 0, 20.0), ("2026-11-02", 6, 6, 0, 20.0),
        ("2026-11-03", 4, 3, 1, 20.0),
    ]  # fmt: skip
    assert [(r["status"], r["rounds"]) for r in data["rounds_by_status"]] == [
        ("queued", 1), ("ready", 8), ("closed", 4), ("failed", 1)
    ]  # fmt: skip
    assert [(r["name"], r["top1"], r["untuned_top1"]) for r in data["classifier_accuracy"]] == [
        ("classifier-a", 0.405, 0.33), ("classifier-b", 0.435, 0.33)
    ]  # fmt: skip
    # docs/analysts.md query 3: requesters' picks by position.
    assert [(r["shown"], r["position"], r["picks"]) for r in data["position_bias"]] == [
        (4, 1, 2), (4, 2, 4), (4, 3, 1), (4, 4, 3)
    ]  # fmt: skip
    # Day 1's images were scored by classifier-a, the others by classifier-b; the top image
    # (position 4 on day 1, 2 after) was picked once of 3 on day 1, 3 times of 7 after.
    assert [(r["classifier"], r["picks"], r["top_picked"], r["chance"])
            for r in data["top_hps_picked"]] == [
        ("classifier-a", 3, 1, 0.25), ("classifier-b", 7, 3, 0.25)
    ]  # fmt: skip
    # docs/analysts.md query 5: one other voter, who agreed with the requester (day 1).
    assert [(str(r["period"]), r["rounds"], r["pairs"], r["agreeing_pairs"], r["other_votes"],
             r["with_requester"], r["chance_votes"]) for r in data["agreement"]] == [
        ("2026-11-01", 1, 1, 1, 1, 1, 0.25), ("2026-11-02", 0, 0, 0, 0, 0, 0),
        ("2026-11-03", 0, 0, 0, 0, 0, 0),
    ]  # fmt: skip
    # Users by choices (1, 2-3) and rounds asked for (0, 2-3); the shadow-banned one left out.
    assert {(r["measure"], r["bucket"]): (r["users"], r["amount"])
            for r in data["user_activity"]} == {
        ("choices", 1): (4, 4), ("choices", 2): (4, 10),
        ("rounds", 0): (2, 0), ("rounds", 2): (6, 14),
    }  # fmt: skip
    # Like for like: the 8 balanced A/B rounds, each version's mean per round, by the serving
    # classifier; the base first (the lower id), the adapter second.
    assert [(r["name"], r["status"]) for r in data["score_classifier"]] == [
        ("classifier-b", "serving")
    ]
    [summary] = data["ab_score_summary"]
    assert (summary["first"], summary["second"], summary["rounds"]) == (BASE, "sd_adapter-ab", 8)
    assert summary["first_mean_hps"] == pytest.approx(21.75)
    assert summary["second_mean_hps"] == pytest.approx(23.90625)
    assert summary["mean_difference"] == pytest.approx(2.15625)
    histogram = data["ab_score_histograms"]
    assert {v: sum(r["rounds"] for r in histogram if r["version"] == v)
            for v in (BASE, "sd_adapter-ab")} == {BASE: 8, "sd_adapter-ab": 8}  # fmt: skip
    assert {r["bin"] for r in histogram} <= set(range(1, 11))
    # The live test: the adapter's 7 decided rounds against the base, in order, and the
    # design the settings plan (no review has stored one yet).
    [live] = data["live_tests"]
    assert (live["version"], live["status"], live["opponent"]) == ("sd_adapter-ab", "testing", BASE)
    assert live["outcomes"] == [True, True, True, True, False, True, False]
    assert live["design"] == Design(200, 5, 0.95) and live["looks"] == []


async def test_a_pick_among_tied_top_scores_counts_its_share(pool) -> None:  # type: ignore[no-untyped-def]
    """The live top-1 credits a pick among m images sharing the highest score 1/m (as
    `pipeline.evaluate.top1_credit`), wherever the picked one was shown."""
    from tests.seed import _Clicks, _round

    base = await models.ensure_base(pool, kind="sd_base", artifact="CompVis/stable-diffusion-v1-4")
    scorer = await models.register(pool, kind="classifier", name="c", artifact="/models/c")
    clicks = _Clicks()
    for i, (scores, position) in enumerate(
        [([5.0, 5.0, 5.0, 1.0], 2), ([1.0, 5.0, 5.0, 2.0], 3), ([1.0, 5.0, 5.0, 2.0], 1),
         ([1.0, 2.0, 3.0, 4.0], 4)]
    ):  # fmt: skip
        await _round(pool, clicks, DAY1 + timedelta(minutes=i), requester=101, prompt=f"p{i}",
                     versions=[base.id] * 4, scores=scores, scorer=scorer.id, verdict="pick",
                     position=position)  # fmt: skip
    data = await collect(pool, ADAPT, bins=10)
    [row] = data["top_hps_picked"]
    assert row["picks"] == 4 and row["top_picked"] == pytest.approx(1 / 3 + 1 / 2 + 0 + 1)


async def test_periods_without_data_are_zero_and_long_ranges_are_weeks(pool) -> None:  # type: ignore[no-untyped-def]
    await seed(pool)
    data = await collect(
        pool, ADAPT, period="day",
        since=datetime(2026, 10, 30, tzinfo=UTC), until=datetime(2026, 11, 5, tzinfo=UTC),
    )  # fmt: skip
    assert [(str(r["period"]), r["choices"]) for r in data["choices_over_time"]] == [
        ("2026-10-30", 0), ("2026-10-31", 0), ("2026-11-01", 6), ("2026-11-02", 6),
        ("2026-11-03", 2), ("2026-11-04", 0),
    ]  # fmt: skip
    assert [r["median_seconds"] for r in data["rounds_over_time"]] == [
        None, None, 20.0, 20.0, 20.0, None
    ]  # fmt: skip
    # A year: one round a quarter earlier makes the range long, so series are by week
    # (Mondays), every week present, and the tables have a row per week, not per day.
    early = await pool.fetchval("SELECT id FROM rounds ORDER BY id LIMIT 1")
    await pool.execute(
        "UPDATE rounds SET created_at = $2 WHERE id = $1", early, DAY1 - timedelta(days=300)
    )
    data = await collect(pool, ADAPT)
    rows = data["choices_over_time"]
    assert data["span"].period == "week" and len(rows) == 44
    assert rows[0]["period"] == _day("2026-01-05") and rows[-1]["period"] == _day("2026-11-02")
    assert sum(r["choices"] for r in rows) == 14 and sum(1 for r in rows if r["choices"]) == 2
    assert all(r["period"].weekday() == 0 for r in rows)
    plots = {p.name: p for p in build_plots(data)}
    assert len(plots["choices_over_time"].table) == 44
    assert data["rounds_over_time"][0]["rounds"] == 1


def test_the_period_follows_the_range() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    assert choose_period(start, start + timedelta(days=60)) == "day"
    assert choose_period(start, start + timedelta(days=365)) == "week"
    assert choose_period(start, start + timedelta(days=3 * 365)) == "month"


def test_the_planned_looks_boundaries_are_where_the_review_decides() -> None:
    """The report's promote and retire boundaries are the platform's own decision rule: at
    the first look, the boundary decides and one win fewer (more) keeps testing."""
    design = Design(every=50, looks=4, confidence=0.95)
    looks = boundaries(design)
    assert [(k, n) for k, n, _, _ in looks] == [(1, 50), (2, 100), (3, 150), (4, 200)]
    _, n, promote, retire = looks[0]
    assert (promote, retire) == (34, 16)
    for wins, action in ((promote, "promote"), (promote - 1, "keep"), (retire, "retire"),
                         (retire + 1, "keep")):  # fmt: skip
        outcomes = [True] * wins + [False] * (n - wins)
        assert decide(outcomes, design, opponent="base").action == action, wins
    for _, n, promote, retire in looks:
        assert wilson(promote, n, design.z)[0] > 0.5 >= wilson(promote - 1, n, design.z)[0]
        assert wilson(retire, n, design.z)[1] < 0.5 <= wilson(retire + 1, n, design.z)[1]


async def test_the_report_runs_as_an_analyst(pool, database_url: str) -> None:  # type: ignore[no-untyped-def]
    """Every statement reads only what hps_analyst may read (no internal user id)."""
    await seed(pool)

    async def as_analyst(conn: asyncpg.Connection) -> None:
        await conn.execute("SET ROLE hps_analyst")

    analyst = await asyncpg.create_pool(
        database_url, min_size=1, max_size=4, init=init_connection, setup=as_analyst
    )
    try:
        async with analyst.acquire() as conn:
            assert await conn.fetchval("SELECT current_user") == "hps_analyst"
        data = await collect(analyst, ADAPT)
    finally:
        await analyst.close()
    assert sum(r["choices"] for r in data["choices_over_time"]) == 14
    assert data["live_tests"][0]["outcomes"] == [True, True, True, True, False, True, False]


async def test_without_serving_scores_the_report_shows_the_latest_classifier_that_scored(
    pool,
) -> None:  # type: ignore[no-untyped-def]
    ids = await seed(pool)
    newer = await models.register(pool, kind="classifier", name="classifier-c", artifact="/c")
    await models.promote(pool, newer.id, actor="test")  # serves, has scored nothing yet
    data = await collect(pool, ADAPT, bins=10)
    assert [(r["id"], r["status"]) for r in data["score_classifier"]] == [
        (ids["classifier_b"], "retired")
    ]
    assert sum(r["rounds"] for r in data["ab_score_histograms"]) == 16
    plots = {p.name: p for p in build_plots(data)}
    assert "all scored by classifier classifier-b (retired; the serving one has scored no " in (
        plots["hps_scores"].caption
    )


async def test_report_files_are_self_contained(pool, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    await seed(pool)
    page = write_report(await collect(pool, ADAPT), tmp_path / "report", DAY1)
    text = page.read_text()
    for name in PLOTS:
        png = tmp_path / "report" / f"{name}.png"
        with Image.open(io.BytesIO(png.read_bytes())) as image:
            assert image.format == "PNG" and image.width > 400
        assert f"<section id='{name}'>" in text
    # Everything is inside the page: no file, network or script source outside it.
    assert text.count("src='data:image/png;base64,") == len(PLOTS)
    assert not re.search(r"(src|href)=['\"](?!data:)", text)
    assert "Generated 2026-11-01 12:00 UTC, for 2026-11-01 to 2026-11-03 (UTC), by day." in text
    assert "all scored by classifier classifier-b (serving); other classifiers" in text
    # The live test's table: the planned looks, their boundaries, none taken yet.
    assert "<td>1 of 5</td><td>200</td><td>99.00%</td><td>119</td><td>81</td><td>7</td>" in text
    assert "1 flagged choice(s) of shadow-banned users left out" in text


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
    data = await collect(pool, ADAPT)
    assert [(r["scorer"], r["top1"]) for r in data["scorer_agreement"]] == [
        ("pickscore", 0.412), ("aesthetic", 0.301)
    ]  # fmt: skip
    text = write_report(data, tmp_path / "report", DAY1).read_text()
    section = text[text.index("<section id='scorer_agreement'>") :]
    assert "on the test split of /data/hpd, evaluated " in section
    assert "<td>pickscore</td><td>PickScore (p)</td><td>80</td><td>0.412</td>" in section
    # Each measure's chance beside it: top-1's 1/K, pairwise's one half.
    assert "<th>top1_high</th><th>top1_chance</th><th>pairwise</th>" in section
    assert "<th>pairwise_high</th><th>pairwise_chance</th><th>pairs</th>" in section
    assert "<td>0.250</td><td>0.600</td>" in section and "<td>0.500</td><td>240</td>" in section


def test_an_empty_database_still_makes_a_report(tmp_path: Path) -> None:
    now = datetime(2026, 11, 1, tzinfo=UTC)
    from db.reports import Span

    empty: dict = {name: [] for name in (
        "choices_over_time", "rounds_over_time", "agreement", "rounds_by_status",
        "classifier_accuracy", "position_bias", "user_activity", "top_hps_picked",
        "score_classifier", "ab_score_histograms", "ab_score_summary", "live_tests",
    )}  # fmt: skip
    empty["span"] = Span(now, now, "day")
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
        [sys.executable, "-m", "cli", "report", str(out), "--period", "day"],
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
    for name in PLOTS:
        assert f'<section id="{name}">' in dom.stdout
    shot = tmp_path / "page.png"
    subprocess.run(
        [*flags, f"--screenshot={shot}", "--window-size=1200,2400", url],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    with Image.open(shot) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # plots drawn, not a blank page


def test_the_cli_refuses_a_bad_period_or_range(tmp_path: Path) -> None:
    from tests.test_cli import hps

    bad = hps("report", str(tmp_path), "--period", "year")
    assert bad.returncode == 1 and "--period: one of auto, day, week, month, not 'year'" in (
        bad.stderr
    )
    backwards = hps("report", str(tmp_path), "--since", "2026-11-02", "--until", "2026-11-01")
    assert backwards.returncode == 1 and "--since must come before --until" in backwards.stderr
    nonsense = hps("report", str(tmp_path), "--since", "yesterday")
    assert nonsense.returncode == 1 and "--since: not a date or time" in nonsense.stderr
