"""The paper's SD adaptation as a recipe of stages (`pipeline.runs`), run by `hps adapt
run|label|train` and the `adapt_sd` job when `adapt.recipe = hps` (`pipeline.adapt.recipes`):

prompts → samples (generate + score) → label (+ the fine-tuning set) → train → eval →
register (+ the gate: A/B testing or retired). A run lives in `runs_dir/<name>/`:

    manifest.json   the recipe, the versions it started from, each finished stage
    prompts.json    training and held-out prompts
    samples.jsonl   every generated image: prompt, seed, file, HPS, blurry, flagged
    samples/        the images (JPEG 95)
    labels.jsonl    the positives and negatives with their softmax share
    finetune.jsonl  the fine-tuning set (file, caption, kind)
    train/          metrics.jsonl, checkpoints/, validation/, adapter/
    eval/           pairs.jsonl and the paired images

Resuming (a retried job, or the same `--name` again) skips the finished stages, makes only
the samples not recorded yet, fine-tunes on from the latest checkpoint, and evaluates only
the held-out pairs not recorded yet. Nothing is registered before the end: the adapter
folder is copied into `models_dir/<name>` and then registered, gated and put into testing
(or retired) in one transaction (`pipeline.runs.register`). So a crash anywhere
leaves the serving versions untouched and no version registered, and a crash after that
transaction is recognised on retry by the version's name.

`EVAL` and `register_adapter` serve any recipe that makes an `sd_adapter`: one whose train
stage records its `adapter` folder, whose `prompts.json` holds held-out prompts, and whose
settings have `AdaptSettings`'s identifier, seed and offline-evaluation fields.
`evaluate_offline` is the one offline evaluation, of a run's adapter and of a registered
version (`hps adapt eval`).
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from db import models
from db.connect import transaction
from hps.settings import AdaptSettings, Settings
from hps.storage import storage
from pipeline import registry
from pipeline.adapt import dataset as data
from pipeline.adapt.evaluate import JudgeUnavailable, OfflineGate, evaluate_adapter, load_judges
from pipeline.adapt.label import label_samples
from pipeline.adapt.prompts import PromptFileError, PromptSplit, read_prompt_file, sample_prompts
from pipeline.adapt.samples import SAMPLES_FILE, generate_samples, read_samples
from pipeline.generate import SAMPLING_KEYS, SamplingParams, adapter_name, load_version
from pipeline.runs import (
    Outcome,
    Recipe,
    Resources,
    Run,
    RunContext,
    RunError,
    Stage,
    register,
)

if TYPE_CHECKING:
    import asyncpg

KIND = "sd_adapter"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
PROMPTS_FILE = "prompts.json"
LABELS_FILE = "labels.jsonl"
TRAIN_DIR = "train"
EVAL_DIR = "eval"


class NothingToDo(Exception):
    """Too little data to adapt on (too few prompts, an empty fine-tuning set); says why."""


# Errors a person causes through the configuration or the data they point at.
USER_ERRORS = (
    NothingToDo,
    PromptFileError,
    data.DatasetError,
    RunError,
    models.ModelError,
    JudgeUnavailable,
)


class AdaptOutcome(Outcome):
    """What an adaptation run came to. Each recipe says what its stages did (`figures`,
    `metrics`); the verdict and the job result are the same for all."""

    title = "SD adaptation"

    @property
    def status(self) -> str:
        return "registered" if self.version is not None else "stopped"

    def figures(self) -> list[str]:
        parts = []
        samples = self.stages.get("samples", {})
        label = self.stages.get("label", {})
        if label:
            parts.append(
                f"{label['prompts']} prompts, {label['images']} images ({label['blurry']} "
                f"blurry, {label['nsfw']} flagged) → {label['positives']} positive, "
                f"{label['negatives']} negative, {label['regularization']} regularization."
            )
        elif samples:
            parts.append(f"{samples['images']} images sampled.")
        train = self.stages.get("train", {})
        if train:
            parts.append(
                f"LoRA r{self.run.recipe['adapt']['rank']}, {train['steps']} steps (batch "
                f"{train['total_batch_size']}): probe loss {train['probe_loss']:.4f} "
                f"(base {train['probe_loss_base']:.4f})."
            )
        return parts

    def metrics(self) -> dict[str, Any]:
        label = self.stages.get("label", {})
        return {"positives": label.get("positives"), "negatives": label.get("negatives")}

    @property
    def summary(self) -> str:
        parts = [f"{self.title} run {self.run.name}:", *self.figures()]
        if self.version is not None:
            verdict = "In A/B testing" if self.passed else "Retired"
            parts.append(f"Registered {self.version.name}. {verdict}: {self.reason}.")
        elif self.status == "stopped":
            parts.append(f"Stopped after the {self.run.last_stage} stage.")
        return " ".join(parts)

    def as_result(self) -> dict[str, Any]:
        train = self.stages.get("train", {})
        offline = self.stages.get("eval", {}).get("report", {})
        metrics = {
            **self.metrics(),
            "steps": train.get("steps"),
            "offline_win_rate": offline.get("win_rate"),
            "offline_hps_gain": offline.get("hps_gain"),
            "offline_judges": {
                name: judged.get("win_rate") for name, judged in offline.get("judges", {}).items()
            }
            or None,
        }
        return {
            "status": self.status,
            "summary": self.summary,
            "recipe": self.run.recipe["adapt"].get("recipe", "hps"),
            "version": self.version.name if self.version else None,
            "testing": self.passed,
            "reason": self.reason,
            "run_dir": str(self.run.path),
            "metrics": {k: v for k, v in metrics.items() if v is not None},
        }


def check_inputs(recipe: AdaptSettings) -> None:
    """Read the prompt file and the regularization index before any work, so that a
    mistake in them stops the run before it starts (raises what reading them raises)."""
    if recipe.prompt_file is not None:
        read_prompt_file(recipe.prompt_file)
    if recipe.regularization_data is not None:
        data.regularization_items(recipe.regularization_data, recipe.regularization_max)


async def open_run(pool: asyncpg.Pool, settings: Settings, name: str) -> Run:
    """The run `name`, created (recipe and starting versions fixed) if it does not exist."""
    run = Run.open(settings.runs_dir / models.check_name(name))
    if run is not None:
        if not run.done("label"):
            check_inputs(AdaptSettings.model_validate(run.recipe["adapt"]))
        return run
    check_inputs(settings.adapt)
    return await create_adapter_run(pool, settings, name, recipe="hps")


async def create_adapter_run(
    pool: asyncpg.Pool, settings: Settings, name: str, *, recipe: str, **extra: Any
) -> Run:
    """A new run of an `sd_adapter` recipe (`recipe`, recorded as `adapt.recipe`), its
    recipe fixed (the adapt settings, the base model, the sampling parameters, and the
    `extra` inputs) with the versions it starts from: the base pipeline, the parent (the
    serving adapter, or the base) and the serving classifier that scores its evaluation."""
    if await models.get(pool, name) is not None:
        raise models.ModelError(f"a model version named {name} exists; choose another name")
    base = await models.ensure_base(pool, kind="sd_base", artifact=settings.generation.sd_model)
    parent = await models.serving(pool, KIND) or base
    _, classifier, _ = await registry.serving_model(pool, settings)
    g = settings.generation
    run = Run.create(
        settings.runs_dir / name,
        name=name,
        recipe={
            "adapt": {**settings.adapt.model_dump(mode="json"), "recipe": recipe},
            "sd_model": g.sd_model,
            "sampling": {key: getattr(g, key) for key in SAMPLING_KEYS},
            **extra,
        },
        base={"id": base.id, "name": base.name},
        parent={"id": parent.id, "name": parent.name, "kind": parent.kind},
        classifier=classifier,
    )
    run.save()
    return run


def sampling_of(run: Run) -> SamplingParams:
    return sampling_from(run.recipe["sampling"])


def sampling_from(values: dict[str, Any]) -> SamplingParams:
    return SamplingParams(**{key: values[key] for key in SAMPLING_KEYS})


def _split(rc: RunContext) -> PromptSplit:
    return PromptSplit(**json.loads((rc.run.path / PROMPTS_FILE).read_text()))


async def _parent(rc: RunContext) -> models.ModelVersion:
    """The version the run started from: the serving adapter, or the base pipeline."""
    assert rc.pool is not None
    parent = await models.get(rc.pool, rc.run.data["parent"]["id"])
    assert parent is not None
    return parent


def _adapter_of(version: models.ModelVersion) -> str | None:
    """The name of a version's adapter in the generator (None: the base pipeline)."""
    return adapter_name(version.id) if version.kind == KIND else None


