"""`hps store check|migrate|gc`: the store of images and model versions.

`hps store migrate --to s3://bucket/prefix` copies this machine's store (the folder,
`data_dir` by default) into an object store: every image the database still uses (an image
row, or a pending job's `image_keys`; its bytes checked against the SHA-256 its name
carries; files nothing uses, such as a forgotten person's, are left behind), and every
registered model version whose files are here, in
the store's layout (`models/<name>/<sha256>/`) or in the folder a version was registered
in before the store existed (`models/<name>/`, its weights' sha256 checked against the
registry's). Objects already there are skipped, so it resumes where an interrupted run
stopped and may be run again; a version is published whole (its manifest last) or not at
all. Without `--to` it moves those older model folders into the configured local store's
layout, which `hps db upgrade` and `hps serve` also do.

`hps store gc` lists the images in the configured store that nothing uses; with `--delete`
it deletes them, each under its key lock and checked again first (`db.images`), so that an
upload whose row is being committed keeps its file.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from cli.common import console, database, err_console, fail, run, settings

if TYPE_CHECKING:
    from db.models import ModelVersion
    from hps.settings import Settings
    from hps.storage import Storage
    from hps.store import ObjectStore

app = typer.Typer(help="The store of images and model versions.", no_args_is_help=True)

_IMAGE = re.compile(r"^[0-9a-f]{2}/[0-9a-f]{2}/([0-9a-f]{64})\.[a-z0-9]{1,5}$")
PUBLISHED_KINDS = ("classifier", "sd_adapter")
BATCH = 1000  # keys per query, and per deletion transaction of `gc`


@dataclass
class Report:
    images_copied: int = 0
    images_there: int = 0
    images_corrupt: list[str] = field(default_factory=list)
    images_unused: int = 0  # files no image row or pending job names: not copied
    models_copied: list[str] = field(default_factory=list)
    models_there: int = 0
    models_missing: list[str] = field(default_factory=list)  # no files on this machine
    models_corrupt: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [
            f"images: {self.images_copied} copied, {self.images_there} already there"
            + (f", {len(self.images_corrupt)} corrupt (not copied)" if self.images_corrupt else "")
            + (f", {self.images_unused} unused (not copied)" if self.images_unused else ""),
            f"model versions: {len(self.models_copied)} copied, {self.models_there} already there"
            + (f", {len(self.models_missing)} not on this machine" if self.models_missing else "")
            + (f", {len(self.models_corrupt)} corrupt" if self.models_corrupt else ""),
        ]
        out += [
            f"  corrupt image (its bytes do not match its name): {k}" for k in self.images_corrupt
        ]
        out += [f"  not on this machine: {k}" for k in self.models_missing]
        out += [f"  corrupt, not copied: {k}" for k in self.models_corrupt]
        return out


def copy_images(source: Path, target: Storage, used: set[str], report: Report) -> None:
    """The image files under `source/images` whose keys are in `used` into the target's
    `images/`, verified; those there already (same size) are skipped."""
    from hps.store import LocalObjects

    src = LocalObjects(source / "images")
    dst = target.objects.within("images")
    if isinstance(dst, LocalObjects) and dst.root.resolve() == src.root.resolve():
        return  # the same folder
    for key, size in src.listing():
        match = _IMAGE.match(key)
        if match is None:
            continue
        if key not in used:
            report.images_unused += 1
            continue
        if dst.size(key) == size:
            report.images_there += 1
            continue
        data = src.get(key)
        if hashlib.sha256(data).hexdigest() != match[1]:
            report.images_corrupt.append(key)
            continue
        dst.put(key, data)
        report.images_copied += 1


def _legacy_weights(folder: Path, sha256: str) -> str | None:
    """The file of a pre-store version folder whose sha256 is the registry's."""
    from hps.files import sha256_file

    if not folder.is_dir():
        return None
    for path in sorted(folder.iterdir()):
        weights = path.is_file() and path.suffix in (".safetensors", ".bin", ".pt", ".pth")
        if weights and sha256_file(path) == sha256:
            return path.name
    return None


def copy_models(
    source: Path, target: Storage, versions: list[ModelVersion], report: Report
) -> None:
    """Publish every version in `versions` whose files are under `source` and are not in
    the target yet."""
    from hps.files import remove
    from hps.model_store import MANIFEST, is_key, verify
    from hps.store import LocalObjects, StoreError

    in_place = isinstance(target.objects, LocalObjects) and (
        target.objects.root.resolve() == source.resolve()
    )
    for version in versions:
        key = version.artifact
        if version.kind not in PUBLISHED_KINDS or not is_key(key):
            continue
        try:
            there = target.models.manifest(key) is not None
        except StoreError:  # damaged in the target: published again below
            there = False
        if there:
            report.models_there += 1
            continue
        name, sha = key.split("/")[1:]
        folder, legacy = source / key, False
        manifest_file = folder / MANIFEST
        if manifest_file.is_file():
            import json

            manifest = json.loads(manifest_file.read_text())
            if verify(folder, manifest):
                report.models_corrupt.append(key)
                continue
            weights = manifest["weights"]
        else:
            folder, legacy = source / "models" / name, True
            found = _legacy_weights(folder, sha)
            if found is None:
                report.models_missing.append(key)
                continue
            weights = found
        try:
            published = target.models.publish(folder, name, weights)
        except StoreError as exc:
            err_console.print(f"{key}: {exc}", highlight=False)
            report.models_corrupt.append(key)
            continue
        assert published.key == key
        report.models_copied.append(key)
        if legacy and in_place:  # the folder's files now live in models/<name>/<sha256>/
            for path in folder.iterdir():
                if path.name != sha:
                    remove(path)


