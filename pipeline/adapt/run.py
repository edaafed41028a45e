"""The adaptation loop as one resumable pipeline: `hps adapt run` and the `adapt_sd` job.

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
folder is copied into `models_dir/<name>` (a temporary folder renamed) and then registered,
gated and put into testing (or retired) in one transaction. So a crash anywhere leaves the
serving versions untouched and no version registered, and a crash after that transaction is
recognised on retry by the version's name.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from db import models
from db.connect import transaction
from hps.settings import AdaptSettings, Settings
from pipeline import registry
from pipeline.adapt import dataset as data
from pipeline.adapt.evaluate import evaluate_adapter, offline_gate
from pipeline.adapt.label import label_samples
from pipeline.adapt.manifest import STAGES, Run, RunError
from pipeline.adapt.prompts import PromptFileError, PromptSplit, read_prompt_file, sample_prompts
from pipeline.adapt.samples import SAMPLES_FILE, generate_samples, read_samples
from pipeline.handlers import JobContext, PermanentError
from pipeline.model_files import sha256_file

if TYPE_CHECKING:
    import asyncpg

    from pipeline.generate import Generator, SamplingParams
    from pipeline.hps_model import HPSModel

log = logging.getLogger(__name__)

KIND = "sd_adapter"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
PROMPTS_FILE = "prompts.json"
LABELS_FILE = "labels.jsonl"
TRAIN_DIR = "train"
EVAL_DIR = "eval"


class NothingToDo(Exception):
    """Too little data to adapt on (too few prompts, an empty fine-tuning set); says why."""


# Errors a person causes through the configuration or the data they point at.
USER_ERRORS = (NothingToDo, PromptFileError, data.DatasetError, RunError, models.ModelError)


@dataclass
class Resources:
    """How to get the heavy models, called only when a stage needs them (a resumed run
    past sampling and evaluation loads none)."""

    generator: Callable[[], Awaitable[Generator]]
    scorer: Callable[[], Awaitable[HPSModel]]


@dataclass
class Outcome:
    run: Run
    status: str  # registered | stopped (after the stage asked for)
    version: models.ModelVersion | None = None
    passed: bool = False
    reason: str = ""
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        parts = [f"SD adaptation run {self.run.name}:"]
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
        if self.version is not None:
            verdict = "In A/B testing" if self.passed else "Retired"
            parts.append(f"Registered {self.version.name}. {verdict}: {self.reason}.")
        elif self.status == "stopped":
            parts.append(f"Stopped after the {self.run.last_stage} stage.")
        return " ".join(parts)

    def as_result(self) -> dict[str, Any]:
        label = self.stages.get("label", {})
        train = self.stages.get("train", {})
        offline = self.stages.get("eval", {}).get("report", {})
        metrics = {
            "positives": label.get("positives"),
            "negatives": label.get("negatives"),
            "steps": train.get("steps"),
            "offline_win_rate": offline.get("win_rate"),
            "offline_hps_gain": offline.get("hps_gain"),
        }
        return {
            "status": self.status,
            "summary": self.summary,
            "version": self.version.name if self.version else None,
            "testing": self.passed,
            "reason": self.reason,
            "run_dir": str(self.run.path),
            "metrics": {k: v for k, v in metrics.items() if v is not None},
        }


def recipe_of(run: Run) -> AdaptSettings:
    return AdaptSettings.model_validate(run.recipe["adapt"])


def sampling_of(run: Run) -> SamplingParams:
    return sampling_from(run.recipe["sampling"])


def check_inputs(recipe: AdaptSettings) -> None:
    """Read the prompt file and the regularization index before any work, so that a
    mistake in them stops the run before it starts (raises what reading them raises)."""
    if recipe.prompt_file is not None:
        read_prompt_file(recipe.prompt_file)
    if recipe.regularization_data is not None:
        data.regularization_items(recipe.regularization_data, recipe.regularization_max)


async def open_run(pool: asyncpg.Pool, settings: Settings, name: str) -> Run:
    """The run `name`, created (recipe and starting versions fixed) if it does not exist."""
    run_dir = settings.runs_dir / models.check_name(name)
    run = Run.open(run_dir)
    if run is not None:
        if not run.done("label"):
            check_inputs(recipe_of(run))
        return run
    check_inputs(settings.adapt)
    if await models.get(pool, name) is not None:
        raise models.ModelError(f"a model version named {name} exists; choose another name")
    base = await models.ensure_base(pool, kind="sd_base", artifact=settings.generation.sd_model)
    parent = await models.serving(pool, KIND) or base
    _, classifier, _ = await registry.serving_model(pool, settings)
    g = settings.generation
    return Run.create(
        run_dir,
        name=name,
        recipe={
            "adapt": settings.adapt.model_dump(mode="json"),
            "sd_model": g.sd_model,
            "sampling": {
                "steps": g.steps,
                "guidance_scale": g.guidance_scale,
                "width": g.width,
                "height": g.height,
            },
        },
        base={"id": base.id, "name": base.name},
        parent={"id": parent.id, "name": parent.name, "kind": parent.kind},
        classifier=classifier,
    )


async def run_adaptation(
    pool: asyncpg.Pool,
    settings: Settings,
    *,
    name: str,
    resources: Resources,
    until: str = "register",
    actor: str | None = None,
    progress: bool = True,
    context: dict[str, Any] | None = None,
    cancelled: threading.Event | None = None,
) -> Outcome:
    """Run (or resume) the stages of run `name` up to and including `until`. Long stages
    raise `Cancelled` at their next step once `cancelled` is set (the run then resumes)."""
    if until not in STAGES:
        raise ValueError(f"unknown stage {until!r}: one of {', '.join(STAGES)}")
    if _distributed():
        # Under `accelerate launch` every process runs this: only fine-tuning is shared.
        existing = Run.open(settings.runs_dir / name)
        if existing is None or not existing.done("label"):
            raise RunError(
                "under accelerate launch only the fine-tuning runs: first run "
                f"`hps adapt label --name {name}` (one process)"
            )
        until = "train"
    run = await open_run(pool, settings, name)
    recipe, params = recipe_of(run), sampling_of(run)
    context = {**(context or {}), "run": name}
    if run.last_stage:
        log.info("run %s resumes after its %s stage", name, run.last_stage, extra=context)

    def parent_name() -> str | None:
        """The name the parent's adapter has in the generator (None: the parent is the base),
        to pin before loading it: a generate job of the same worker unloads the adapters of
        retired versions, and the parent may be rolled back meanwhile."""
        from pipeline.generate import adapter_name

        parent = run.data["parent"]
        return adapter_name(parent["id"]) if parent["kind"] == KIND else None

    async def parent_adapter(generator: Generator) -> str | None:
        """The parent's adapter loaded in the generator (None: the parent is the base)."""
        if run.data["parent"]["kind"] != KIND:
            return None
        from pipeline.generate import load_version

        version = await models.get(pool, run.data["parent"]["id"])
        assert version is not None
        return await asyncio.to_thread(load_version, generator, version)

    def stop_after(stage: str) -> bool:
        return STAGES.index(stage) >= STAGES.index(until)

    outcome = Outcome(run, "stopped")

    # Prompts.
    if not run.done("prompts"):
        split = await sample_prompts(pool, recipe)
        (run.path / PROMPTS_FILE).write_text(
            json.dumps({"train": split.train, "heldout": split.heldout}, indent=1) + "\n"
        )
        run.finish("prompts", train=len(split.train), heldout=len(split.heldout))
    split = PromptSplit(**json.loads((run.path / PROMPTS_FILE).read_text()))
    if len(split.train) < recipe.min_prompts:
        raise NothingToDo(
            f"{len(split.train)} prompts to learn from, fewer than the {recipe.min_prompts} "
            "needed (adapt.min_prompts)"
        )
    if stop_after("prompts"):
        return _finish(outcome)

    # Samples: generated by the parent, scored by the serving classifier.
    if not run.done("samples"):
        generator, scorer = await resources.generator(), await resources.scorer()
        with generator.pinned([parent_name()]):
            samples = await asyncio.to_thread(
                generate_samples,
                run.path,
                split.train,
                generator=generator,
                scorer=scorer,
                adapter=await parent_adapter(generator),
                params=params,
                images_per_prompt=recipe.images_per_prompt,
                seed=recipe.seed,
                batch=recipe.sample_batch,
                blur_threshold=recipe.blur_threshold,
                progress=progress,
                context=context,
                cancelled=cancelled,
            )
        run.finish("samples", images=len(samples), scorer=scorer.name)
    if stop_after("samples"):
        return _finish(outcome)

    # Labels and the fine-tuning set.
    if not run.done("label"):
        labelling = label_samples(read_samples(run.path / SAMPLES_FILE), factor=recipe.label_factor)
        items = data.labelled_items(labelling.labels, recipe.identifier)
        if recipe.regularization_data is not None:
            items += data.regularization_items(
                recipe.regularization_data, recipe.regularization_max
            )
        (run.path / LABELS_FILE).write_text(
            "".join(
                json.dumps({**x.sample.as_json(), "kind": x.kind, "share": x.share, "n": x.n})
                + "\n"
                for x in labelling.labels
            )
        )
        data.write_items(run.path / data.FINETUNE_FILE, items)
        regularization = data.counts(items)["regularization"]
        run.finish("label", **labelling.counts, regularization=regularization)
    items = data.read_items(run.path / data.FINETUNE_FILE)
    if not items:
        raise NothingToDo("the rule labelled no image and there is no regularization data")
    if stop_after("label"):
        return _finish(outcome)

    # Fine-tuning (resumes from its latest checkpoint).
    if not run.done("train"):
        from pipeline.adapt.lora_train import train_lora

        report = await asyncio.to_thread(
            train_lora,
            items,
            run.path,
            recipe,
            sd_model=run.recipe["sd_model"],
            out_dir=run.path / TRAIN_DIR,
            validation=params,
            device=settings.models.device,
            progress=progress,
            context=context,
            cancelled=cancelled,
        )
        if not _is_main_process():
            return outcome  # under `accelerate launch`, the main process records the run
        run.finish("train", **report.as_json())
    if stop_after("train"):
        return _finish(outcome)
    adapter_dir = Path(run.stage("train")["adapter"])

    # Offline evaluation: adapter against parent on held-out prompts, same seeds; resumes
    # the pairs recorded in eval/pairs.jsonl.
    if not run.done("eval"):
        generator, scorer = await resources.generator(), await resources.scorer()
        candidate = f"run:{name}"
        try:
            # Pinned: the worker's generate jobs, running beside this one, keep only the
            # adapters of serving and testing versions loaded.
            with generator.pinned([candidate, parent_name()]):
                await asyncio.to_thread(
                    generator.load_adapter, candidate, str(adapter_dir), recipe.identifier
                )
                report = await asyncio.to_thread(
                    evaluate_adapter,
                    split.heldout,
                    generator=generator,
                    scorer=scorer,
                    adapter=candidate,
                    parent=await parent_adapter(generator),
                    params=params,
                    seeds_per_prompt=recipe.eval_seeds,
                    seed=recipe.seed,
                    batch=recipe.sample_batch,
                    out_dir=run.path / EVAL_DIR,
                    progress=progress,
                    context=context,
                    cancelled=cancelled,
                )
        finally:  # not a version: nothing else may use it
            await asyncio.to_thread(generator.unload_adapters, {candidate})
        run.finish(
            "eval", report={**report, "parent": run.data["parent"]["name"]}, scorer=scorer.name
        )
    if stop_after("eval"):
        return _finish(outcome)

    # Registration, gate and testing: one transaction.
    if not run.done("register"):
        version, passed, reason = await register_adapter(
            pool, settings, run, adapter_dir, actor=actor
        )
        run.finish(
            "register", version=version.name, version_id=version.id, testing=passed, reason=reason
        )
    record = run.stage("register")
    outcome.version = await models.get(pool, record["version_id"])
    outcome.passed, outcome.reason = record["testing"], record["reason"]
    outcome.status = "registered"
    return _finish(outcome)


