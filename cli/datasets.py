"""`hps import FOLDER` and `hps export OUT`: datasets in and out."""

from __future__ import annotations

from pathlib import Path

import typer

from cli.common import console, database, fail, run, settings


def import_(folder: Path = typer.Argument(..., help="An HPD-layout dataset folder.")) -> None:
    """Import the paper's HPD layout (preference_train.json, preference_test.json,
    preference_images/) as closed rounds with their picks; safe to run again."""
    from hps.store import LocalImageStore
    from pipeline.data import DatasetError
    from pipeline.datasets import import_hpd

    config = settings()

    async def _import():  # type: ignore[no-untyped-def]
        async with database(config) as pool, pool.acquire() as conn:
            return await import_hpd(conn, LocalImageStore(config.images_dir), folder)

    try:
        report = run(_import())
    except DatasetError as exc:
        raise fail(str(exc)) from None
    console.print(
        f"{report.records} records: {report.imported} imported, {report.skipped} already there",
        highlight=False,
    )


def export(
    out: Path = typer.Argument(..., help="A new (or empty) folder to write."),
    fmt: str = typer.Option(
        "parquet",
        "--format",
        "-f",
        help="hpd, parquet (one row per choice), pickapic (pairs) or hf (a Hugging Face "
        "datasets folder with the images).",
    ),
    choosers: str = typer.Option(
        "requester", "--choosers", help="requester (one choice per round) or all."
    ),
    images: bool = typer.Option(
        False, "--images", help="pickapic: embed the image bytes as jpg_0/jpg_1."
    ),
) -> None:
    """Export the choices (users pseudonymised; flagged, banned and forgotten users'
    choices left out)."""
    from hps.store import LocalImageStore
    from pipeline.data import DatasetError
    from pipeline.datasets import export_dataset

    config = settings()
    if choosers not in ("requester", "all"):
        raise fail("--choosers must be requester or all")

    async def _export():  # type: ignore[no-untyped-def]
        async with database(config) as pool, pool.acquire() as conn:
            return await export_dataset(
                conn,
                LocalImageStore(config.images_dir),
                out,
                fmt,
                all_choosers=choosers == "all",
                with_images=images,
                val_fraction=config.train.val_fraction,
                test_fraction=config.train.test_fraction,
            )

    try:
        report = run(_export())
    except DatasetError as exc:
        raise fail(str(exc)) from None
    console.print(
        f"{report.choices} choices exported as {report.rows} {report.format} rows to {report.path}",
        highlight=False,
    )
