"""`hps report`: one self-contained HTML page (plots embedded as PNG data URIs, the numbers
under each in a table) and the same plots as PNG files beside it. It opens in any browser
with no server. The data comes from the analysts' views (`db.reports`), so an analyst's own
login can make it.

It stays readable over any range: series over time are aggregated by day, week or month
(`choose_period`: by day up to two months, by week up to two years, by month beyond), on real
date axes, with every period of the range shown (a period without data is a zero, not a
gap; a rate with nothing to divide is a gap), so tables have a row per period, not per day.
Flagged choices (shadow-banned users') are never counted.

The plots:
- choices over time by verdict; requesters' and other voters' choices over time;
- rounds by status; time from request to images (median, 90th percentile) and the share of
  rounds that failed, over time;
- classifier accuracy by version against the untuned CLIP baseline;
- each SD adapter's live A/B test as the platform decides it (`pipeline.adapt.live`): the
  running win rate over decided rounds, its band at the looks' corrected confidence, and the
  planned looks with their boundaries (the win rates that promote or retire), the looks taken;
- the HPS of the images of the versions shown side by side in the same balanced A/B rounds
  (like for like), scored by one classifier (the serving one, else the latest that scored),
  and the mean per-round difference;
- pick rate by position (position bias), with Wilson intervals, against chance;
- agreement between people who picked in the same round, over time, against chance;
- how active people are (users by choices made and by rounds asked for);
- how often the requester picked the image a classifier scored highest, per classifier;
- each reward model's agreement with people's choices (the latest `hps eval --scorers`).
"""

from __future__ import annotations

import asyncio
import base64
import html
import io
import math
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import matplotlib

matplotlib.use("Agg")  # no display: render to files only

import matplotlib.dates as mdates
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from db import models, reports
from db.connect import Executor
from hps.files import write_atomically
from hps.settings import AdaptSettings
from pipeline.adapt.live import Design, Look
from pipeline.intervals import wilson_interval

Rows = list[dict[str, Any]]
Data = dict[str, Any]

MAX_PANELS = 3  # live tests and version pairs drawn (all are in the tables)


@dataclass(frozen=True)
class Plot:
    name: str  # file stem
    title: str
    caption: str
    png: bytes
    table: Rows


def choose_period(first: datetime, last: datetime) -> str:
    """The period series are aggregated by, for data from `first` to `last`."""
    days = (last - first).total_seconds() / 86400
    return "day" if days <= 62 else "week" if days <= 731 else "month"


async def collect(
    db: Executor,
    adapt: AdaptSettings,
    *,
    period: str = "auto",
    since: datetime | None = None,
    until: datetime | None = None,
    bins: int = 30,
) -> Data:
    """Everything the report draws, for activity in [since, until) (default: all of it),
    aggregated by `period` (`auto`: `choose_period`). With a pool, the statements run side
    by side on connections of their own."""
    async with _connection(db) as conn:
        found = await reports.data_range(
            conn,
            since or datetime(1970, 1, 1, tzinfo=UTC),
            until or datetime(9999, 1, 1, tzinfo=UTC),
        )
    now = datetime.now(UTC)
    first, last = found or (since or now, until or now)
    span = reports.Span(
        since or first,
        until or last + timedelta(microseconds=1),
        choose_period(first, last) if period == "auto" else period,
    )

    async def series(conn: Executor) -> Data:
        if found is None:
            return {"choices_over_time": [], "rounds_over_time": []}
        return await reports.series(conn, span)

    async def facts(conn: Executor) -> Data:
        return await reports.round_facts(conn, span, bins)

    async def breakdowns(conn: Executor) -> Data:
        return await reports.breakdowns(conn, span)

    async def live(conn: Executor) -> Data:
        return {"live_tests": await _live_tests(conn, adapt)}

    parts = [facts, series, breakdowns, live]
    if isinstance(db, asyncpg.Pool):
        done = await asyncio.gather(*(_on_own_connection(db, part) for part in parts))
    else:
        done = [await _on_own_connection(db, part) for part in parts]
    data: Data = {"span": span}
    for part in done:
        data.update(part)
    return data


@asynccontextmanager
async def _connection(db: Executor) -> AsyncIterator[asyncpg.Connection]:
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn:
            yield conn
    else:
        yield db


async def _on_own_connection(db: Executor, part: Callable[[Executor], Awaitable[Data]]) -> Data:
    async with _connection(db) as conn:
        await reports.tune(conn)
        return await part(conn)