def _finish(outcome: Outcome) -> Outcome:
    outcome.stages = {s: outcome.run.stage(s) for s in STAGES if outcome.run.done(s)}
    return outcome


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def _distributed() -> bool:
    from accelerate import PartialState

    return PartialState().num_processes > 1


async def register_adapter(
    pool: asyncpg.Pool,
    settings: Settings,
    run: Run,
    adapter_dir: Path,
    *,
    actor: str | None,
) -> tuple[models.ModelVersion, bool, str]:
    """Copy the adapter into `models_dir/<name>`, then register it, gate it and start its
    A/B testing (or retire it) in one transaction. A version registered by an earlier
    attempt (which crashed before recording it) is taken as is."""
    existing = await models.get(pool, run.name)
    if existing is not None:
        offline = existing.metrics.get("offline", {})
        return existing, existing.status in ("testing", "serving"), offline.get("gate", "")
    recipe = recipe_of(run)
    report = run.stage("eval")["report"]
    passed, reason = offline_gate(report, recipe)
    target = settings.models_dir / run.name
    if target.exists():  # left by an attempt that crashed before its transaction
        shutil.rmtree(target)
    await asyncio.to_thread(registry.copy_atomically, adapter_dir, target, LORA_WEIGHTS)
    stages = {s: run.stage(s) for s in ("label", "train")}
    async with transaction(pool) as conn:
        version = await models.register(
            conn,
            kind=KIND,
            name=run.name,
            artifact=str(target.resolve()),
            sha256=sha256_file(target / LORA_WEIGHTS),
            config={
                "identifier": recipe.identifier,
                "base_model": run.recipe["sd_model"],
                "recipe": run.recipe,
                "run_dir": str(run.path),
                "classifier": run.data["classifier"],
            },
            metrics={
                "data": {k: v for k, v in stages["label"].items() if k != "finished_at"},
                "training": {
                    k: stages["train"][k]
                    for k in ("steps", "loss", "probe_loss", "probe_loss_base", "seconds")
                },
                "offline": {**report, "gate": reason, "passed": passed},
            },
            parent_id=run.data["parent"]["id"],
            actor=actor,
        )
        if passed:
            version = await models.start_testing(conn, version.id, actor=actor, reason=reason)
        else:
            version = await models.retire(conn, version.id, actor=actor, reason=reason)
    log.info("registered %s: %s", version.name, reason, extra={"model_version_id": version.id})
    return version, passed, reason


