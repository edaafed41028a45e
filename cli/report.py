"""`hps report`."""

from __future__ import annotations

import webbrowser
from datetime import UTC, datetime
from pathlib import Path

import typer

from cli.common import console, database, fail, run, settings


def _moment(text: str | None, option: str) -> datetime | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise fail(f"{option}: not a date or time (YYYY-MM-DD, or ISO 8601): {text!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def report(
    out: Path | None = typer.Argument(
        None, help="Folder to write into (default: <data_dir>/reports/<date and time>)."
    ),
    open_: bool = typer.Option(False, "--open", help="Open the page in a browser."),
    since: str | None = typer.Option(
        None, help="Only activity from this UTC date or time on (default: the first)."
    ),
    until: str | None = typer.Option(
        None, help="Only activity before this UTC date or time (default: after the last)."
    ),
    period: str = typer.Option(
        "auto",
        help="Aggregate series by day, week or month (auto: by day up to two months, by "
        "week up to two years, else by month).",
    ),
) -> None:
    """Write an HTML report with plots (choices and voters over time, rounds, time to images
    and failures, classifier accuracy, live A/B tests with their planned looks, HPS of A/B
    versions like for like, position bias, agreement, user activity, top-HPS picks) that
    opens in a browser with no server."""
    from db.reports import PERIODS
    from pipeline.report import collect, write_report

    if period not in ("auto", *PERIODS):
        raise fail(f"--period: one of auto, {', '.join(PERIODS)}, not {period!r}")
    start, end = _moment(since, "--since"), _moment(until, "--until")
    if start is not None and end is not None and start >= end:
        raise fail("--since must come before --until")
    config = settings()
    now = datetime.now(UTC)
    folder = out or config.data_dir / "reports" / now.strftime("%Y-%m-%d-%H%M%S")

    async def _data():  # type: ignore[no-untyped-def]
        async with database(config) as pool:
            return await collect(pool, config.adapt, period=period, since=start, until=end)

    page = write_report(run(_data()), folder, now)
    console.print(f"report written to {page}", highlight=False)
    if open_:
        webbrowser.open(page.resolve().as_uri())
