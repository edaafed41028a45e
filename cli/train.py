"""`hps train` and `hps eval`: the HPS classifier's training and evaluation."""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from cli.common import console, database, fail, run, settings
from cli.options import apply_changes, settings_options
from hps.settings import Settings


class RunExists(Exception):
    """A run of that name exists already; the message says where."""


def agree_run_name(runs_dir: Path, name: str | None, device: str = "auto") -> str:
    """The run's name (`name`, else `classifier-<UTC time>`), the same in every process of
    `accelerate launch`: the main process picks it and checks that no run has it, the
    others receive its answer (each would stamp its own time, and a check racing the main
    process's `mkdir` would find the folder). Raises `RunExists` in every process.
    `device` is the training's (`models.device`)."""
    from accelerate.utils import broadcast_object_list

    from pipeline.devices import process_state

    state = process_state(device)
    answer: list[str | None] = [name or f"classifier-{datetime.now(UTC):%Y%m%d-%H%M%S}", None]
    if state.is_main_process and (runs_dir / str(answer[0])).exists():
        answer[1] = f"a run named {answer[0]} exists in {runs_dir}; choose another --name"
    if state.num_processes > 1:
        broadcast_object_list(answer, from_process=0)
    if answer[1] is not None:
        raise RunExists(answer[1])
    return str(answer[0])


@settings_options("train")
def train(
    data: Path | None = typer.Option(
        None, "--data", help="An HPD-layout dataset folder (default: the choices database)."
    ),
    name: str | None = typer.Option(None, "--name", help="Run and version name."),
    base: str | None = typer.Option(
        None, "--base", help="Model to start from (default: models.hps_arch)."
    ),
    pretrained: str | None = typer.Option(
        None, "--pretrained", help="Its pretrained tag or file (default: models.hps_pretrained)."
    ),
    register: bool = typer.Option(True, "--register/--no-register", help="Add to the registry."),
    promote: bool = typer.Option(True, "--promote/--no-promote", help="Promote if better."),
    changes: dict[str, Any] | None = None,
) -> None:
    """Train an HPS classifier on the choices (the paper's recipe; defaults: the train settings),
    evaluate it, register it and promote it if it beats the serving model."""
    from db.models import ModelError
    from pipeline.data import DatasetError
    from pipeline.hps_model import ModelLoadError, ModelSpec
    from pipeline.runs import run_recipe
    from pipeline.train_classifier import CLASSIFIER, TooFewExamples

    config = apply_changes(settings(), "train", changes or {})
    m = config.models
    start = None  # the configured base (models.hps_arch, hps_pretrained)
    if base is not None:
        start = ModelSpec(base, pretrained or None)
    elif pretrained is not None:
        start = ModelSpec(m.hps_arch, pretrained or None)
    try:  # one name for all the processes of `accelerate launch`
        run_name = agree_run_name(config.runs_dir, name, m.device)
    except RunExists as exc:
        raise fail(str(exc)) from None

    async def _train() -> Any:
        options = {"name": run_name, "data": data, "base": start, "actor": "cli",
                   "until": None if register else "eval", "gate": promote}  # fmt: skip
        if data is not None and not register:  # no database needed
            return await run_recipe(CLASSIFIER, None, config, **options)
        async with database(config) as pool:
            return await run_recipe(CLASSIFIER, pool, config, **options)

    try:
        outcome = run(_train())
    except (TooFewExamples, DatasetError, ModelLoadError, ModelError, ValueError) as exc:
        raise fail(str(exc)) from None
    if not outcome.main:  # another process of `accelerate launch`: the main one reports
        return
    print_reports(outcome.reports)
    console.print(f"run folder: {outcome.run.path}", highlight=False)
    console.print(outcome.summary, highlight=False)