async def take_prompts(rc: RunContext) -> dict[str, Any]:
    split = await sample_prompts(rc.pool, rc.options)
    (rc.run.path / PROMPTS_FILE).write_text(
        json.dumps({"train": split.train, "heldout": split.heldout}, indent=1) + "\n"
    )
    return {"train": len(split.train), "heldout": len(split.heldout)}


def _enough_prompts(rc: RunContext) -> None:
    train, needed = len(_split(rc).train), rc.options.min_prompts
    if train < needed:
        raise NothingToDo(
            f"{train} prompts to learn from, fewer than the {needed} needed (adapt.min_prompts)"
        )


async def make_samples(rc: RunContext) -> dict[str, Any]:
    """Images of the training prompts by the parent, scored by the serving classifier. The
    parent's adapter is pinned before it loads: a generate job of the same worker unloads
    the adapters of retired versions, and the parent may be rolled back meanwhile."""
    assert rc.resources is not None
    generator, scorer = await rc.resources.generator(), await rc.resources.scorer()
    parent, recipe = await _parent(rc), rc.options
    adapter = _adapter_of(parent)
    with generator.pinned([adapter]):
        if adapter is not None:
            await asyncio.to_thread(load_version, generator, parent, rc.settings)
        samples = await asyncio.to_thread(
            generate_samples,
            rc.run.path,
            _split(rc).train,
            generator=generator,
            scorer=scorer,
            adapter=adapter,
            params=sampling_of(rc.run),
            images_per_prompt=recipe.images_per_prompt,
            seed=recipe.seed,
            batch=recipe.sample_batch,
            blur_threshold=recipe.blur_threshold,
            progress=rc.progress,
            context=rc.context,
            cancelled=rc.cancelled,
        )
    return {"images": len(samples), "scorer": scorer.name}


