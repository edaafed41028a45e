"""Training pipelines as lists of resumable stages, walked by one driver.

A recipe (`Recipe`: classifier training, the paper's SD adaptation, ...) is a list of
`Stage`s, each an async function of the run in hand (`RunContext`) returning its record
(counts, artifacts). A run lives in `runs_dir/<name>/`; its `manifest.json` (replaced
atomically) holds the recipe's settings section as the run started (a resumed run keeps
it), what the run started from, and the record of each finished stage. `run_recipe` skips
the finished stages and runs the others in order, recording each as it finishes: a run that
crashed, or whose job was given up, resumes after its last finished stage. Every recipe
ends with a `register` stage calling `register`: the model is published to the store and
registered, with the recipe's `Gate` applied in the same transaction. `run_job` is the job
handler of any recipe.

Under a distributed launch (`accelerate launch`, `torchrun`) every process walks the run:
the `every_process` stages (training) run in all of them, the stages before those must be
finished already, and those after them run in the main process, the only one that writes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from db import models
from db.connect import transaction
from hps.files import remove, write_json_atomically
from hps.settings import Settings
from hps.storage import storage
from pipeline import devices
from pipeline.handlers import JobContext, PermanentError

if TYPE_CHECKING:
    import asyncpg
    from pydantic import BaseModel

    from db.connect import Executor
    from hps.store import ImageStore
    from pipeline.generate import Generator
    from pipeline.hps_model import HPSModel
    from pipeline.scorers import Scorer

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
REGISTER = "register"  # the last stage of every recipe
IMAGE_COPIES = "image-copies"  # a run's copies of an object store's images, while it runs


class RunError(Exception):
    """A run directory that cannot be used as asked (the message says why)."""


class Run:
    """A run directory with its manifest."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data

    @classmethod
    def open(cls, path: Path) -> Run | None:
        """The run in `path`, or None if there is none."""
        manifest = path / MANIFEST
        if not manifest.is_file():
            return None
        return cls(path, json.loads(manifest.read_text()))

    @classmethod
    def create(cls, path: Path, **header: Any) -> Run:
        """A new run in `path` with `header` (name, recipe, what it starts from), written on
        its first `save` (the folder may exist, e.g. left by a crash before then)."""
        return cls(path, {**header, "created_at": _now(), "stages": {}})

    @property
    def name(self) -> str:
        return str(self.data["name"])

    @property
    def recipe(self) -> dict[str, Any]:
        return dict(self.data["recipe"])

    def save(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomically(self.path / MANIFEST, self.data)

    def done(self, stage: str) -> bool:
        return stage in self.data["stages"]

    def stage(self, stage: str) -> dict[str, Any]:
        """A finished stage's record (RunError if it has not finished)."""
        if not self.done(stage):
            raise RunError(f"run {self.name} has not finished its {stage} stage")
        return dict(self.data["stages"][stage])

    def finish(self, stage: str, *, save: bool = True, **record: Any) -> dict[str, Any]:
        """Record `stage` as finished with its counts and artifacts (in memory only unless
        `save`: the other processes of a distributed launch)."""
        entry = {**record, "finished_at": _now()}
        self.data["stages"][stage] = entry
        if save:
            self.save()
        return entry

    @property
    def last_stage(self) -> str | None:
        return next(reversed(self.data["stages"]), None)


def _now() -> str:
    return datetime.now(UTC).isoformat()


@dataclass
class Resources:
    """The heavy models stages may need, loaded only when a stage needs them (a resumed
    run past the stages that use them loads none)."""

    generator: Callable[[], Awaitable[Generator]]
    scorer: Callable[[], Awaitable[HPSModel]]  # the serving HPS classifier
    # Other reward models by name (`pipeline.scorers`; the offline evaluation's judges).
    judges: Callable[[Sequence[str]], Awaitable[list[Scorer]]] | None = None
    store: ImageStore | None = None  # the image store (the choices' images)

    async def load_judges(self, names: Sequence[str]) -> list[Scorer]:
        """The reward models `names` (none: nothing loaded)."""
        if not names:
            return []
        if self.judges is None:
            raise RunError(f"no reward models can be loaded here to judge ({', '.join(names)})")
        return await self.judges(names)

    @classmethod
    def of_job(cls, ctx: JobContext, settings: Settings) -> Resources:
        """The worker's resident generator, serving classifier and reward models, and its
        image store."""
        from pipeline.generate import get_generator
        from pipeline.score import serving_scorer
        from pipeline.scorers import cached_scorers

        async def scorer() -> HPSModel:
            return (await serving_scorer(ctx.pool, settings, ctx.cache))[0]

        async def judges(names: Sequence[str]) -> list[Scorer]:
            return await cached_scorers(names, settings, ctx.cache)

        return cls(generator=lambda: get_generator(ctx), scorer=scorer, judges=judges,
                   store=ctx.store)  # fmt: skip


@dataclass
class RunContext:
    """One attempt at a run: what its stages share."""

    recipe: Recipe
    run: Run
    settings: Settings
    pool: asyncpg.Pool | None = None  # None: a run without the database (`hps train --data`)
    resources: Resources | None = None
    actor: str | None = None  # who registers and gates the version (the model events' actor)
    progress: bool = True  # bars on a terminal (else structured log lines only)
    context: dict[str, Any] = field(default_factory=dict)  # `extra` of every log line
    cancelled: threading.Event | None = None  # long stages raise `Cancelled` once it is set
    gate: bool = True  # apply the recipe's gate when registering (else: a candidate)
    main: bool = True  # the main process (the only one that writes) of a distributed launch
    cache: dict[str, Any] = field(default_factory=dict)  # what a stage hands to a later one

    @property
    def image_copies(self) -> Path:
        """Where the run's copies of the store's images go (an object store's: see
        `Storage.reader`); removed when `run_recipe` ends, finished or failed."""
        return self.run.path / IMAGE_COPIES

    @cached_property
    def options(self) -> Any:
        """The recipe's settings section as the run recorded it (e.g. `AdaptSettings`)."""
        section: type[BaseModel] = type(getattr(self.settings, self.recipe.section))
        return section.model_validate(self.run.recipe[self.recipe.section])

    @property
    def device(self) -> str:
        """Where the stages run: `models.device` (a worker's `--device`)."""
        return self.settings.models.device


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[RunContext], Awaitable[dict[str, Any]]]  # does the work, returns its record
    check: Callable[[RunContext], None] | None = None  # after it finished, now or before
    every_process: bool = False  # runs in every process of a distributed launch