def evaluate(
    model: str | None = typer.Option(
        None,
        "--model",
        "-m",
        help="A registry version (default: the newest classifier), a saved model folder, a "
        "weights file or an open_clip architecture.",
    ),
    data: Path | None = typer.Option(
        None, "--data", help="An HPD-layout dataset folder (default: the choices database)."
    ),
    split: str = typer.Option("test", "--split", help="test, val or train."),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="JSON report (default: runs_dir/eval/<model>-<time>.json)."
    ),
    record: bool = typer.Option(
        True, "--record/--no-record", help="Store the results in the version's metrics."
    ),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    scorers: str | None = typer.Option(
        None,
        "--scorers",
        help="Compare reward models instead, comma-separated (hps,hpsv2,pickscore,aesthetic,"
        "clip): each one's agreement with the choices, stored for `hps report` and /scorers. "
        "hps is --model (default: the serving classifier); the others' weights are the "
        "scorers settings. --data may also be a Pick-a-Pic folder (--split test_unique, ...).",
    ),
) -> None:
    """Top-1 and pairwise accuracy of predicting the choices of a held-out split, for the
    model, the untuned CLIP it started from, and the serving model; with --scorers, for
    each reward model named."""
    from db.models import ModelError
    from pipeline.data import DatasetError, is_pickapic
    from pipeline.hps_model import ModelLoadError
    from pipeline.scorers import UnknownScorer, parse_names

    config = settings()
    pickapic = data is not None and is_pickapic(data)
    if split not in ("test", "val", "train") and not pickapic:
        raise fail("--split must be test, val or train (or a split of a Pick-a-Pic folder)")
    stamp = f"{datetime.now(UTC):%Y%m%d-%H%M%S}"
    try:
        if scorers is not None:
            names = parse_names(scorers)
            reports = run(_agreement(config, names, model, data, split, record, batch_size))
            target = f"scorers-{stamp}"
        else:
            if pickapic:
                raise DatasetError("a Pick-a-Pic folder is evaluated with --scorers")
            reports, target = run(_evaluate(config, model, data, split, record, batch_size))
            target = f"{target}-{stamp}"
    except (DatasetError, ModelLoadError, ModelError, UnknownScorer) as exc:
        raise fail(str(exc)) from None
    if scorers is not None:
        print_agreement(reports)
    else:
        print_reports(reports)
    path = output or config.runs_dir / "eval" / f"{target}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"split": split, "reports": reports}, indent=2) + "\n")
    console.print(f"report: {path}", highlight=False)


@contextlib.asynccontextmanager
async def _image_copies(config: Settings) -> AsyncIterator[Path]:
    """A folder for copies of an object store's images that an evaluation reads
    (`Storage.reader`), removed afterwards, whatever happened."""
    config.cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".images-", dir=config.cache_dir) as folder:
        yield Path(folder)


async def _subject(pool: Any, config: Settings, model: str | None) -> tuple[Any, str, Any]:
    """The spec, label and registry version (if any) of `--model`: a path or architecture,
    or a registry version (default: the newest classifier)."""
    from db import models
    from pipeline import registry
    from pipeline.hps_model import ModelSpec

    if model is not None and registry.is_model_spec(model):
        return ModelSpec(model), model, None
    version = await (models.get(pool, model) if model else _newest(pool))
    if version is None or version.kind != registry.KIND:
        raise models.ModelError(
            f"no classifier version {model!r}"
            if model
            else "no classifier version is registered yet: give --model"
        )
    return ModelSpec(version.artifact), version.name, version


async def _agreement(
    config: Settings,
    names: list[str],
    model: str | None,
    data: Path | None,
    split: str,
    record: bool,
    batch_size: int,
) -> dict[str, dict[str, Any]]:
    """Each scorer's agreement with the choices of `split` (one decoding pass for all),
    stored in `scorer_agreement` unless not `record`."""
    import asyncio

    from db import models
    from db.scorers import record_agreement
    from pipeline import registry
    from pipeline.data import examples_from_pickapic, is_pickapic
    from pipeline.evaluate import evaluate_scorers
    from pipeline.scorers import load_scorers
    from pipeline.train_classifier import load_examples

    async with database(config) as pool, _image_copies(config) as copies:
        if data is not None and is_pickapic(data):
            examples, read = examples_from_pickapic(data, split)
        else:
            db = None if data else pool
            examples, read = await load_examples(db, config.train, data, config, copies)
            examples = [e for e in examples if e.split == split]
        if not examples:
            raise models.ModelError(f"the {split} split has no examples")
        if model is not None:
            spec, label, _ = await _subject(pool, config, model)
        else:  # ours as it serves
            spec, label, _ = await registry.serving_model(pool, config)

        def work() -> dict[str, dict[str, Any]]:
            hps = registry.load_spec(spec, config, label) if "hps" in names else None
            scorers = load_scorers(names, config, hps=hps)
            return evaluate_scorers(scorers, examples, read, batch_size=batch_size)

        reports = await asyncio.to_thread(work)
        if record:
            source = "choices" if data is None else str(await asyncio.to_thread(data.absolute))
            await record_agreement(pool, source=source, split=split, reports=reports)
    return reports


