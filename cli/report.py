"""`hps report`."""

from __future__ import annotations

import webbrowser
from datetime import UTC, datetime
from pathlib import Path

import typer

from cli.common import console, database, run, settings


def report(
    out: Path | None = typer.Argument(
        None, help="Folder to write into (default: <data_dir>/reports/<date and time>)."
    ),
    open_: bool = typer.Option(False, "--open", help="Open the page in a browser."),
) -> None:
    """Write an HTML report with plots (choices, rounds, classifier accuracy, live A/B win
    rates, HPS of served images) that opens in a browser with no server."""
    from db.reports import report_data
    from pipeline.report import write_report

    config = settings()
    now = datetime.now(UTC)
    folder = out or config.data_dir / "reports" / now.strftime("%Y-%m-%d-%H%M%S")

    async def _data():  # type: ignore[no-untyped-def]
        async with database(config) as pool:
            return await report_data(pool)

    page = write_report(run(_data()), folder, now)
    console.print(f"report written to {page}", highlight=False)
    if open_:
        webbrowser.open(page.resolve().as_uri())
