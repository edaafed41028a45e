"""Training the HPS classifier end to end, as `hps train` and the `train_classifier` job:
examples → train (`pipeline.trainer`) → evaluate the new model, the untuned CLIP it started
from and the serving model on the same test examples → register → promote if better.

A run lives in `runs_dir/<name>/`: `config.json`, `metrics.jsonl`, `checkpoints/` (see
`pipeline.trainer`) and `eval.json` (the test reports). Under `accelerate launch` every
process trains; the main one names the run (`agree_run_name`), writes its folder,
evaluates and registers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from db import models, promotion
from db.connect import Executor
from hps.settings import Settings
from hps.store import LocalImageStore
from pipeline import registry
from pipeline.data import (
    SPLITS,
    Example,
    Reader,
    examples_from_db,
    examples_from_folder,
    read_path,
    split_counts,
)
from pipeline.evaluate import evaluate
from pipeline.handlers import JobContext, PermanentError
from pipeline.hps_model import HPSModel
from pipeline.trainer import TrainConfig, TrainResult, process_state, train

log = logging.getLogger(__name__)


class TooFewExamples(Exception):
    """Not enough training examples; the message says how many and how many are needed."""


class RunExists(Exception):
    """A run of that name exists already; the message says where."""


def agree_run_name(runs_dir: Path, name: str | None, device: str = "auto") -> str:
    """The run's name (`name`, else `classifier-<UTC time>`), the same in every process of
    `accelerate launch`: the main process picks it and checks that no run has it, the
    others receive its answer (each would stamp its own time, and a check racing the main
    process's `mkdir` would find the folder). Raises `RunExists` in every process.
    `device` is the training's (`TrainConfig.device`)."""
    from accelerate.utils import broadcast_object_list

    state = process_state(device)
    answer: list[str | None] = [name or f"classifier-{datetime.now(UTC):%Y%m%d-%H%M%S}", None]
    if state.is_main_process and (runs_dir / str(answer[0])).exists():
        answer[1] = f"a run named {answer[0]} exists in {runs_dir}; choose another --name"
    if state.num_processes > 1:
        broadcast_object_list(answer, from_process=0)
    if answer[1] is not None:
        raise RunExists(answer[1])
    return str(answer[0])


@dataclass
class TrainOutcome:
    name: str
    run_dir: Path
    counts: dict[str, int]
    reports: dict[str, dict[str, Any]]  # label → test report ("new", "untuned", serving)
    serving_label: str
    version: Any = None  # the registered ModelVersion
    promoted: bool = False
    reason: str = ""

    @property
    def summary(self) -> str:
        new = self.reports.get("new", {})
        parts = [f"Trained classifier {self.name} on {self.counts['train']} examples."]
        if new.get("n"):
            parts.append(
                f"Test top-1 {_pct(new)} on {new['n']} choices "
                f"(untuned CLIP {_pct(self.reports.get('untuned'))}, "
                f"serving {self.serving_label} {_pct(self.reports.get(self.serving_label))}, "
                f"chance {new['chance']:.1%})."
            )
        if self.version is not None:
            verb = (
                "Promoted to serving"
                if self.promoted
                else "Registered as a candidate, not promoted"
            )
            parts.append(f"{verb}: {self.reason}.")
        return " ".join(parts)

    def as_result(self) -> dict[str, Any]:
        return {
            "status": "trained",
            "summary": self.summary,
            "promoted": self.promoted,
            "reason": self.reason,
            "version": self.version.name if self.version else None,
            "run_dir": str(self.run_dir),
            "examples": self.counts,
            "metrics": {label: _brief(r) for label, r in self.reports.items()},
        }


def _pct(report: dict[str, Any] | None) -> str:
    if not report or report.get("top1") is None:
        return "n/a"
    return f"{report['top1']:.1%}"


def _brief(report: dict[str, Any]) -> dict[str, Any]:
    keys = ("model", "n", "top1", "top1_ci", "pairwise", "pairwise_ci", "chance")
    return {k: report.get(k) for k in keys}


async def load_examples(
    db: Executor | None, settings: Settings, data: Path | None
) -> tuple[list[Example], Reader]:
    """Examples from a dataset folder, or else from the database; and how to read images."""
    t = settings.train
    fractions = {"val_fraction": t.val_fraction, "test_fraction": t.test_fraction}
    if data is not None:
        examples = examples_from_folder(
            data, include_contains_name=t.include_contains_name, **fractions
        )
        return examples, read_path
    assert db is not None
    examples = await examples_from_db(
        db,
        all_choosers=t.choosers == "all",
        include_contains_name=t.include_contains_name,
        **fractions,
    )
    return examples, LocalImageStore(settings.images_dir).get


def evaluate_models(
    examples: Sequence[Example],
    read: Reader,
    candidates: dict[str, HPSModel | dict[str, Any]],
    *,
    batch_size: int = 32,
    num_workers: int = 0,
) -> dict[str, dict[str, Any]]:
    """Test reports by label; a dict value is a report already made (reused as is)."""
    return {
        label: m
        if isinstance(m, dict)
        else evaluate(m, examples, read, batch_size=batch_size, num_workers=num_workers)
        for label, m in candidates.items()
    }


async def run_training(
    db: Executor | None,
    settings: Settings,
    *,
    config: TrainConfig,
    name: str,
    data: Path | None = None,
    register: bool = True,
    promote: bool = True,
    actor: str | None = None,
    progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    cancelled: threading.Event | None = None,
) -> TrainOutcome:
    """Examples → train → evaluate (new, untuned base, serving) → register → promote.
    Raises `TooFewExamples` before doing anything when the train split is too small."""
    models.check_name(name)
    if register and db is not None and await models.get(db, name) is not None:
        raise models.ModelError(f"a model version named {name} exists; choose another name")
    examples, read = await load_examples(db, settings, data)
    counts = split_counts(examples)
    needed = settings.train.min_examples
    if counts["train"] < needed:
        raise TooFewExamples(
            f"{counts['train']} training examples, fewer than the {needed} needed "
            f"(val {counts['val']}, test {counts['test']})"
        )
    if db is not None:
        serving_spec, serving_label, serving_version = await registry.serving_model(db, settings)
    else:
        serving_spec, serving_label, serving_version = (
            registry.configured_spec(settings),
            promotion.configured_label(settings),
            None,
        )

    # Under `accelerate launch` every process trains; the main one writes the run folder
    # (the others write nothing there), evaluates and registers.
    main = process_state(config.device).is_main_process
    run_dir = settings.runs_dir / name
    if main:
        run_dir.mkdir(parents=True)
        (run_dir / "config.json").write_text(
            json.dumps(
                {
                    "name": name,
                    "config": config.as_dict(),
                    "data": str(data) if data else "database",
                    "examples": counts,
                    "serving": serving_label,
                    "started_at": datetime.now(UTC).isoformat(),
                },
                indent=2,
            )
            + "\n"
        )
    test = [e for e in examples if e.split == "test"]

    def work() -> tuple[TrainResult, dict[str, dict[str, Any]]]:
        # The serving model loads first: if it cannot, fail before hours of training. When
        # it is the base the run starts from, the run's own evaluation of it is reused.
        serving = None
        if main and serving_spec != config.base:
            serving = registry.load_spec(serving_spec, settings, serving_label)
        result = train(
            examples,
            config,
            run_dir,
            read,
            progress=progress,
            on_epoch=on_epoch,
            cancelled=cancelled,
        )
        if not main:
            return result, {}
        assert result.best is not None
        new = HPSModel.load(result.best, device=settings.models.device, name=name)
        candidates: dict[str, HPSModel | dict[str, Any]] = {"new": new}
        if result.initial is not None:
            candidates["untuned"] = result.initial
        candidates[serving_label] = (
            serving or result.initial or registry.load_spec(serving_spec, settings, serving_label)
        )
        reports = evaluate_models(
            test,
            read,
            candidates,
            batch_size=config.eval_batch_size,
            num_workers=config.num_workers,
        )
        return result, reports

    result, reports = await asyncio.to_thread(work)
    outcome = TrainOutcome(name, run_dir, counts, reports, serving_label)
    if not main:
        return outcome
    (run_dir / "eval.json").write_text(json.dumps(reports, indent=2) + "\n")
    if register and db is not None:
        metrics = {
            "test": reports["new"],
            "compared": {label: r for label, r in reports.items() if label != "new"},
            "training": {
                "best_epoch": result.best_epoch,
                "best_val_top1": result.best_val_top1,
                "epochs_run": result.epochs_run,
                "steps": result.steps,
                "stopped_early": result.stopped_early,
                "examples": counts,
            },
        }
        assert result.best is not None
        outcome.version = await registry.register_classifier(
            db,
            settings,
            result.best.resolve(),
            name=name,
            metrics=metrics,
            config=config.as_dict(),
            parent_id=serving_version.id if serving_version else None,
            actor=actor,
        )
        if promote:
            outcome.promoted, outcome.reason = await registry.promote_if_better(
                db,
                outcome.version,
                reports["new"],
                reports[serving_label],
                margin=settings.train.promote_margin,
                actor=actor,
            )
        else:
            outcome.reason = "promotion not requested"
    return outcome


async def handle_train_classifier(ctx: JobContext) -> dict[str, Any]:
    """The `train_classifier` job: train on the database's choices, evaluate, register, and
    promote if better. Payload keys named like `train` settings override them (e.g.
    {"epochs": 2}). Skips, saying why, when there are too few examples."""
    from pydantic import ValidationError

    payload = ctx.job.payload if isinstance(ctx.job.payload, dict) else {}
    # Other keys (requested_by, a reason) describe the request, not the training.
    options = {k: v for k, v in payload.items() if k in type(ctx.settings.train).model_fields}
    try:
        settings = ctx.settings.with_changes("train", **options)
    except ValidationError as exc:
        raise PermanentError(f"invalid train_classifier options: {exc}") from None
    config = TrainConfig.from_settings(settings)
    name = f"classifier-job{ctx.job.id}"
    actor = f"job:{ctx.job.id}"
    registered = await models.get(ctx.pool, name)
    if registered is not None:  # an earlier attempt got as far as registering
        return (await _finish_registered(ctx.pool, settings, registered, actor)).as_result()
    # Otherwise a retried attempt starts its run again from scratch.
    stale_run = settings.runs_dir / name
    if stale_run.exists():
        shutil.rmtree(stale_run)
    try:
        outcome = await run_training(
            ctx.pool,
            settings,
            config=config,
            name=name,
            actor=actor,
            progress=False,
            on_epoch=lambda record: ctx.log.info("epoch %(epoch)d done: %(val_top1)s", record),
            cancelled=ctx.cancelled,
        )
    except TooFewExamples as exc:
        return {
            "status": "skipped",
            "summary": f"Classifier training skipped: {exc}.",
            "promoted": False,
            "reason": str(exc),
        }
    ctx.log.info("%s", outcome.summary)
    return outcome.as_result()


async def _finish_registered(
    db: Executor, settings: Settings, version: models.ModelVersion, actor: str
) -> TrainOutcome:
    """The outcome of a run registered by an earlier attempt of the same job: promote it
    now if that attempt did not and its recorded evaluation beats the serving model."""
    _, serving_label, _ = await registry.serving_model(db, settings)
    compared = version.metrics.get("compared", {})
    outcome = TrainOutcome(
        version.name,
        settings.runs_dir / version.name,
        version.metrics.get("training", {}).get("examples", dict.fromkeys(SPLITS, 0)),
        {"new": version.metrics.get("test", {}), **compared},
        serving_label,
        version,
    )
    if version.status == "serving":
        outcome.promoted, outcome.reason = True, "promoted by an earlier attempt"
    elif version.status != "candidate":
        outcome.reason = f"it is {version.status}"
    elif serving_label not in compared:
        outcome.reason = f"the serving model changed to {serving_label} since its evaluation"
    else:
        outcome.promoted, outcome.reason = await registry.promote_if_better(
            db,
            version,
            outcome.reports["new"],
            compared[serving_label],
            margin=settings.train.promote_margin,
            actor=actor,
        )
    return outcome