async def make_labels(rc: RunContext) -> dict[str, Any]:
    """Labels by the reference's rule, and the fine-tuning set (+ regularization data)."""
    recipe = rc.options
    labelling = label_samples(read_samples(rc.run.path / SAMPLES_FILE), factor=recipe.label_factor)
    items = data.labelled_items(labelling.labels, recipe.identifier)
    if recipe.regularization_data is not None:
        items += data.regularization_items(recipe.regularization_data, recipe.regularization_max)
    (rc.run.path / LABELS_FILE).write_text(
        "".join(
            json.dumps({**x.sample.as_json(), "kind": x.kind, "share": x.share, "n": x.n}) + "\n"
            for x in labelling.labels
        )
    )
    data.write_items(rc.run.path / data.FINETUNE_FILE, items)
    return {**labelling.counts, "regularization": data.counts(items)["regularization"]}


def _anything_to_learn(rc: RunContext) -> None:
    if not data.read_items(rc.run.path / data.FINETUNE_FILE):
        raise NothingToDo("the rule labelled no image and there is no regularization data")


async def fine_tune(rc: RunContext) -> dict[str, Any]:
    """LoRA fine-tuning (resumes from its latest checkpoint)."""
    from pipeline.adapt.lora_train import train_lora

    report = await asyncio.to_thread(
        train_lora,
        data.read_items(rc.run.path / data.FINETUNE_FILE),
        rc.run.path,
        rc.options,
        sd_model=rc.run.recipe["sd_model"],
        out_dir=rc.run.path / TRAIN_DIR,
        validation=sampling_of(rc.run),
        device=rc.device,
        progress=rc.progress,
        context=rc.context,
        cancelled=rc.cancelled,
    )
    return report.as_json()