@dataclass
class Outcome:
    """What a run came to: how far it got, and the version it registered (if it got that
    far) with the gate's verdict. Recipes subclass it with their summary and job result."""

    recipe: Recipe
    run: Run
    main: bool = True
    version: models.ModelVersion | None = None
    passed: bool = False  # the gate let it through (promoted, or in A/B testing)
    reason: str = ""

    @property
    def stages(self) -> dict[str, dict[str, Any]]:
        return {s.name: self.run.stage(s.name) for s in self.recipe.stages if self.run.done(s.name)}

    @property
    def summary(self) -> str:
        raise NotImplementedError

    def as_result(self) -> dict[str, Any]:
        raise NotImplementedError


class Gate(Protocol):
    """What a recipe's new version must pass: a classifier serves if it beats the serving
    model (`pipeline.registry.PromotionGate`); an SD adapter enters A/B testing if its
    offline evaluation passes, else it is retired (`pipeline.adapt.evaluate.OfflineGate`).
    `apply` decides on a new candidate and acts on it in the transaction that registers it;
    `settle` says where a version an earlier attempt registered stands now (gating it again
    when the verdict depends on what serves now). Both return (passed, reason)."""

    async def apply(
        self, conn: Executor, version: models.ModelVersion, actor: str | None
    ) -> tuple[bool, str]: ...

    async def settle(
        self, db: Executor, version: models.ModelVersion, actor: str | None
    ) -> tuple[bool, str]: ...


@dataclass(frozen=True)
class Recipe:
    kind: str  # the kind of version it registers
    section: str  # its settings section ("train", "adapt"): its options, and a job's payload
    title: str  # how messages name it ("SD adaptation")
    stages: tuple[Stage, ...]
    open: Callable[..., Awaitable[Run]]  # (pool, settings, name, **options): the run, new or not
    gate: Callable[[RunContext], Gate]  # what its version must pass (from the run's records)
    outcome: type[Outcome]
    passed: str  # the job result's key of the gate's verdict ("promoted", "testing")
    skip: tuple[type[Exception], ...] = ()  # too little data: a job finishes as skipped
    user_errors: tuple[type[Exception], ...] = ()  # settings to fix first: a job is dead-lettered


async def run_recipe(
    recipe: Recipe,
    pool: asyncpg.Pool | None,
    settings: Settings,
    *,
    name: str,
    until: str | None = None,
    resources: Resources | None = None,
    actor: str | None = None,
    progress: bool = True,
    context: dict[str, Any] | None = None,
    cancelled: threading.Event | None = None,
    gate: bool = True,
    **options: Any,
) -> Outcome:
    """Run (or resume) the run `name` of `recipe` up to and including the stage `until`
    (default: all of them). `options` go to the recipe's `open` (a new run's inputs)."""
    names = [s.name for s in recipe.stages]
    until = until or names[-1]
    if until not in names:
        raise ValueError(f"unknown stage {until!r}: one of {', '.join(names)}")
    processes = devices.process_state(settings.models.device)
    run = await recipe.open(pool, settings, name, **options)
    rc = RunContext(
        recipe, run, settings, pool, resources, actor, progress, {**(context or {}), "run": name},
        cancelled, gate, processes.is_main_process,
    )  # fmt: skip
    if run.last_stage:
        log.info("run %s resumes after its %s stage", name, run.last_stage, extra=rc.context)
    try:
        return await _walk(recipe, run, rc, name, until, processes.num_processes, actor)
    finally:
        if rc.main:  # images deleted from the store must not live on in a run's copy
            remove(rc.image_copies)