# -- the adapt_sd job ---------------------------------------------------------------------


async def handle_adapt_sd(ctx: JobContext) -> dict[str, Any]:
    """The `adapt_sd` job: the whole loop on the database's prompts, in the run
    `sd_adapter-job<id>` (a retried job resumes it). Payload keys named like `adapt`
    settings override them (e.g. {"max_train_steps": 2000}); skips, saying why, when there
    is too little data."""
    from pydantic import ValidationError

    from pipeline.generate import get_generator
    from pipeline.score import serving_scorer

    payload = ctx.job.payload if isinstance(ctx.job.payload, dict) else {}
    options = {k: v for k, v in payload.items() if k in AdaptSettings.model_fields}
    try:
        settings = ctx.settings.with_changes("adapt", **options)
    except ValidationError as exc:
        raise PermanentError(f"invalid adapt_sd options: {exc}") from None

    async def scorer() -> HPSModel:
        model, _ = await serving_scorer(ctx.pool, settings, ctx.cache)
        return model

    resources = Resources(generator=lambda: get_generator(ctx), scorer=scorer)
    try:
        outcome = await run_adaptation(
            ctx.pool,
            settings,
            name=f"{KIND}-job{ctx.job.id}",
            resources=resources,
            actor=f"job:{ctx.job.id}",
            progress=False,
            context={"job_id": ctx.job.id, "job_kind": ctx.job.kind},
            cancelled=ctx.cancelled,
        )
    except NothingToDo as exc:
        return {
            "status": "skipped",
            "summary": f"SD adaptation skipped: {exc}.",
            "reason": str(exc),
        }
    except USER_ERRORS as exc:  # the configuration must change first: retrying cannot help
        raise PermanentError(f"SD adaptation cannot run: {exc}") from None
    ctx.log.info("%s", outcome.summary)
    return outcome.as_result()


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
    from pipeline.generate import adapter_name, load_version

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
    g = settings.generation
    params = sampling_from(recorded.get("sampling") or g.model_dump())
    generator, scorer = await resources.generator(), await resources.scorer()
    pins = [adapter_name(version.id), adapter_name(parent.id) if parent.kind == KIND else None]
    now = datetime.now(UTC)
    with generator.pinned(pins):
        adapter = await asyncio.to_thread(load_version, generator, version)
        parent_adapter = (
            await asyncio.to_thread(load_version, generator, parent)
            if parent.kind == KIND
            else None
        )
        report = await asyncio.to_thread(
            evaluate_adapter,
            split.heldout,
            generator=generator,
            scorer=scorer,
            adapter=adapter,
            parent=parent_adapter,
            params=params,
            seeds_per_prompt=recipe.eval_seeds,
            seed=recipe.seed,
            batch=recipe.sample_batch,
            out_dir=settings.runs_dir / EVAL_DIR / f"{version.name}-{now:%Y%m%d-%H%M%S}",
            progress=progress,
        )
    passed, reason = offline_gate(report, recipe)
    offline = {
        **report,
        "parent": parent.name,
        "gate": reason,
        "passed": passed,
        "evaluated_at": now.isoformat(),
    }
    async with transaction(pool) as conn:
        version = await models.merge_metrics(conn, version.id, {"offline": offline})
        if version.status == "candidate":
            if passed:
                version = await models.start_testing(conn, version.id, actor=actor, reason=reason)
            else:
                version = await models.retire(conn, version.id, actor=actor, reason=reason)
    return version, report, passed, reason


def sampling_from(values: dict[str, Any]) -> SamplingParams:
    from pipeline.generate import SamplingParams

    return SamplingParams(**{k: values[k] for k in ("steps", "guidance_scale", "width", "height")})