async def evaluate_offline(
    resources: Resources,
    settings: Settings,
    adapter: tuple[str, str, str],
    parent: models.ModelVersion,
    prompts: list[str],
    params: SamplingParams,
    recipe: AdaptSettings,
    out_dir: Path,
    *,
    progress: bool,
    context: dict[str, Any] | None = None,
    cancelled: Any = None,
) -> tuple[dict[str, Any], str]:
    """The offline evaluation of `adapter` (its name in the generator, its folder or version key,
    identifier)
    against `parent` (an adapter version, or the base pipeline) on held-out `prompts`, same
    seeds for both (`evaluate_adapter`, resuming the pairs recorded in `out_dir`). Both are
    pinned while it runs (the worker's generate jobs, beside it, keep only the adapters of
    serving and testing versions loaded); the evaluated adapter is unloaded after. Returns
    the report (with the parent's name) and the name of the classifier that scored it.
    The reward models of `recipe.offline_scorers` judge the pairs too (`judges`)."""
    generator, scorer = await resources.generator(), await resources.scorer()
    judges = await load_judges(
        [n for n in recipe.offline_scorers if n != "hps"], resources.load_judges
    )
    name, folder, identifier = adapter
    parent_adapter = _adapter_of(parent)
    try:
        with generator.pinned([name, parent_adapter]):
            models_store = storage(settings).models
            source = partial(models_store.opened, folder)
            await asyncio.to_thread(generator.load_adapter, name, source, identifier)
            if parent_adapter is not None:
                await asyncio.to_thread(load_version, generator, parent, settings)
            report = await asyncio.to_thread(
                evaluate_adapter,
                prompts,
                generator=generator,
                scorer=scorer,
                adapter=name,
                parent=parent_adapter,
                params=params,
                seeds_per_prompt=recipe.eval_seeds,
                seed=recipe.seed,
                batch=recipe.sample_batch,
                out_dir=out_dir,
                progress=progress,
                context=context,
                cancelled=cancelled,
                judges=judges,
            )
    finally:
        await asyncio.to_thread(generator.unload_adapters, {name})
    return {**report, "parent": parent.name}, scorer.name


async def evaluate_run(rc: RunContext) -> dict[str, Any]:
    """The run's adapter against its parent on the held-out prompts (resumes the pairs
    recorded in eval/pairs.jsonl)."""
    assert rc.resources is not None
    adapter = (f"run:{rc.run.name}", rc.run.stage("train")["adapter"], identifier_of(rc))
    report, scorer = await evaluate_offline(
        rc.resources,
        rc.settings,
        adapter,
        await _parent(rc),
        _split(rc).heldout,
        sampling_of(rc.run),
        rc.options,
        rc.run.path / EVAL_DIR,
        progress=rc.progress,
        context=rc.context,
        cancelled=rc.cancelled,
    )
    return {"report": report, "scorer": scorer}


def identifier_of(rc: RunContext) -> str:
    """The run's adapter's negative-prompt identifier: the one its train stage recorded
    (none for a Diffusion-DPO adapter), else the recipe's."""
    return str(rc.run.stage("train").get("identifier", rc.options.identifier))


def gate_of(rc: RunContext) -> OfflineGate:
    return OfflineGate(rc.run.stage("eval")["report"], rc.options)


TRAINING_FIGURES = ("steps", "loss", "probe_loss", "probe_loss_base", "seconds")