def image_keys(objects: ObjectStore) -> list[str]:
    """The image keys in a store's `images/` (other files there are not images)."""
    return [key for key, _ in objects.within("images").listing() if _IMAGE.match(key)]


async def _used(config: Settings, keys: list[str]) -> set[str]:
    """The keys among `keys` that an image row or a pending job's `image_keys` names."""
    from db import images

    unused: set[str] = set()
    async with database(config) as pool:
        for start in range(0, len(keys), BATCH):
            unused.update(await images.unreferenced_keys(pool, keys[start : start + BATCH]))
    return set(keys) - unused


async def _versions(config: Settings) -> list[ModelVersion]:
    from db import models

    async with database(config) as pool:
        return [v for kind in PUBLISHED_KINDS for v in await models.list_versions(pool, kind)]


def adopt_local_models(config: Settings) -> None:
    """Move model folders registered before the store existed into the configured local
    store's layout (`hps db upgrade`, `hps serve`); nothing to do for an object store."""
    from hps.storage import storage

    store = storage(config)
    folder = config.store_folder
    if folder is None or not (folder / "models").is_dir():
        return
    report = Report()
    copy_models(folder, store, run(_versions(config)), report)
    if report.models_copied:
        console.print(
            f"moved {len(report.models_copied)} model version(s) into the store's layout "
            f"(models/<name>/<sha256>/) in {folder}",
            highlight=False,
        )


@app.command("check")
def check() -> None:
    """Check that the configured store answers (bucket, credentials, endpoint)."""
    from hps.storage import storage

    store = storage(settings())
    store.check()  # StoreUnavailable: one line, naming the setting (see `hps` main)
    console.print(f"{store.objects.description}: reachable", highlight=False)


@app.command("migrate")
def migrate(
    to: str | None = typer.Option(
        None,
        "--to",
        help="Target store: s3://bucket/prefix (endpoint, region and credentials from the "
        "store.* settings) or a folder; default: the configured store.",
    ),
    source: Path | None = typer.Option(
        None,
        "--from",
        help="The local store folder to copy (default: the configured one, or data_dir).",
    ),
) -> None:
    """Copy this machine's images and model versions into a store: resumable, idempotent,
    verifying hashes."""
    from pydantic import ValidationError

    from hps.storage import storage
    from hps.store import LocalObjects

    config = settings()
    src = source or config.store_folder or config.data_dir
    if to is not None:
        try:
            config = config.with_changes("store", url=to)
        except ValidationError as exc:
            raise fail(f"--to: {exc.errors()[0]['msg']}") from None
    target = storage(config)
    target.check()
    console.print(f"copying {src} into {target.objects.description}", highlight=False)
    report = Report()
    used = run(_used(config, image_keys(LocalObjects(src))))
    copy_images(src, target, used, report)
    copy_models(src, target, run(_versions(config)), report)
    for line in report.lines():
        console.print(line, highlight=False)
    if report.images_corrupt or report.models_corrupt:
        raise typer.Exit(1)


@app.command("gc")
def gc(
    delete: bool = typer.Option(
        False, "--delete", help="Delete them (default: only list what would be deleted)."
    ),
) -> None:
    """The images in the configured store that nothing uses (no image row, no pending
    job): listed, or deleted with --delete. Model versions are left alone."""
    from hps.storage import storage

    config = settings()
    store = storage(config)
    store.check()
    keys = image_keys(store.objects)
    unused = sorted(set(keys) - run(_used(config, keys)))
    if not delete:
        for key in unused:
            console.print(f"unused: {key}", highlight=False)
        console.print(
            f"{len(unused)} of {len(keys)} images in {store.objects.description} are unused; "
            "`hps store gc --delete` deletes them",
            highlight=False,
        )
        return
    from db.locks import LockTimeout

    try:
        deleted = run(_delete_unused(config, store, unused))
    except LockTimeout as exc:  # a round committing holds some keys for longer
        raise fail(
            f"{exc} (That batch only: the images deleted before it stay deleted; run "
            "`hps store gc --delete` again.)"
        ) from None
    console.print(
        f"deleted {deleted} unused images of {len(keys)} in {store.objects.description}",
        highlight=False,
    )


async def _delete_unused(config: Settings, store: Storage, keys: list[str]) -> int:
    from db import images

    deleted = 0
    async with database(config) as pool:
        for start in range(0, len(keys), BATCH):
            batch = keys[start : start + BATCH]
            # Checked again under the keys' locks: one named meanwhile is kept.
            deleted += await images.delete_unreferenced(pool, batch, store.images.delete)
    return deleted
