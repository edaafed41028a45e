"""`hps report`: one self-contained HTML page (plots embedded as PNG data URIs, tables of the
numbers under them) and the same plots as PNG files beside it. It opens in any browser with
no server. The data comes from the analysts' views (`db.reports`).

Plots: choices per day, rounds by status, classifier top-1 accuracy by version against the
untuned CLIP baseline, each SD adapter's cumulative live win rate over time with its 95 %
Wilson band, and the HPS distribution of the images each model version served, as scored by
one classifier (the serving one, else the latest that scored images; its name is in the
caption), since scores of different classifiers are on different scales.
"""

from __future__ import annotations

import base64
import html
import io
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: render to files only

import matplotlib.dates as mdates
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from hps.files import write_atomically
from pipeline.evaluate import wilson_interval

Rows = list[dict[str, Any]]


@dataclass(frozen=True)
class Plot:
    name: str  # file stem
    title: str
    caption: str
    png: bytes
    table: Rows


def _figure() -> tuple[Figure, Any]:
    fig, ax = plt.subplots(figsize=(7.5, 3.6), dpi=110)
    ax.grid(axis="y", alpha=0.3)
    return fig, ax


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _empty(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"No {what} yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def choices_per_day(rows: Rows) -> bytes:
    fig, ax = _figure()
    if not rows:
        _empty(ax, "choices")
        return _png(fig)
    days = [str(r["day"]) for r in rows]
    bottom = [0] * len(rows)
    for verdict, label in (("picks", "picked an image"), ("ties", "can't decide"),
                           ("nones", "none of these")):  # fmt: skip
        values = [r[verdict] for r in rows]
        ax.bar(days, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_ylabel("choices")
    ax.legend(frameon=False)
    ax.tick_params(axis="x", rotation=45)
    return _png(fig)


def rounds_by_status(rows: Rows) -> bytes:
    fig, ax = _figure()
    if not rows:
        _empty(ax, "rounds")
        return _png(fig)
    ax.bar([r["status"] for r in rows], [r["rounds"] for r in rows], color="tab:gray")
    ax.set_ylabel("rounds")
    return _png(fig)


def classifier_accuracy(rows: Rows) -> bytes:
    fig, ax = _figure()
    if not rows:
        _empty(ax, "evaluated classifier versions")
        return _png(fig)
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


def ab_win_rates(rows: Rows) -> bytes:
    fig, ax = _figure()
    if not rows:
        _empty(ax, "decided A/B rounds")
        return _png(fig)
    series: dict[str, Rows] = defaultdict(list)
    for r in rows:
        series[f"{r['version']} vs {r['opponent']}"].append(r)
    for label, points in series.items():
        days = [p["day"] for p in points]
        rates = [p["wins"] / p["rounds"] for p in points]
        bands = [wilson_interval(p["wins"], p["rounds"]) for p in points]
        (line,) = ax.plot(days, rates, marker="o", label=label)
        ax.fill_between(days, [b[0] for b in bands], [b[1] for b in bands],
                        alpha=0.2, color=line.get_color())  # fmt: skip
    ax.axhline(0.5, color="gray", linestyle=":")
    ax.set_ylim(0, 1)
    ax.set_ylabel("cumulative win rate")
    ax.xaxis.set_major_locator(mdates.DayLocator())
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%Y-%m-%d"))
    ax.legend(frameon=False, fontsize="small", loc="lower left")
    fig.autofmt_xdate()
    return _png(fig)


# -- Live win rate by adaptation recipe (issue 14): a separate plot, not yet among
# `build_plots`' (the report is being reworked); `db.stats.live_by_recipe` gives its rows.


def live_by_recipe(rows: Rows) -> Plot:
    """The live win rate of each adaptation recipe's adapters (hps, dpo) against their
    incumbents, with its Wilson 95% interval, as a plot with its table. `rows`: those of
    `db.stats.live_by_recipe` (recipe, versions, rounds, wins)."""
    table = []
    for r in rows:
        low, high = wilson_interval(r["wins"], r["rounds"])
        table.append({**r, "win_rate": r["wins"] / r["rounds"], "low": low, "high": high})
    fig, ax = _figure()
    if not table:
        _empty(ax, "decided A/B rounds")
    else:
        x = range(len(table))
        rates = [r["win_rate"] for r in table]
        errors = [
            [r["win_rate"] - r["low"] for r in table],
            [r["high"] - r["win_rate"] for r in table],
        ]
        ax.bar(x, rates, yerr=errors, capsize=6, color="tab:blue", alpha=0.7)
        labels = [f"{r['recipe']}\n{r['versions']} adapters, {r['rounds']} rounds" for r in table]
        ax.set_xticks(list(x), labels)
        ax.axhline(0.5, color="gray", linestyle=":")
        ax.set_ylim(0, 1)
        ax.set_ylabel("live win rate")
    caption = (
        "Share of decided A/B rounds (the requester picked an image) won by the adapters each "
        "recipe made, against the incumbent each was tested against, with its 95 % Wilson "
        "interval; 0.5 is a draw."
    )
    return Plot("live_by_recipe", "Live win rate by recipe", caption, _png(fig), table)


def score_histograms(rows: Rows, summary: Rows) -> bytes:
    fig, ax = _figure()
    if not rows:
        _empty(ax, "scored images")
        return _png(fig)
    lo, hi = rows[0]["lo"], rows[0]["hi"]
    bins = max(r["bin"] for r in rows)
    width = (hi - lo) / bins
    means = {s["version"]: s["mean_hps"] for s in summary}
    by_version: dict[str, dict[int, int]] = defaultdict(dict)
    for r in rows:
        by_version[r["version"]][r["bin"]] = r["images"]
    for version, counts in by_version.items():
        total = sum(counts.values())
        edges = [lo + i * width for i in range(bins + 1)]
        density = [counts.get(i + 1, 0) / total for i in range(bins)]
        ax.stairs(density, edges, label=f"{version} (mean {means[version]:.2f})", linewidth=1.5)
    ax.set_xlabel("HPS (100 × cosine)")
    ax.set_ylabel("share of images")
    ax.legend(frameon=False, fontsize="small")
    return _png(fig)


def scorer_words(classifier: Rows) -> str:
    """Which classifier's scores the HPS plot shows, in words."""
    if not classifier:
        return "the configured HPS model (no registered classifier version scored images)"
    c = classifier[0]
    if c["status"] == "serving":
        return f"classifier {c['name']} (serving)"
    return f"classifier {c['name']} ({c['status']}; the serving one has scored no image yet)"


def build_plots(data: dict[str, Rows]) -> list[Plot]:
    win_rates = []
    for r in data["ab_win_rate_over_time"]:
        low, high = wilson_interval(r["wins"], r["rounds"])
        win_rates.append({**r, "win_rate": r["wins"] / r["rounds"], "low": low, "high": high})
    specs: list[tuple[str, str, str, Callable[[], bytes], Rows]] = [
        ("choices_per_day", "Choices per day",
         "Every recorded choice (requesters' and other voters'), by UTC day and verdict.",
         lambda: choices_per_day(data["choices_per_day"]), data["choices_per_day"]),
        ("rounds_by_status", "Rounds by status", "All rounds by their current status.",
         lambda: rounds_by_status(data["rounds_by_status"]), data["rounds_by_status"]),
        ("classifier_accuracy", "Classifier accuracy by version",
         "Top-1 accuracy of predicting the chosen image on held-out test examples, with its "
         "95 % interval, against the untuned CLIP the version started from (same examples).",
         lambda: classifier_accuracy(data["classifier_accuracy"]), data["classifier_accuracy"]),
        ("ab_win_rates", "Live win rate of SD adapters",
         "Cumulative share of decided A/B rounds (the requester picked an image) in which the "
         "adapter's image was picked, with its 95 % Wilson band; 0.5 is a draw.",
         lambda: ab_win_rates(data["ab_win_rate_over_time"]), win_rates),
        ("hps_scores", "HPS of served images by model version",
         "Distribution of the HPS of the images each model version served, all scored by "
         f"{scorer_words(data.get('score_classifier', []))}; other classifiers' scores are on "
         "other scales and left out (as are safety-flagged images).",
         lambda: score_histograms(data["score_histograms"], data["score_summary"]),
         data["score_summary"]),
    ]  # fmt: skip
    return [
        Plot(name, title, caption, draw(), table) for name, title, caption, draw, table in specs
    ]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}"
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
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; color: #222; }}
figure {{ margin: 2rem 0; }} img.plot {{ max-width: 100%; }}
table {{ border-collapse: collapse; font-size: 0.85rem; margin-top: 0.5rem; }}
th, td {{ border: 1px solid #ccc; padding: 0.2rem 0.5rem; text-align: right; }}
th {{ background: #f3f3f3; }} .none {{ color: #777; }}
</style></head>
<body data-plots="{count}">
<h1>HPS platform report</h1>
<p>Generated {generated}. Scores are HPS = 100 × cosine similarity; intervals are 95 %.</p>
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


def render_html(plots: list[Plot], generated: datetime) -> str:
    sections = "\n".join(
        f"<section id='{p.name}'><h2>{html.escape(p.title)}</h2><figure>"
        f"<img class='plot' alt='{html.escape(p.title)}' "
        f"src='data:image/png;base64,{base64.b64encode(p.png).decode()}'>"
        f"<figcaption>{html.escape(p.caption)}</figcaption></figure>{_table(p.table)}</section>"
        for p in plots
    )
    return _PAGE.format(
        count=len(plots), generated=generated.strftime("%Y-%m-%d %H:%M UTC"), sections=sections
    )


def write_report(data: dict[str, Rows], out: Path, now: datetime | None = None) -> Path:
    """Write `report.html` and one PNG per plot into `out`; returns the HTML's path."""
    out.mkdir(parents=True, exist_ok=True)
    plots = build_plots(data)
    for plot in plots:
        write_atomically(out / f"{plot.name}.png", plot.png)
    page = out / "report.html"
    write_atomically(page, render_html(plots, now or datetime.now(UTC)).encode())
    return page