async def register_adapter(
    rc: RunContext, data_stage: str = "label", figures: tuple[str, ...] = TRAINING_FIGURES
) -> dict[str, Any]:
    """Register the run's adapter (its data counts: the record of `data_stage`; its
    training's `figures` from the train stage's record), gated by its offline evaluation:
    into A/B testing, or retired. Its config holds the run's recipe (`recipe.adapt.recipe`
    names it: hps or dpo)."""
    gate, trained = gate_of(rc), rc.run.stage("train")
    return await register(
        rc,
        Path(trained["adapter"]),
        weights=LORA_WEIGHTS,
        config={
            "identifier": identifier_of(rc),
            "base_model": rc.run.recipe["sd_model"],
            "recipe": rc.run.recipe,
            "run_dir": str(rc.run.path),
            "classifier": rc.run.data["classifier"],
        },
        metrics={
            "data": {k: v for k, v in rc.run.stage(data_stage).items() if k != "finished_at"},
            "training": {k: trained[k] for k in figures if k in trained},
            "offline": {**gate.report, "gate": gate.reason, "passed": gate.passed},
        },
        parent_id=rc.run.data["parent"]["id"],
    )


EVAL = Stage("eval", evaluate_run)

SD_ADAPTATION = Recipe(
    kind=KIND,
    section="adapt",
    title="SD adaptation",
    stages=(
        Stage("prompts", take_prompts, check=_enough_prompts),
        Stage("samples", make_samples),
        Stage("label", make_labels, check=_anything_to_learn),
        Stage("train", fine_tune, every_process=True),
        EVAL,
        Stage("register", partial(register_adapter, data_stage="label")),
    ),
    open=open_run,
    gate=gate_of,
    outcome=AdaptOutcome,
    passed="testing",
    skip=(NothingToDo,),
    user_errors=USER_ERRORS,
)


# -- `hps adapt eval`: a registered adapter on its own ------------------------------------


async def evaluate_version(
    pool: asyncpg.Pool,
    settings: Settings,
    ref: str | None,
    *,
    resources: Resources,
    actor: str | None,
    progress: bool = True,
) -> tuple[models.ModelVersion, dict[str, Any], bool, str]:
    """Evaluate an `sd_adapter` version offline against its parent (default: the newest
    candidate) and store the report in its metrics (`offline`). A candidate is then gated:
    put into A/B testing, or retired with the reason. Returns (version, report, passed,
    reason)."""
    if ref is None:
        candidates = [v for v in await models.list_versions(pool, KIND) if v.status == "candidate"]
        if not candidates:
            raise models.ModelError("no sd_adapter candidate is waiting: name a version")
        version = candidates[-1]
    else:
        found = await models.get(pool, ref)
        if found is None or found.kind != KIND:
            raise models.ModelError(f"no sd_adapter version {ref!r}")
        version = found
    parent = await models.get(pool, version.parent_id) if version.parent_id else None
    if parent is None:
        parent = await models.ensure_base(
            pool, kind="sd_base", artifact=settings.generation.sd_model
        )
    # The held-out prompts are those of the recipe it was trained with (never trained on);
    # how many to use and the gate are today's settings.
    recorded = version.config.get("recipe", {})
    trained = AdaptSettings.model_validate(recorded.get("adapt", {}))
    recipe = settings.adapt.model_copy(
        update={"heldout_fraction": trained.heldout_fraction, "seed": trained.seed}
    )
    split = await sample_prompts(pool, recipe)
    now = datetime.now(UTC)
    identifier = str(version.config.get("identifier", ""))
    report, _ = await evaluate_offline(
        resources,
        settings,
        (adapter_name(version.id), version.artifact, identifier),
        parent,
        split.heldout,
        sampling_from(recorded.get("sampling") or settings.generation.model_dump()),
        recipe,
        settings.runs_dir / EVAL_DIR / f"{version.name}-{now:%Y%m%d-%H%M%S}",
        progress=progress,
    )
    gate = OfflineGate(report, recipe)
    offline = {**report, "gate": gate.reason, "passed": gate.passed}
    async with transaction(pool) as conn:
        await models.merge_metrics(
            conn, version.id, {"offline": {**offline, "evaluated_at": now.isoformat()}}
        )
        if version.status == "candidate":
            await gate.apply(conn, version, actor)
    evaluated = await models.get(pool, version.id)
    assert evaluated is not None
    return evaluated, report, gate.passed, gate.reason