async def _evaluate(
    config: Settings,
    model: str | None,
    data: Path | None,
    split: str,
    record: bool,
    batch_size: int,
) -> tuple[dict[str, dict[str, Any]], str]:
    import asyncio

    import torch

    from db import models
    from pipeline import registry
    from pipeline.hps_model import ModelLoadError
    from pipeline.train_classifier import evaluate_models, load_examples

    async with database(config) as pool, _image_copies(config) as copies:
        spec, label, version = await _subject(pool, config, model)
        db = None if data else pool
        examples, read = await load_examples(db, config.train, data, config, copies)
        examples = [e for e in examples if e.split == split]
        if not examples:
            raise models.ModelError(f"the {split} split has no examples")
        serving_spec, serving_label, _ = await registry.serving_model(pool, config)

        def work() -> dict[str, dict[str, Any]]:
            subject = registry.load_spec(spec, config, label)
            torch.manual_seed(config.train.seed)  # a randomly initialised base is reproducible
            candidates = {label: subject}
            base = registry.untuned_spec(subject, spec, config)
            if base is not None:
                try:
                    untuned = registry.load_spec(base, config)
                except ModelLoadError as exc:
                    untuned, why = None, str(exc)
                else:
                    why = (
                        f"{label} is not the architecture {base.describe()} (set "
                        "models.hps_arch and hps_pretrained to the CLIP it was tuned from)"
                    )
                if untuned is not None and registry.same_architecture(untuned, subject):
                    candidates["untuned"] = untuned
                else:
                    console.print(f"no untuned baseline: {why}", highlight=False)
            if serving_label != label:
                candidates[serving_label] = registry.load_spec(serving_spec, config, serving_label)
            return evaluate_models(examples, read, candidates, batch_size=batch_size)

        reports = await asyncio.to_thread(work)
        if record and version is not None:
            await models.merge_metrics(
                pool,
                version.id,
                {
                    split: reports[label],
                    "compared": {k: v for k, v in reports.items() if k != label},
                    "evaluated_at": datetime.now(UTC).isoformat(),
                }
                if split == "test"
                else {split: reports[label]},
            )
    return reports, label.replace("/", "_").replace(":", "_").replace(" ", "_")


async def _newest(pool: Any) -> Any:
    from db import models

    versions = await models.list_versions(pool, "classifier")
    return max(versions, key=lambda v: v.id) if versions else None


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _ci(report: dict[str, Any], key: str) -> str:
    low, high = report.get(f"{key}_ci") or (None, None)
    if report.get(key) is None:
        return "n/a"
    return f"{report[key]:.1%} [{low:.1%}, {high:.1%}]"


def print_agreement(reports: dict[str, dict[str, Any]]) -> None:
    """Each scorer's agreement with the choices (one row per scorer)."""
    table = Table(title="Agreement with people's choices (95% intervals)")
    for column in ("scorer", "model", *ACCURACY_COLUMNS):
        table.add_column(column, justify="left" if column in ("scorer", "model") else "right")
    for name, r in reports.items():
        table.add_row(name, r["model"], *_accuracy_cells(r))
    console.print(table)


# Each measure's chance beside it: top-1's is 1/K (the mean over the choices), pairwise's 50%.
ACCURACY_COLUMNS = ("choices", "top-1", "top-1 chance", "pairwise", "pairwise chance", "pairs")


def _accuracy_cells(r: dict[str, Any]) -> list[str]:
    return [
        str(r["n"]), _ci(r, "top1"), _pct(r["chance"]), _ci(r, "pairwise"),
        _pct(0.5 if r.get("pairwise") is not None else None), str(r["pairwise_n"]),
    ]  # fmt: skip


def print_reports(reports: dict[str, dict[str, Any]]) -> None:
    """The accuracy table (one row per model) and the per-K breakdown."""
    table = Table(title="Predicting the person's choice (95% intervals)")
    for column in ("model", *ACCURACY_COLUMNS):
        table.add_column(column, justify="left" if column == "model" else "right")
    for label, r in reports.items():
        table.add_row(label, *_accuracy_cells(r))
    console.print(table)
    ks = sorted({int(k) for r in reports.values() for k in r["per_k"]})
    if len(ks) > 1:
        per_k = Table(title="Top-1 by number of images shown (K)")
        per_k.add_column("K", justify="right")
        per_k.add_column("choices", justify="right")
        for label in reports:
            per_k.add_column(label, justify="right")
        per_k.add_column("top-1 chance", justify="right")
        for k in ks:
            cells = [reports[label]["per_k"].get(str(k)) for label in reports]
            n = next((c["n"] for c in cells if c), 0)
            per_k.add_row(
                str(k), str(n), *[_ci(c, "top1") if c else "n/a" for c in cells], _pct(1 / k)
            )
        console.print(per_k)