async def _walk(
    recipe: Recipe,
    run: Run,
    rc: RunContext,
    name: str,
    until: str,
    num_processes: int,
    actor: str | None,
) -> Outcome:
    """`run_recipe`'s walk through the stages."""
    pool = rc.pool
    shared = [i for i, stage in enumerate(recipe.stages) if stage.every_process]
    ran = []
    for i, stage in enumerate(recipe.stages):
        if not run.done(stage.name):
            if num_processes > 1 and not stage.every_process:
                if shared and i < shared[-1]:
                    raise RunError(
                        f"run {name} has not finished its {stage.name} stage: under a "
                        "distributed launch only training runs; run the stages before it "
                        f"first, in one process (e.g. `hps adapt label --name {name}`)"
                    )
                if not rc.main:
                    break
            run.finish(stage.name, save=rc.main, **await stage.run(rc))
            ran.append(stage.name)
        if stage.check is not None:
            stage.check(rc)
        if stage.name == until:
            break
    outcome = recipe.outcome(recipe, run, rc.main)
    if run.done(REGISTER) and pool is not None:
        record = run.stage(REGISTER)
        outcome.version = await models.get(pool, record["version_id"])
        assert outcome.version is not None
        if REGISTER in ran:
            outcome.passed, outcome.reason = record["passed"], record["reason"]
        else:  # registered by an earlier attempt: where it stands now
            verdict = await recipe.gate(rc).settle(pool, outcome.version, actor)
            outcome.passed, outcome.reason = verdict
    return outcome


async def register(
    rc: RunContext,
    folder: Path,
    *,
    weights: str,
    config: dict[str, Any],
    metrics: dict[str, Any],
    parent_id: int | None,
) -> dict[str, Any]:
    """The registration step of every recipe's `register` stage: publish the run's model
    folder (with its `weights` file) to the store as `models/<run name>/<sha256>`
    (`hps.model_store`: immutable, sha256-verified, whole before anything names it), then
    register it as a candidate of the recipe's kind and apply the recipe's gate (unless the
    run asked for none) in one transaction. A crash leaves nothing registered (an upload it
    interrupted is written again by the next attempt); a version an earlier attempt
    registered is settled instead. Returns the stage's record."""
    assert rc.pool is not None, "registering needs the database"
    name, gate = rc.run.name, rc.recipe.gate(rc) if rc.gate else None
    version = await models.get(rc.pool, name)
    if version is not None:
        passed, reason = await gate.settle(rc.pool, version, rc.actor) if gate else NOT_ASKED
    else:
        # Every file, then the manifest, then the row: an interrupted upload is never named.
        models_store = storage(rc.settings).models
        published = await asyncio.to_thread(models_store.publish, folder, name, weights)
        async with transaction(rc.pool) as conn:
            version = await models.register(
                conn, kind=rc.recipe.kind, name=name, artifact=published.key,
                sha256=published.sha256, config=config, metrics=metrics,
                parent_id=parent_id, actor=rc.actor,
            )  # fmt: skip
            passed, reason = await gate.apply(conn, version, rc.actor) if gate else NOT_ASKED
        log.info("registered %s: %s", name, reason, extra={"model_version_id": version.id})
    return {"version": version.name, "version_id": version.id, "passed": passed, "reason": reason}


NOT_ASKED = (False, "promotion not requested")


async def run_job(ctx: JobContext, recipe: Recipe) -> dict[str, Any]:
    """The job of a recipe (`train_classifier`, `adapt_sd`): the whole run on the database's
    data, named `<kind>-job<id>` (a retried job resumes it). Payload keys named like the
    recipe's settings override them (e.g. {"epochs": 2}); the others describe the request.
    Too little data finishes the job as skipped, saying why; settings that must change
    first dead-letter it."""
    from pydantic import ValidationError

    payload = ctx.job.payload if isinstance(ctx.job.payload, dict) else {}
    section = type(getattr(ctx.settings, recipe.section))
    try:
        settings = ctx.settings.with_changes(
            recipe.section, **{k: v for k, v in payload.items() if k in section.model_fields}
        )
    except ValidationError as exc:
        raise PermanentError(f"invalid {ctx.job.kind} options: {exc}") from None
    try:
        outcome = await run_recipe(
            recipe,
            ctx.pool,
            settings,
            name=f"{recipe.kind}-job{ctx.job.id}",
            resources=Resources.of_job(ctx, settings),
            actor=f"job:{ctx.job.id}",
            progress=False,
            context={"job_id": ctx.job.id, "job_kind": ctx.job.kind},
            cancelled=ctx.cancelled,
        )
    except recipe.skip as exc:
        return {
            "status": "skipped",
            "summary": f"{recipe.title} skipped: {exc}.",
            recipe.passed: False,
            "reason": str(exc),
        }
    except recipe.user_errors as exc:  # retrying cannot help
        raise PermanentError(f"{recipe.title} cannot run: {exc}") from None
    ctx.log.info("%s", outcome.summary)
    return outcome.as_result()
