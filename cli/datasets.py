"""`hps import FOLDER` and `hps export OUT`: datasets in and out."""

from __future__ import annotations

from pathlib import Path

import typer

from cli.common import console, database, fail, run, settings


def import_(folder: Path = typer.Argument(..., help="An HPD-layout dataset folder.")) -> None:
    """Import the paper's HPD layout (preference_train.json, preference_test.json,
    preference_images/) as closed rounds with their picks, made by imported users
    (`import:<user_hash>`, never a Discord user); records of forgotten users are left out;
    safe to run again."""
    from hps.storage import storage
    from pipeline.data import DatasetError
    from pipeline.datasets import import_hpd

    config = settings()

    async def _import():  # type: ignore[no-untyped-def]
        async with database(config) as pool, pool.acquire() as conn:
            return await import_hpd(conn, storage(config).images, folder)

    try:
        report = run(_import())
    except DatasetError as exc:
        raise fail(str(exc)) from None
    forgotten = f", {report.forgotten} of forgotten users left out" if report.forgotten else ""
    console.print(
        f"{report.records} records: {report.imported} imported, {report.skipped} already there"
        + forgotten,
        highlight=False,
    )


def export(
    out: Path = typer.Argument(..., help="A new (or empty) folder to write."),
    fmt: str = typer.Option(
        "parquet",
        "--format",
        "-f",
        help="hpd (the paper's layout, requesters' picks), parquet (one row per choice), "
        "pickapic (Pick-a-Pic pairs with the images, a datasets folder) or hf (one row per "
        "choice with the images, a datasets folder).",
    ),
    choosers: str = typer.Option(
        "requester",
        "--choosers",
        help="requester (one choice per round) or all (not for hpd: its records are "
        "requesters' picks).",
    ),
    images: bool = typer.Option(
        False,
        "--images",
        help="parquet: write the image files beside it (images/<image key>). hpd, pickapic "
        "and hf always hold the images.",
    ),
    ties: str | None = typer.Option(
        None,
        "--ties",
        help="pickapic only: drop (default) leaves ties out; half writes each as 0.5/0.5 "
        "pairs, which PickScore trains as ties but Diffusion-DPO, unless its --dataset_name "
        "contains 'pickapic', trains as image 0 preferred.",
    ),
) -> None:
    """Export the choices (users pseudonymised; flagged, banned and forgotten users'
    choices left out). An option the format cannot honour is refused."""
    from hps.storage import storage
    from pipeline.data import DatasetError
    from pipeline.datasets import check_export_options, export_dataset

    config = settings()
    if choosers not in ("requester", "all"):
        raise fail("--choosers must be requester or all")
    try:  # before connecting: nothing is done for a refused combination
        check_export_options(fmt, all_choosers=choosers == "all", with_images=images, ties=ties)
    except DatasetError as exc:
        raise fail(str(exc)) from None

    async def _export():  # type: ignore[no-untyped-def]
        async with database(config) as pool, pool.acquire() as conn:
            return await export_dataset(
                conn,
                storage(config).images,
                out,
                fmt,
                all_choosers=choosers == "all",
                with_images=images,
                ties=ties,
                val_fraction=config.train.val_fraction,
                test_fraction=config.train.test_fraction,
            )

    try:
        report = run(_export())
    except DatasetError as exc:
        raise fail(str(exc)) from None
    splits = ""
    if report.splits is not None:
        splits = " (" + (", ".join(f"{s} {n}" for s, n in report.splits.items()) or "empty") + ")"
    console.print(
        f"{report.choices} choices exported as {report.rows} {report.format} rows to "
        f"{report.path}{splits}",
        highlight=False,
    )