async def _live_tests(db: Executor, adapt: AdaptSettings) -> list[dict[str, Any]]:
    """Each adapter's live test: its design (as stored by the last review, else as the
    settings plan it now), its opponent, its decided rounds in order (up to the design's
    last look) and the looks taken."""
    tests = []
    incumbent = await models.sd_incumbent(db)
    for row in await reports.live_tests(db):
        live = row["live"] or {}
        design = Design(**live["design"]) if live.get("design") else Design.of(adapt)
        opponent_id = live.get("opponent_id")
        if row["status"] == "testing" and opponent_id is None and incumbent is not None:
            opponent_id = incumbent.id
        if opponent_id is None:
            continue
        names = await reports.version_names(db, [opponent_id])
        outcomes = await models.live_outcomes(db, row["id"], opponent_id, design.horizon)
        tests.append(
            {
                "version": row["name"],
                "status": row["status"],
                "opponent": names.get(opponent_id, str(opponent_id)),
                "design": design,
                "outcomes": outcomes,
                "looks": [Look(**look) for look in live.get("looks", [])],
            }
        )
    return tests


# -- drawing ------------------------------------------------------------------------------


def _figure(panels: int = 1) -> tuple[Figure, list[Any]]:
    fig, axes = plt.subplots(1, panels, figsize=(7.5 if panels == 1 else 4.2 * panels, 3.6),
                             dpi=110, squeeze=False)  # fmt: skip
    for ax in axes[0]:
        ax.grid(axis="y", alpha=0.3)
    return fig, list(axes[0])


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _empty(what: str) -> bytes:
    fig, [ax] = _figure()
    ax.text(0.5, 0.5, f"No {what} yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])
    return _png(fig)


def _width(period: str) -> float:
    """A period's width in days, a little less so that bars stay apart."""
    return {"day": 1, "week": 7, "month": 30}[period] * 0.85


def _dates(ax: Any, period: str, days: list[date]) -> None:
    """A date axis over the periods `days` (each drawn from its start): a tick per period
    when there are few, else matplotlib's choice (never finer than the period)."""
    if len(days) <= 14:
        locator = {
            "day": mdates.DayLocator(),
            "week": mdates.WeekdayLocator(byweekday=mdates.MO),
            "month": mdates.MonthLocator(),
        }[period]
    else:
        locator = mdates.AutoDateLocator(minticks=4, maxticks=10)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    # Set, not autoscaled: a series with one finite point would span years otherwise.
    ax.set_xlim(days[0], days[-1] + timedelta(days={"day": 1, "week": 7, "month": 31}[period]))


def _rate(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


def choices_over_time(rows: Rows, period: str) -> bytes:
    if not any(r["choices"] for r in rows):
        return _empty("choices")
    fig, [ax] = _figure()
    days = [r["period"] for r in rows]
    bottom = [0] * len(rows)
    for verdict, label in (("picks", "picked an image"), ("ties", "can't decide"),
                           ("nones", "none of these")):  # fmt: skip
        values = [r[verdict] for r in rows]
        ax.bar(days, values, width=_width(period), bottom=bottom, align="edge", label=label)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_ylabel(f"choices per {period}")
    ax.legend(frameon=False, fontsize="small")
    _dates(ax, period, days)
    return _png(fig)


def choosers_over_time(rows: Rows, period: str) -> bytes:
    if not any(r["choices"] for r in rows):
        return _empty("choices")
    fig, [ax] = _figure()
    days = [r["period"] for r in rows]
    ax.plot(days, [r["requester_choices"] for r in rows], marker=".", label="requesters")
    ax.plot(days, [r["other_choices"] for r in rows], marker=".",
            label="others (votes on someone else's round)")  # fmt: skip
    ax.set_ylabel(f"choices per {period}")
    ax.set_ylim(bottom=0)
    ax.legend(frameon=False, fontsize="small")
    _dates(ax, period, days)
    return _png(fig)


def rounds_by_status(rows: Rows) -> bytes:
    if not rows:
        return _empty("rounds")
    fig, [ax] = _figure()
    ax.bar([r["status"] for r in rows], [r["rounds"] for r in rows], color="tab:gray")
    ax.set_ylabel("rounds")
    return _png(fig)


def time_to_ready(rows: Rows, period: str) -> bytes:
    if not any(r["median_seconds"] is not None for r in rows):
        return _empty("rounds with images")
    fig, [ax] = _figure()
    days = [r["period"] for r in rows]
    for key, label in (("median_seconds", "median"), ("p90_seconds", "90th percentile")):
        values = [math.nan if r[key] is None else r[key] for r in rows]
        ax.plot(days, values, marker=".", label=label)
    ax.set_ylabel("seconds from request to images")
    ax.set_ylim(bottom=0)
    ax.legend(frameon=False, fontsize="small")
    _dates(ax, period, days)
    return _png(fig)


def failure_rate(rows: Rows, period: str) -> bytes:
    if not any(r["finished"] for r in rows):
        return _empty("finished rounds")
    fig, [ax] = _figure()
    days = [r["period"] for r in rows]
    rates = [_rate(r["failed"], r["finished"]) for r in rows]
    bands = [wilson_interval(r["failed"], r["finished"]) if r["finished"] else (math.nan,) * 2
             for r in rows]  # fmt: skip
    (line,) = ax.plot(days, rates, marker=".", label="failed, of the rounds that finished")
    ax.fill_between(days, [b[0] for b in bands], [b[1] for b in bands], alpha=0.2,
                    color=line.get_color(), label="95 % Wilson interval")  # fmt: skip
    ax.set_ylim(0, min(1.0, max([b[1] for b in bands if not math.isnan(b[1])] + [0.05]) * 1.1))
    ax.set_ylabel(f"share failed per {period}")
    ax.legend(frameon=False, fontsize="small")
    _dates(ax, period, days)
    return _png(fig)


def classifier_accuracy(rows: Rows) -> bytes:
    if not rows:
        return _empty("evaluated classifier versions")
    fig, [ax] = _figure()
    x = range(len(rows))
    top1 = [r["top1"] for r in rows]
    errors = [
        [r["top1"] - (r["top1_low"] if r["top1_low"] is not None else r["top1"]) for r in rows],
        [(r["top1_high"] if r["top1_high"] is not None else r["top1"]) - r["top1"] for r in rows],
    ]
    ax.errorbar(x, top1, yerr=errors, fmt="o", capsize=4, label="classifier (95 % CI)")
    baseline = [(i, r["untuned_top1"]) for i, r in enumerate(rows) if r["untuned_top1"]]
    if baseline:
        ax.scatter(*zip(*baseline, strict=True), marker="x", color="tab:red",
                   label="untuned CLIP, same examples", zorder=3)  # fmt: skip
    chance = [r["chance"] for r in rows if r["chance"]]
    if chance:
        ax.axhline(sum(chance) / len(chance), color="gray", linestyle=":", label="chance")
    ax.set_xticks(list(x), [r["name"] for r in rows], rotation=30, ha="right")
    ax.set_xlim(-0.5, len(rows) - 0.5)
    ax.set_ylim(0, min(1.0, max(r["top1_high"] or r["top1"] for r in rows) + 0.15))
    ax.set_ylabel("top-1 accuracy")
    ax.legend(frameon=False, fontsize="small", loc="upper left")
    return _png(fig)


def boundaries(design: Design) -> list[tuple[int, int, int | None, int | None]]:
    """Per planned look: (look, decided rounds, fewest wins that promote, most wins that
    retire), by the look's Wilson interval at the corrected confidence (None: no number of
    wins does)."""
    looks = []
    for k in range(1, design.looks + 1):
        n = k * design.every
        bounds = [wilson_interval(w, n, design.z) for w in range(n + 1)]
        promote = next((w for w in range(n + 1) if bounds[w][0] > 0.5), None)
        retire = next((w for w in range(n, -1, -1) if bounds[w][1] < 0.5), None)
        looks.append((k, n, promote, retire))
    return looks


def live_tests(tests: list[dict[str, Any]]) -> bytes:
    if not tests:
        return _empty("adapters in live A/B tests")
    shown = tests[:MAX_PANELS]
    fig, axes = _figure(len(shown))
    for ax, test in zip(axes, shown, strict=True):
        design: Design = test["design"]
        outcomes: list[bool] = test["outcomes"]
        if outcomes:
            n = list(range(1, len(outcomes) + 1))
            wins = [sum(outcomes[:i]) for i in n]
            bands = [wilson_interval(w, i, design.z) for w, i in zip(wins, n, strict=True)]
            (line,) = ax.plot(n, [w / i for w, i in zip(wins, n, strict=True)],
                              label="win rate so far")  # fmt: skip
            band = f"{design.look_confidence:.1%} interval (each look's)"
            ax.fill_between(n, [b[0] for b in bands], [b[1] for b in bands], alpha=0.2,
                            color=line.get_color(), label=band)  # fmt: skip
        for k, rounds, promote, retire in boundaries(design):
            if promote is not None:
                ax.plot([rounds], [promote / rounds], marker="v", color="tab:green", ls="",
                        label="promote at or above" if k == 1 else None)  # fmt: skip
            if retire is not None:
                ax.plot([rounds], [retire / rounds], marker="^", color="tab:red", ls="",
                        label="retire at or below" if k == 1 else None)  # fmt: skip
            ax.axvline(rounds, color="gray", alpha=0.25, lw=0.8)
        for look in test["looks"]:
            ax.plot([look.rounds], [look.win_rate], marker="o", mfc="none", color="black",
                    ls="", label="look taken" if look.look == 1 else None)  # fmt: skip
        ax.axhline(0.5, color="gray", linestyle=":")
        ax.set_xlim(0, design.horizon * 1.03)
        ax.set_ylim(0, 1)
        ax.set_xlabel("decided A/B rounds")
        ax.set_title(f"{test['version']} vs {test['opponent']}", fontsize="small")
        ax.legend(frameon=False, fontsize="x-small", loc="lower left")
    axes[0].set_ylabel("win rate")
    return _png(fig)


def ab_scores(rows: Rows, summary: Rows) -> bytes:
    if not rows:
        return _empty("scored A/B rounds")
    pairs: dict[tuple[str, str], dict[str, dict[int, int]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        pairs[(r["first"], r["second"])][r["version"]][r["bin"]] = r["rounds"]
    order = [(s["first"], s["second"]) for s in summary if (s["first"], s["second"]) in pairs]
    shown = order[:MAX_PANELS]
    lo, hi = rows[0]["lo"], rows[0]["hi"]
    bins = max(r["bin"] for r in rows)
    edges = [lo + i * (hi - lo) / bins for i in range(bins + 1)]
    means = {(s["first"], s["second"]): s for s in summary}
    fig, axes = _figure(len(shown))
    for ax, pair in zip(axes, shown, strict=True):
        for version, counts in sorted(pairs[pair].items()):
            total = sum(counts.values())
            mean = means[pair]["first_mean_hps" if version == pair[0] else "second_mean_hps"]
            ax.stairs([counts.get(i + 1, 0) / total for i in range(bins)], edges,
                      label=f"{version} (mean {mean:.2f})", linewidth=1.5)  # fmt: skip
        ax.set_title(f"{means[pair]['rounds']:,} round(s)", fontsize="small")
        ax.set_xlabel("mean HPS of its images in a round (100 × cosine)")
        ax.legend(frameon=False, fontsize="x-small")
    axes[0].set_ylabel("share of rounds")
    return _png(fig)


def position_bias(rows: Rows) -> bytes:
    if not rows:
        return _empty("requester picks")
    fig, [ax] = _figure()
    totals: dict[int, int] = defaultdict(int)
    for r in rows:
        totals[r["shown"]] += r["picks"]
    ks = sorted(totals, key=lambda k: -totals[k])[:3]
    for j, k in enumerate(sorted(ks)):
        points = [r for r in rows if r["shown"] == k]
        x = [r["position"] + (j - (len(ks) - 1) / 2) * 0.12 for r in points]
        rates = [r["picks"] / totals[k] for r in points]
        bands = [wilson_interval(r["picks"], totals[k]) for r in points]
        ax.errorbar(x, rates, yerr=[[p - b[0] for p, b in zip(rates, bands, strict=True)],
                                    [b[1] - p for p, b in zip(rates, bands, strict=True)]],
                    fmt="o", capsize=3, label=f"{k} shown ({totals[k]:,} picks)")  # fmt: skip
        ax.hlines(1 / k, 0.6, k + 0.4, colors="gray", linestyles=":")
    ax.set_xticks(range(1, max(ks) + 1))
    ax.set_xlabel("position picked (as shown)")
    ax.set_ylabel("share of picks (95 % CI)")
    ax.set_ylim(bottom=0)
    ax.legend(frameon=False, fontsize="small", title="dotted: chance (1/K)",
              title_fontsize="x-small")  # fmt: skip
    return _png(fig)


def agreement(rows: Rows, period: str) -> bytes:
    if not any(r["pairs"] for r in rows):
        return _empty("rounds with two or more picks")
    fig, [ax] = _figure()
    days = [r["period"] for r in rows]
    series = (
        ("with_requester", "other_votes", "chance_votes", "others picking the requester's image"),
        ("agreeing_pairs", "pairs", "chance_pairs", "pairs of pickers picking the same image"),
    )  # fmt: skip
    for hits, total, chance, label in series:
        (line,) = ax.plot(days, [_rate(r[hits], r[total]) for r in rows], marker=".",
                          label=label)  # fmt: skip
        ax.plot(days, [_rate(r[chance], r[total]) for r in rows], ls=":",
                color=line.get_color(), label="chance of the same")  # fmt: skip
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"agreement per {period}")
    ax.legend(frameon=False, fontsize="x-small")
    _dates(ax, period, days)
    return _png(fig)


def bucket_label(bucket: int) -> str:
    """The range of a power-of-two bucket: 0, 1, 2–3, 4–7, ..."""
    if bucket <= 1:
        return str(bucket)
    return f"{2 ** (bucket - 1):,}–{2**bucket - 1:,}"


def user_activity(rows: Rows) -> bytes:
    if not rows:
        return _empty("users")
    fig, [ax] = _figure()
    buckets = sorted({r["bucket"] for r in rows})
    for offset, (measure, label) in zip((-0.2, 0.2), (("choices", "choices made"),
                                                      ("rounds", "rounds asked for")),
                                        strict=True):  # fmt: skip
        users = {r["bucket"]: r["users"] for r in rows if r["measure"] == measure}
        ax.bar([b + offset for b in buckets], [users.get(b, 0) for b in buckets], width=0.4,
               label=label)  # fmt: skip
    ax.set_yscale("log")
    ax.set_xticks(buckets, [bucket_label(b) for b in buckets], rotation=30, ha="right")
    ax.set_xlabel("how many (per user)")
    ax.set_ylabel("users")
    ax.legend(frameon=False, fontsize="small")
    return _png(fig)


def top_hps_picked(rows: Rows) -> bytes:
    if not rows:
        return _empty("fully scored rounds with a requester pick")
    fig, [ax] = _figure()
    x = range(len(rows))
    rates = [r["top_picked"] / r["picks"] for r in rows]
    bands = [wilson_interval(r["top_picked"], r["picks"]) for r in rows]
    ax.errorbar(x, rates, yerr=[[p - b[0] for p, b in zip(rates, bands, strict=True)],
                                [b[1] - p for p, b in zip(rates, bands, strict=True)]],
                fmt="o", capsize=4, label="picked the top-scored image (95 % CI)")  # fmt: skip
    ax.scatter(x, [r["chance"] for r in rows], marker="_", s=300, color="gray", label="chance")
    ax.set_xticks(list(x), [r["classifier"] for r in rows], rotation=30, ha="right")
    ax.set_xlim(-0.5, len(rows) - 0.5)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of requester picks")
    ax.legend(frameon=False, fontsize="small")
    return _png(fig)


def scorer_agreement_plot(rows: Rows) -> bytes:
    """Each reward model's top-1 and pairwise agreement with people's choices (the latest
    `hps eval --scorers`), with 95 % intervals, against chance."""
    if not rows:
        return _empty("reward model comparisons")
    fig, [ax] = _figure()
    x = list(range(len(rows)))
    for offset, key, label, marker in ((-0.12, "top1", "top-1", "o"),
                                       (0.12, "pairwise", "pairwise", "s")):  # fmt: skip
        points = [(i + offset, r) for i, r in zip(x, rows, strict=True) if r[key] is not None]
        if not points:
            continue
        values = [r[key] for _, r in points]
        errors = [[v - (r[f"{key}_low"] if r[f"{key}_low"] is not None else v)
                   for v, (_, r) in zip(values, points, strict=True)],
                  [(r[f"{key}_high"] if r[f"{key}_high"] is not None else v) - v
                   for v, (_, r) in zip(values, points, strict=True)]]  # fmt: skip
        ax.errorbar([p for p, _ in points], values, yerr=errors, fmt=marker, capsize=4,
                    label=f"{label} (95 % CI)")  # fmt: skip
    chance = [r["chance"] for r in rows if r["chance"]]
    if chance:
        ax.axhline(sum(chance) / len(chance), color="gray", linestyle=":", label="top-1 chance")
    ax.axhline(0.5, color="gray", linestyle="--", linewidth=0.8, label="pairwise chance")
    ax.set_xticks(x, [r["scorer"] for r in rows])
    ax.set_xlim(-0.5, len(rows) - 0.5)
    ax.set_ylim(0, 1)
    ax.set_ylabel("agreement with people")
    ax.legend(frameon=False, fontsize="small", loc="lower right")
    return _png(fig)


def _with_chances(rows: Rows) -> Rows:
    """Rows with each measure's chance named for it (the stored `chance` is top-1's)."""
    return [{**r, "top1_chance": r["chance"], "pairwise_chance": 0.5} for r in rows]


def scorer_agreement_section(rows: Rows) -> tuple[str, str, str, Callable[[], bytes], Rows]:
    """The report's "scorer agreement" section: which public reward model agrees most with
    this community's choices (rows: `db.scorers.LATEST_AGREEMENT_SQL`'s)."""
    if rows:
        first = rows[0]
        where = (
            f"on the {first['split']} split of "
            + ("the choices" if first["source"] == "choices" else first["source"])
            + f", evaluated {first['evaluated_at']:%Y-%m-%d %H:%M} UTC"
        )
    else:
        where = "not evaluated yet (hps eval --scorers hps,hpsv2,pickscore,aesthetic,clip)"
    columns = ("scorer", "model", "choices", "top1", "top1_low", "top1_high", "top1_chance",
               "pairwise", "pairwise_low", "pairwise_high", "pairwise_chance", "pairs")  # fmt: skip
    return (
        "scorer_agreement",
        "Reward models' agreement with the choices",
        "How often each reward model's highest-scored image is the one the person chose "
        "(top-1) and prefers the chosen image in each pair (pairwise), with 95 % intervals "
        "(resampling prompts; Wilson's for top-1 when each prompt has one choice) against "
        f"each one's chance (top-1: the mean of 1/K; pairwise: 50 %), {where}.",
        lambda: scorer_agreement_plot(rows),
        [{c: r[c] for c in columns} for r in _with_chances(rows)],
    )


def live_by_recipe_plot(rows: Rows) -> bytes:
    """The live win rate of each adaptation recipe's adapters (rows: `live_by_recipe_table`)."""
    if not rows:
        return _empty("decided A/B rounds")
    fig, [ax] = _figure()
    x = list(range(len(rows)))
    rates = [r["win_rate"] for r in rows]
    errors = [[r["win_rate"] - r["low"] for r in rows], [r["high"] - r["win_rate"] for r in rows]]
    ax.bar(x, rates, yerr=errors, capsize=6, color="tab:blue", alpha=0.7)
    ax.set_xticks(x, [f"{r['recipe']}\n{r['versions']} adapters, {r['rounds']} rounds"
                      for r in rows])  # fmt: skip
    ax.axhline(0.5, color="gray", linestyle=":")
    ax.set_ylim(0, 1)
    ax.set_ylabel("live win rate")
    return _png(fig)


def live_by_recipe_table(rows: Rows) -> Rows:
    """`db.stats.live_by_recipe`'s rows with each win rate and its Wilson 95% interval."""
    table = []
    for r in rows:
        low, high = wilson_interval(r["wins"], r["rounds"])
        table.append({**r, "win_rate": r["wins"] / r["rounds"], "low": low, "high": high})
    return table


def live_by_recipe_section(rows: Rows) -> tuple[str, str, str, Callable[[], bytes], Rows]:
    """The report's "live win rate by recipe" section: which adaptation recipe (the paper's
    hps, or Diffusion-DPO) makes the adapters people prefer (rows: `db.stats.live_by_recipe`)."""
    table = live_by_recipe_table(rows)
    return (
        "live_by_recipe",
        "Live win rate by adaptation recipe",
        "Share of decided A/B rounds (balanced rounds the requester decided by picking) won by "
        "the adapters each recipe made, against the incumbent each was tested against, all "
        "its adapters together, with its 95 % Wilson interval; 0.5 is a draw.",
        lambda: live_by_recipe_plot(table),
        table,
    )


def scorer_words(classifier: Rows) -> str:
    """Which classifier's scores the HPS plot shows, in words."""
    if not classifier:
        return "the configured HPS model (no registered classifier version scored images)"
    c = classifier[0]
    if c["status"] == "serving":
        return f"classifier {c['name']} (serving)"
    return f"classifier {c['name']} ({c['status']}; the serving one has scored no image yet)"


# -- tables -------------------------------------------------------------------------------


def _with_rate(rows: Rows, hits: str, total: str, name: str) -> Rows:
    out = []
    for r in rows:
        low, high = wilson_interval(r[hits], r[total]) if r[total] else (None, None)
        rate = r[hits] / r[total] if r[total] else None
        out.append({**r, name: rate, "low": low, "high": high})
    return out


def live_table(tests: list[dict[str, Any]]) -> Rows:
    """Per adapter and planned look: where it is, what decides, what was seen."""
    table = []
    for test in tests:
        design: Design = test["design"]
        taken = {look.look: look for look in test["looks"]}
        decided = len(test["outcomes"])
        for k, rounds, promote, retire in boundaries(design):
            look = taken.get(k)
            wins = sum(test["outcomes"][:rounds]) if decided >= rounds else None
            table.append({
                "adapter": test["version"], "status": test["status"],
                "against": test["opponent"], "look": f"{k} of {design.looks}",
                "at rounds": rounds, "confidence": f"{design.look_confidence:.2%}",
                "promote if wins ≥": promote, "retire if wins ≤": retire,
                "decided so far": decided,
                "wins at the look": look.wins if look else wins,
                "interval": f"{look.low:.3f}–{look.high:.3f}" if look else None,
                "taken": "yes" if look else "not yet" if decided < rounds else "next review",
            })  # fmt: skip
    return table


def position_table(rows: Rows) -> Rows:
    totals: dict[int, int] = defaultdict(int)
    for r in rows:
        totals[r["shown"]] += r["picks"]
    out = []
    for r in rows:
        low, high = wilson_interval(r["picks"], totals[r["shown"]])
        out.append({**r, "share": r["picks"] / totals[r["shown"]], "low": low, "high": high,
                    "chance": 1 / r["shown"]})  # fmt: skip
    return out


def agreement_table(rows: Rows) -> Rows:
    return [
        {
            "period": r["period"], "rounds": r["rounds"],
            "with requester": _share(r["with_requester"], r["other_votes"]),
            "chance": _share(r["chance_votes"], r["other_votes"]),
            "other votes": r["other_votes"],
            "pairs agreeing": _share(r["agreeing_pairs"], r["pairs"]),
            "pairs chance": _share(r["chance_pairs"], r["pairs"]),
            "pairs": r["pairs"],
        }
        for r in rows
    ]  # fmt: skip


def _share(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def activity_table(rows: Rows) -> Rows:
    by_bucket: dict[int, dict[str, Any]] = {}
    for r in rows:
        entry = by_bucket.setdefault(r["bucket"], {"how many": bucket_label(r["bucket"])})
        entry[f"users by {r['measure']}"] = r["users"]
        entry[f"{r['measure']} in all"] = r["amount"]
    return [by_bucket[b] for b in sorted(by_bucket)]


def build_plots(data: Data) -> list[Plot]:
    span: reports.Span = data["span"]
    period = span.period
    choices = data["choices_over_time"]
    flagged = sum(r["flagged"] for r in choices)
    rounds = data["rounds_over_time"]
    specs: list[tuple[str, str, str, Callable[[], bytes], Rows]] = [
        ("choices_over_time", f"Choices per {period}",
         f"Every choice (requesters' and other voters'), by UTC {period} and verdict; "
         f"{flagged:,} flagged choice(s) of shadow-banned users left out (their own column).",
         lambda: choices_over_time(choices, period),
         [{k: r[k] for k in ("period", "choices", "picks", "ties", "nones", "flagged")}
          for r in choices]),
        ("choosers_over_time", f"Requesters' and others' choices per {period}",
         "The requester's own choice is the training signal; others vote on rounds they did "
         "not ask for (flagged choices left out).",
         lambda: choosers_over_time(choices, period),
         [{k: r[k] for k in ("period", "requester_choices", "other_choices")} for r in choices]),
        ("rounds_by_status", "Rounds by status", "The rounds of the range by their status now.",
         lambda: rounds_by_status(data["rounds_by_status"]), data["rounds_by_status"]),
        ("time_to_ready", f"Time from request to images, per {period}",
         "Seconds from a /dream to its images, median and 90th percentile, of the rounds "
         f"requested in each {period} (none ready: a gap).",
         lambda: time_to_ready(rounds, period),
         [{k: r[k] for k in ("period", "rounds", "median_seconds", "p90_seconds")}
          for r in rounds]),
        ("failure_rate", f"Failed rounds, per {period}",
         "Share of the rounds that finished (ready, closed or failed) that failed, with its 95 % "
         "Wilson interval.",
         lambda: failure_rate(rounds, period),
         _with_rate([{k: r[k] for k in ("period", "finished", "failed")} for r in rounds],
                    "failed", "finished", "failure rate")),
        ("classifier_accuracy", "Classifier accuracy by version",
         "Top-1 accuracy of predicting the chosen image on held-out test examples, with its "
         "95 % interval, against the untuned CLIP the version started from (same examples).",
         lambda: classifier_accuracy(data["classifier_accuracy"]), data["classifier_accuracy"]),
        ("live_test", "Live A/B tests of SD adapters, as the platform decides them",
         "The running win rate of each adapter against the version it was shown with, over "
         "its decided A/B rounds (balanced rounds the requester decided by picking), with the "
         "band at each look's corrected confidence (Bonferroni over the planned looks), the "
         "planned looks (grey lines) with the win rates that promote (▼) or retire (▲) there, "
         "and the looks the review took (○). A plain 95 % interval checked again and again "
         "would decide on chance alone sooner or later: the review looks only at the planned "
         "looks, each once.",
         lambda: live_tests(data["live_tests"]), live_table(data["live_tests"])),
        ("hps_scores", "HPS of versions shown side by side (A/B rounds)",
         "Like for like: in the balanced A/B rounds that showed two versions (as many images "
         "each, for the same prompt), each version's mean HPS in the round, all scored by "
         f"{scorer_words(data['score_classifier'])}; other classifiers' scores are on other "
         "scales and left out (as are safety-flagged images). The table's mean difference is "
         "per round (second minus first), with its 95 % interval over rounds.",
         lambda: ab_scores(data["ab_score_histograms"], data["ab_score_summary"]),
         _difference_table(data["ab_score_summary"])),
        ("position_bias", "Pick rate by position (position bias)",
         "Requesters' picks by the position of the picked image, for each number of images "
         "shown (rounds that held none back), with 95 % Wilson intervals; dotted: chance. A "
         "position picked more than chance whatever the images is a bias, not a preference.",
         lambda: position_bias(data["position_bias"]), position_table(data["position_bias"])),
        ("agreement", f"Agreement between people on the same round, per {period}",
         "Of the other voters who picked an image in a round where the requester picked, the "
         "share who picked the requester's; and of all pairs of people who picked in the "
         "same round, the share who picked the same image; dotted: what chance alone gives "
         "(1/K). By the period the round was requested in; a period without such rounds is "
         "a gap.",
         lambda: agreement(data["agreement"], period), agreement_table(data["agreement"])),
        ("user_activity", "How active people are",
         "Users (neither banned, shadow-banned nor forgotten) by how many choices they made "
         "and how many rounds they asked for, in ranges doubling in size (log scale).",
         lambda: user_activity(data["user_activity"]), activity_table(data["user_activity"])),
        ("top_hps_picked", "How often the top-scored image was picked, per classifier",
         "Requester picks in rounds whose shown images were all scored by one classifier: the "
         "share that picked the image it scored highest (the classifier's live top-1 "
         "accuracy), with its 95 % Wilson interval, against chance (the mean of 1/K).",
         lambda: top_hps_picked(data["top_hps_picked"]),
         _with_rate(data["top_hps_picked"], "top_picked", "picks", "share")),
        scorer_agreement_section(data.get("scorer_agreement", [])),
        live_by_recipe_section(data.get("live_by_recipe", [])),
    ]  # fmt: skip
    return [
        Plot(name, title, caption, draw(), table) for name, title, caption, draw, table in specs
    ]


def _difference_table(summary: Rows) -> Rows:
    out = []
    for s in summary:
        half = 1.96 * s["sd_difference"] / math.sqrt(s["rounds"]) if s["rounds"] > 1 else None
        out.append({**{k: v for k, v in s.items() if k != "sd_difference"},
                    "low": s["mean_difference"] - half if half is not None else None,
                    "high": s["mean_difference"] + half if half is not None else None})  # fmt: skip
    return out


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.3f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, date):
        return value.isoformat()
    return html.escape(str(value))


def _table(rows: Rows) -> str:
    if not rows:
        return "<p class='none'>No data.</p>"
    columns = list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_cell(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>HPS platform report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 64rem; color: #222; }}
figure {{ margin: 2rem 0; }} img.plot {{ max-width: 100%; }}
table {{ border-collapse: collapse; font-size: 0.8rem; margin-top: 0.5rem; }}
th, td {{ border: 1px solid #ccc; padding: 0.2rem 0.5rem; text-align: right; }}
th {{ background: #f3f3f3; }} .none {{ color: #777; }}
</style></head>
<body data-plots="{count}">
<h1>HPS platform report</h1>
<p>Generated {generated}, for {range}, by {period}. Scores are HPS = 100 × cosine similarity;
intervals are 95 % unless said otherwise; flagged choices are never counted.</p>
{sections}
<script>
// Lets a headless browser (and a curious reader) check that every plot decoded.
window.addEventListener("load", function () {{
  var plots = document.querySelectorAll("img.plot");
  var decoded = 0;
  plots.forEach(function (img) {{ if (img.complete && img.naturalWidth > 0) decoded++; }});
  document.body.setAttribute("data-plots-decoded", String(decoded));
}});
</script>
</body></html>
"""


def render_html(plots: list[Plot], generated: datetime, span: reports.Span) -> str:
    sections = "\n".join(
        f"<section id='{p.name}'><h2>{html.escape(p.title)}</h2><figure>"
        f"<img class='plot' alt='{html.escape(p.title)}' "
        f"src='data:image/png;base64,{base64.b64encode(p.png).decode()}'>"
        f"<figcaption>{html.escape(p.caption)}</figcaption></figure>{_table(p.table)}</section>"
        for p in plots
    )
    last = span.until - timedelta(microseconds=1)
    return _PAGE.format(
        count=len(plots),
        generated=generated.strftime("%Y-%m-%d %H:%M UTC"),
        range=f"{span.since:%Y-%m-%d} to {last:%Y-%m-%d} (UTC)",
        period=span.period,
        sections=sections,
    )


def write_report(data: Data, out: Path, now: datetime | None = None) -> Path:
    """Write `report.html` and one PNG per plot into `out`; returns the HTML's path."""
    out.mkdir(parents=True, exist_ok=True)
    plots = build_plots(data)
    for plot in plots:
        write_atomically(out / f"{plot.name}.png", plot.png)
    page = out / "report.html"
    write_atomically(page, render_html(plots, now or datetime.now(UTC), data["span"]).encode())
    return page
