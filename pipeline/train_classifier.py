"""Training the HPS classifier as a recipe of stages (`pipeline.runs`), run by `hps train`
and the `train_classifier` job: examples → train (`pipeline.trainer`) → eval (the new model,
the untuned CLIP it started from and the serving model, on the same test examples) →
register (promoted if it beats the serving model: `pipeline.registry.PromotionGate`).

A run lives in `runs_dir/<name>/`: `manifest.json` (see `pipeline.runs`), `config.json`
(the recipe, the data, the example counts, the model to beat), `examples.jsonl` (every
example with its split, so that a resumed run tests on the same examples), `metrics.jsonl`
and `checkpoints/` (see `pipeline.trainer`; a crash mid-training trains again from the
start) and `eval.json` (the test reports). Under `accelerate launch` every process takes the
examples and trains (`hps train` agrees on the run's name first); the main one writes the
run's folder, evaluates and registers.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from db import models
from db.connect import Executor
from hps.files import remove, write_atomically, write_json_atomically
from hps.settings import Settings, TrainSettings
from hps.storage import storage
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
from pipeline.handlers import JobContext
from pipeline.hps_model import HPSModel
from pipeline.model_files import WEIGHTS_FILE, ModelSpec
from pipeline.runs import Outcome, Recipe, Run, RunContext, Stage, register, run_job
from pipeline.trainer import train

KIND = registry.KIND
EXAMPLES_FILE = "examples.jsonl"


class TooFewExamples(Exception):
    """Not enough training examples; the message says how many and how many are needed."""


class TrainOutcome(Outcome):
    @property
    def counts(self) -> dict[str, int]:
        return self.stages.get("examples", {}).get("counts", dict.fromkeys(SPLITS, 0))

    @property
    def reports(self) -> dict[str, dict[str, Any]]:
        """Test reports by label: "new", "untuned", and the serving model's label."""
        return self.stages.get("eval", {}).get("reports", {})

    @property
    def serving_label(self) -> str:
        return str(self.run.data["serving"]["label"])

    @property
    def summary(self) -> str:
        new = self.reports.get("new", {})
        parts = [f"Trained classifier {self.run.name} on {self.counts['train']} examples."]
        if new.get("n"):
            parts.append(
                f"Test top-1 {_pct(new)} on {new['n']} choices "
                f"(untuned CLIP {_pct(self.reports.get('untuned'))}, "
                f"serving {self.serving_label} {_pct(self.reports.get(self.serving_label))}, "
                f"chance {new['chance']:.1%})."
            )
        if self.version is not None:
            verb = (
                "Promoted to serving" if self.passed else "Registered as a candidate, not promoted"
            )
            parts.append(f"{verb}: {self.reason}.")
        return " ".join(parts)

    def as_result(self) -> dict[str, Any]:
        return {
            "status": "trained",
            "summary": self.summary,
            "promoted": self.passed,
            "reason": self.reason,
            "version": self.version.name if self.version else None,
            "run_dir": str(self.run.path),
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


async def examples_of(
    db: Executor | None, recipe: TrainSettings, data: Path | None
) -> list[Example]:
    """Examples from a dataset folder, or else from the database."""
    fractions = {"val_fraction": recipe.val_fraction, "test_fraction": recipe.test_fraction}
    if data is not None:
        return examples_from_folder(
            data, include_contains_name=recipe.include_contains_name, **fractions
        )
    assert db is not None
    return await examples_from_db(
        db,
        all_choosers=recipe.choosers == "all",
        include_contains_name=recipe.include_contains_name,
        **fractions,
    )


async def load_examples(
    db: Executor | None,
    recipe: TrainSettings,
    data: Path | None,
    settings: Settings,
    copies: Path,
) -> tuple[list[Example], Reader]:
    """`examples_of`, and how to read their images: a dataset folder's files, else the
    store's (`Storage.reader`: an object store's through copies in `copies`, which the
    caller removes when done)."""
    examples = await examples_of(db, recipe, data)
    return examples, read_path if data is not None else await image_reader(
        settings, examples, copies
    )


async def image_reader(settings: Settings, examples: Sequence[Example], copies: Path) -> Reader:
    """How training and evaluation read the examples' images (`Storage.reader`)."""
    return await storage(settings).reader((k for e in examples for k in e.images), copies)


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


async def open_run(
    db: Executor | None,
    settings: Settings,
    name: str,
    *,
    data: Path | None = None,
    base: ModelSpec | None = None,
) -> Run:
    """The run `name`, or a new one training `base` (default: the configured architecture
    and pretrained weights) on `data` (default: the database's choices), to beat the model
    serving now."""
    run = Run.open(settings.runs_dir / models.check_name(name))
    if run is not None:
        return run
    if db is not None and await models.get(db, name) is not None:
        raise models.ModelError(f"a model version named {name} exists; choose another name")
    spec, label, version = await registry.serving_model(db, settings)
    m = settings.models
    return Run.create(
        settings.runs_dir / name,
        name=name,
        recipe={
            "train": settings.train.model_dump(mode="json"),
            "base": (base or ModelSpec(m.hps_arch, m.hps_pretrained or None)).as_dict(),
            "data": str(data) if data else None,
        },
        serving={"spec": spec.as_dict(), "label": label, "version_id": version and version.id},
    )


def _data(rc: RunContext) -> Path | None:
    data = rc.run.recipe["data"]
    return Path(data) if data else None


async def _reader(rc: RunContext, examples: Sequence[Example]) -> Reader:
    return read_path if _data(rc) else await image_reader(rc.settings, examples, rc.image_copies)


def _examples(rc: RunContext) -> list[Example]:
    """The run's examples: those the examples stage took in this process, else its file."""
    if "examples" not in rc.cache:
        lines = (rc.run.path / EXAMPLES_FILE).read_text().splitlines()
        rc.cache["examples"] = [
            Example(**{**record, "images": tuple(record["images"])})
            for record in map(json.loads, lines)
        ]
    return rc.cache["examples"]


async def take_examples(rc: RunContext) -> dict[str, Any]:
    """The examples (the database's choices, or a dataset folder's), split by prompt;
    `TooFewExamples` if the train split is too small."""
    examples = await examples_of(rc.pool, rc.options, _data(rc))
    counts = split_counts(examples)
    needed = rc.options.min_examples
    if counts["train"] < needed:
        raise TooFewExamples(
            f"{counts['train']} training examples, fewer than the {needed} needed "
            f"(val {counts['val']}, test {counts['test']})"
        )
    rc.cache["examples"] = examples
    if rc.main:
        lines = "".join(json.dumps(asdict(e)) + "\n" for e in examples)
        write_atomically(rc.run.path / EXAMPLES_FILE, lines)
        config = {**rc.run.recipe, "name": rc.run.name, "examples": counts}
        config["serving"] = rc.run.data["serving"]["label"]
        write_json_atomically(rc.run.path / "config.json", config)
    return {"counts": counts}


async def train_model(rc: RunContext) -> dict[str, Any]:
    """Train from the base (an earlier attempt's checkpoints are dropped: training starts
    over). The serving model loads first: if it cannot, this fails before hours of
    training."""
    serving, base = rc.run.data["serving"], ModelSpec(**rc.run.recipe["base"])
    if rc.main:
        remove(rc.run.path / "checkpoints")
        remove(rc.run.path / "metrics.jsonl")
    examples = _examples(rc)
    read = await _reader(rc, examples)

    def work() -> Any:
        spec = ModelSpec(**serving["spec"])
        if rc.main and spec != base:
            rc.cache["serving"] = registry.load_spec(spec, rc.settings, serving["label"])
        return train(
            examples,
            read,
            rc.options,
            base=base,
            out_dir=rc.run.path,
            device=rc.device,
            progress=rc.progress,
            context=rc.context,
            cancelled=rc.cancelled,
        )

    result = await asyncio.to_thread(work)
    record = {k: getattr(result, k) for k in TRAINING_FIGURES}
    best = str(result.best.resolve()) if result.best else None  # the epoch's folder
    return {**record, "best": best, "initial": result.initial}


TRAINING_FIGURES = ("best_epoch", "best_val_top1", "epochs_run", "steps", "stopped_early")


async def evaluate_run(rc: RunContext) -> dict[str, Any]:
    """The new model, the untuned base (its report from before training) and the serving
    model on the test examples; when the base serves, its report is reused."""
    trained, serving = rc.run.stage("train"), rc.run.data["serving"]
    spec = ModelSpec(**serving["spec"])
    test = [e for e in _examples(rc) if e.split == "test"]
    read = await _reader(rc, test)

    def work() -> dict[str, dict[str, Any]]:
        new = HPSModel.load(trained["best"], device=rc.device, name=rc.run.name)
        candidates: dict[str, HPSModel | dict[str, Any]] = {"new": new}
        if trained["initial"] is not None:
            candidates["untuned"] = trained["initial"]
        if spec == ModelSpec(**rc.run.recipe["base"]) and trained["initial"] is not None:
            candidates[serving["label"]] = trained["initial"]
        else:
            candidates[serving["label"]] = rc.cache.get("serving") or registry.load_spec(
                spec, rc.settings, serving["label"]
            )
        return evaluate_models(test, read, candidates, num_workers=rc.options.num_workers)

    reports = await asyncio.to_thread(work)
    write_json_atomically(rc.run.path / "eval.json", reports)
    return {"reports": reports}


def _gate(rc: RunContext) -> registry.PromotionGate:
    reports = rc.run.stage("eval")["reports"]
    serving = reports[rc.run.data["serving"]["label"]]
    return registry.PromotionGate(rc.settings, reports["new"], serving, rc.options.promote_margin)


async def register_model(rc: RunContext) -> dict[str, Any]:
    """Register the best checkpoint (its test report, the others compared with it, the
    training figures) and promote it if it beats the serving model."""
    trained, reports = rc.run.stage("train"), rc.run.stage("eval")["reports"]
    return await register(
        rc,
        Path(trained["best"]),
        weights=WEIGHTS_FILE,
        config={**rc.run.recipe["train"], "base": rc.run.recipe["base"]},
        metrics={
            "test": reports["new"],
            "compared": {label: r for label, r in reports.items() if label != "new"},
            "training": {
                **{k: trained[k] for k in TRAINING_FIGURES},
                "examples": rc.run.stage("examples")["counts"],
            },
        },
        parent_id=rc.run.data["serving"]["version_id"],
    )


CLASSIFIER = Recipe(
    kind=KIND,
    section="train",
    title="Classifier training",
    stages=(
        Stage("examples", take_examples, every_process=True),
        Stage("train", train_model, every_process=True),
        Stage("eval", evaluate_run),
        Stage("register", register_model),
    ),
    open=open_run,
    gate=_gate,
    outcome=TrainOutcome,
    passed="promoted",
    skip=(TooFewExamples,),
)


async def handle_train_classifier(ctx: JobContext) -> dict[str, Any]:
    """The `train_classifier` job: train on the database's choices, evaluate, register, and
    promote if better (see `pipeline.runs.run_job`)."""
    return await run_job(ctx, CLASSIFIER)
