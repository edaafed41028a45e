"""The image generator and the `generate` job.

`Generator` keeps one diffusers text-to-image pipeline resident (a hub id or a local folder;
`AutoPipelineForText2Image` picks the SD 1.x/2.x or SDXL class from the folder) together
with LoRA adapters loaded by name, and makes a batch of images in one pipeline call per
model version, one `torch.Generator` per image so that each image depends only on its seed.

`handle_generate` runs one round's job, together with up to `generation.batch_rounds - 1`
more queued rounds of equal parameters (`ctx.claim_matching` on the payload's batch key):

1. each round moves to `generating` (a round that is gone completes its job as a no-op);
2. the serving policy (`pipeline.serving.plan_round`) says which version makes each
   position: the incumbent, or half incumbent and half an adapter in testing;
3. seeds come from a generator seeded by the job id (or the round's `seed` param), so a
   retried job plans and draws the same round again;
4. the images are made (one call per version and parameter set across all rounds); then,
   per round, one transaction marks the round `ready` (with its NOTIFY), holds the images'
   keys (`db.images.hold_keys`: no deletion of equal bytes can come in between), uploads
   them to the image store (one conditional PUT each on an object store), and writes the
   image rows and the job's completion. An upload that fails rolls it all back, so
   nothing ever names an image that is not stored; a crash before the commit leaves no
   rows and the job retryable, and the same seeds give the same files again.

Images the safety checker flags are stored and recorded with `nsfw=True` (never shown); a
round with fewer than two unflagged images fails with a reason its requester can read. A
model that ships no checker gets the standalone one of `pipeline.safety`
(`generation.safety_checker_model`), run on every image it makes.

An adapter made by the SD adaptation (`pipeline.adapt`) carries its identifier (the prefix
its training gave the non-preferred images, "Weird image. " by default) in its version's
config; images made with it get that identifier as (the start of) their negative prompt,
as the paper's inference does.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import ValidationError

from db import images as image_rows
from db import jobs, models, rounds
from db.connect import transaction
from db.images import NewImage
from db.locks import LockTimeout
from hps.settings import GenerationSettings, Settings
from hps.storage import storage
from hps.store import StoreUnavailable
from pipeline.devices import dtype as torch_dtype
from pipeline.devices import precision, resolve_device
from pipeline.handlers import JobContext, LeaseLost, PermanentError
from pipeline.safety import SafetyChecker
from pipeline.serving import RoundPlan, plan_round

log = logging.getLogger(__name__)

SAMPLING_KEYS = ("steps", "guidance_scale", "width", "height")
MIN_SHOWN = 2  # a choice needs at least two images

# An adapter's folder or hub id, or what fetches it: a context manager giving its folder,
# held while it loads (`ModelStore.opened`: the cache does not evict it meanwhile).
Source = str | Callable[[], AbstractContextManager[str]]


@dataclass(frozen=True)
class SamplingParams:
    steps: int
    guidance_scale: float
    width: int
    height: int

    @classmethod
    def for_round(cls, params: dict[str, Any], defaults: GenerationSettings) -> SamplingParams:
        """A round's own parameters over the configured ones, checked against the same
        bounds as the settings; ValueError with a readable message when out of range."""
        overrides = {key: params[key] for key in SAMPLING_KEYS if key in params}
        try:
            merged = GenerationSettings.model_validate({**defaults.model_dump(), **overrides})
        except ValidationError as exc:
            problems = "; ".join(f"{e['loc'][0]}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"This round's parameters are not valid ({problems}).") from None
        return cls(**{key: getattr(merged, key) for key in SAMPLING_KEYS})


@dataclass(frozen=True)
class ImageRequest:
    prompt: str
    negative_prompt: str
    seed: int
    adapter: str | None = None  # an adapter loaded with `Generator.load_adapter`; None = base


@dataclass(frozen=True)
class GeneratedImage:
    png: bytes
    nsfw: bool
    width: int
    height: int


class NoSafetyChecker(ValueError):
    """The safety checker is on, but the model has none."""


class Generator:
    """A resident text-to-image pipeline with named LoRA adapters. Thread-safe: calls
    serialise on a lock, since the active adapter is pipeline-wide state."""

    def __init__(
        self,
        model: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        safety_checker: bool = True,
        safety_checker_model: str | None = None,
        channels_last: bool = True,
        torch_compile: bool = False,
    ) -> None:
        from diffusers import AutoPipelineForText2Image

        self.model = model
        self.device = resolve_device(device)
        self.dtype = torch_dtype(precision(dtype, self.device, auto="fp16"))
        self._lock = threading.Lock()
        self.adapters: dict[str, str] = {}  # adapter name → artifact it was loaded from
        self.identifiers: dict[str, str] = {}  # adapter name → its negative-prompt identifier
        # Adapters in use by a job (the adapter evaluation's `run:<name>`, a run's parent):
        # `keep_adapters` never unloads them. Own lock: pinning must not wait for a generation.
        self._pins: Counter[str] = Counter()
        self._pins_lock = threading.Lock()
        self._sources: dict[str, tuple[Source, str]] = {}  # ever loaded → (source, identifier)
        kwargs: dict[str, Any] = {"dtype": self.dtype}
        if not safety_checker:
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        started = time.perf_counter()
        pipe = AutoPipelineForText2Image.from_pretrained(model, **kwargs)
        # The checker run after the pipeline, for a model that ships none.
        self.checker: SafetyChecker | None = None
        if safety_checker and getattr(pipe, "safety_checker", None) is None:
            if not safety_checker_model:
                # Images would go out unchecked: only a maintainer's explicit choice allows it.
                raise NoSafetyChecker(
                    f"{model} has no safety checker, so its images could not be checked: set "
                    "generation.safety_checker_model (HPS_GENERATION__SAFETY_CHECKER_MODEL) "
                    "to check them with the standalone one, or generation.safety_checker = "
                    "false (HPS_GENERATION__SAFETY_CHECKER=false) to post them unchecked"
                )
            self.checker = SafetyChecker(safety_checker_model, device=self.device, dtype=self.dtype)
        pipe.set_progress_bar_config(disable=True)
        # Attention already uses torch's scaled_dot_product_attention (diffusers' default
        # processor on torch 2), which picks flash or memory-efficient kernels on a GPU.
        if self.device.startswith("cuda"):
            if channels_last:
                pipe.unet.to(memory_format=torch.channels_last)
                pipe.vae.to(memory_format=torch.channels_last)
            if torch_compile:
                # In place, so the UNet stays a diffusers model that LoRA adapters load into;
                # switching adapters recompiles once per new combination.
                pipe.unet.compile(mode="max-autotune-no-cudagraphs")
        self.pipe = pipe.to(self.device)
        log.info(
            "loaded %s on %s (%s) in %.1f s",
            model,
            self.device,
            str(self.dtype).removeprefix("torch."),
            time.perf_counter() - started,
        )

    @classmethod
    def from_settings(cls, settings: GenerationSettings, device: str) -> Generator:
        return cls(
            settings.sd_model,
            device=device,
            dtype=settings.dtype,
            safety_checker=settings.safety_checker,
            safety_checker_model=settings.safety_checker_model,
            channels_last=settings.channels_last,
            torch_compile=settings.torch_compile,
        )

    def load_adapter(self, name: str, source: Source, identifier: str = "") -> None:
        """Load a LoRA adapter (diffusers format, a folder or hub id, or a function giving
        one: a version fetched from the store) under `name`, once. `identifier` is put
        before the negative prompt of every image it makes."""
        with self._lock:
            if name not in self.adapters:
                self._load(name, source)
            self.identifiers[name] = identifier
            self._sources[name] = (source, identifier)

    def _load(self, name: str, source: Source) -> None:
        opened = source() if callable(source) else contextlib.nullcontext(source)
        with opened as artifact:
            try:
                self.pipe.load_lora_weights(artifact, adapter_name=name)
            except Exception:
                # Leave no half-injected layers behind for the next calls.
                with contextlib.suppress(Exception):
                    self.pipe.delete_adapters([name])
                raise
        self.adapters[name] = artifact
        log.info("loaded adapter %s from %s", name, artifact)

    @contextlib.contextmanager
    def pinned(self, names: Iterable[str | None]) -> Iterator[None]:
        """Keep the adapters `names` loaded inside the block (None, the base, is ignored):
        with worker concurrency above 1, another job's `keep_adapters` would otherwise
        unload an adapter this job is using. Pin before loading, so there is no moment
        when it is loaded and not pinned."""
        pins = [name for name in names if name is not None]
        with self._pins_lock:
            self._pins.update(pins)
        try:
            yield
        finally:
            with self._pins_lock:
                self._pins.subtract(pins)
                self._pins = +self._pins  # forget the names no job pins any more

    def keep_adapters(self, names: set[str]) -> None:
        """Unload the adapters neither in `names` (e.g. retired versions) nor pinned by a
        job, freeing their memory."""
        self.unload_adapters(set(self.adapters) - names)

    def unload_adapters(self, names: set[str]) -> None:
        """Unload the adapters `names`, except those pinned by a job."""
        with self._lock, self._pins_lock:
            stale = [name for name in self.adapters if name in names and not self._pins[name]]
            if stale:
                self.pipe.delete_adapters(stale)
                for name in stale:
                    del self.adapters[name]
                    self.identifiers.pop(name, None)
                log.info("unloaded adapters %s", ", ".join(stale))

    def generate(
        self, requests: list[ImageRequest], params: SamplingParams
    ) -> list[GeneratedImage]:
        """Make one image per request, in request order: one pipeline call per adapter."""
        groups: dict[str | None, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(request.adapter, []).append(index)
        made: list[GeneratedImage | None] = [None] * len(requests)
        with self._lock, torch.inference_mode():
            for adapter, indices in groups.items():
                self._activate(adapter)
                batch = [requests[i] for i in indices]
                identifier = self.identifiers.get(adapter, "") if adapter else ""
                output = self.pipe(
                    prompt=[r.prompt for r in batch],
                    negative_prompt=[join_negative(identifier, r.negative_prompt) for r in batch],
                    num_inference_steps=params.steps,
                    guidance_scale=params.guidance_scale,
                    width=params.width,
                    height=params.height,
                    # CPU generators: a seed gives the same image on any device.
                    generator=[torch.Generator("cpu").manual_seed(r.seed) for r in batch],
                    output_type="pil",
                )
                images = output.images
                flags = getattr(output, "nsfw_content_detected", None) or [False] * len(batch)
                if self.checker is not None:
                    images, flags = self.checker.check(images)
                for i, image, flagged in zip(indices, images, flags, strict=True):
                    made[i] = GeneratedImage(_png(image), bool(flagged), *image.size)
        return [image for image in made if image is not None]

    def _activate(self, adapter: str | None) -> None:
        if adapter is None:
            if self.adapters:
                self.pipe.disable_lora()
            return
        if adapter not in self.adapters and adapter in self._sources:
            # A generate job planned with it, then another job unloaded it (its version
            # was retired meanwhile): load it again rather than fail the round.
            source, identifier = self._sources[adapter]
            self._load(adapter, source)
            self.identifiers[adapter] = identifier
        # set_adapters does not undo an earlier disable_lora: enable first.
        self.pipe.enable_lora()
        self.pipe.set_adapters([adapter])


def join_negative(identifier: str, negative_prompt: str) -> str:
    """An adapter's identifier followed by a round's own negative prompt ("Weird image. "
    alone when the round has none, exactly as the paper's inference)."""
    if not identifier or not negative_prompt:
        return identifier or negative_prompt
    separator = "" if identifier[-1].isspace() else " "
    return f"{identifier}{separator}{negative_prompt}"


def _png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# -- the generate job --------------------------------------------------------------------

GENERATOR_KEY = "generate.generator"
GENERATOR_LOCK_KEY = "generate.lock"


async def get_generator(ctx: JobContext) -> Generator:
    """The worker's resident generator, (re)loaded when its settings changed."""
    settings = ctx.settings.generation
    key = (
        settings.sd_model,
        ctx.device,
        settings.dtype,
        settings.safety_checker,
        settings.safety_checker_model,
        settings.channels_last,
        settings.torch_compile,
    )
    async with ctx.cache.setdefault(GENERATOR_LOCK_KEY, asyncio.Lock()):
        cached = ctx.cache.get(GENERATOR_KEY)
        if cached is None or cached[0] != key:
            ctx.cache.pop(GENERATOR_KEY, None)
            ctx.log.info("loading the text-to-image pipeline %s", settings.sd_model)
            try:
                generator = await asyncio.to_thread(Generator.from_settings, settings, ctx.device)
            except NoSafetyChecker as exc:  # retrying cannot help: the settings must change
                raise PermanentError(str(exc)) from None
            ctx.cache[GENERATOR_KEY] = cached = (key, generator)
        return cached[1]


def adapter_name(version_id: int) -> str:
    """The name a version's LoRA adapter is loaded under in the generator."""
    return f"v{version_id}"


def load_version(generator: Generator, version: models.ModelVersion, settings: Settings) -> str:
    """Load an `sd_adapter` version's LoRA with its identifier (fetched from the store on
    this machine's first use); returns the adapter name. Blocking: run it in a thread."""
    name = adapter_name(version.id)
    artifact = version.artifact
    generator.load_adapter(
        name,
        lambda: storage(settings).models.opened(artifact),
        str(version.config.get("identifier", "")),
    )
    return name


@dataclass
class _Versions:
    base: models.ModelVersion
    incumbent: models.ModelVersion  # the serving adapter, or the base
    candidates: list[models.ModelVersion]  # adapters in testing that loaded

    def adapter_of(self, version_id: int) -> str | None:
        return None if version_id == self.base.id else adapter_name(version_id)


async def _serving_versions(ctx: JobContext, generator: Generator) -> _Versions:
    """The versions rounds may use now, with their adapters loaded in the generator."""
    # What this generator runs is the serving base: images and the live review agree.
    base = await models.serve_base(ctx.pool, kind="sd_base", artifact=generator.model)
    incumbent = await models.serving(ctx.pool, "sd_adapter") or base
    if incumbent is not base:
        # The serving adapter must load: without it the round would silently be the base's.
        await asyncio.to_thread(load_version, generator, incumbent, ctx.settings)
    candidates = []
    for version in await models.testing(ctx.pool, "sd_adapter"):
        try:
            await asyncio.to_thread(load_version, generator, version, ctx.settings)
        except StoreUnavailable as exc:
            # The store, not the adapter: the job fails and is retried (its round waits),
            # rather than the rounds silently going without the candidate.
            raise StoreUnavailable(
                f"cannot fetch the candidate adapter {version.name} for A/B rounds: {exc}"
            ) from None
        except Exception:
            # The adapter itself is broken (missing or corrupt in the store, or it does not
            # load): rounds go on without it, rather than stopping for every version.
            ctx.log.exception("adapter %s does not load: left out of A/B rounds", version.name)
            continue
        candidates.append(version)
    keep = {adapter_name(v.id) for v in [*candidates, incumbent] if v is not base}
    await asyncio.to_thread(generator.keep_adapters, keep)
    return _Versions(base, incumbent, candidates)


@dataclass
class _Round:
    job: jobs.Job
    view: rounds.RoundView
    params: SamplingParams
    plan: RoundPlan
    seeds: list[int]


def _round_id(job: jobs.Job) -> int:
    round_id = job.payload.get("round_id")
    if not isinstance(round_id, int) or isinstance(round_id, bool):
        raise PermanentError(f"payload has no integer round_id: {job.payload!r}")
    return round_id


def _seeds(params: dict[str, Any], k: int, rng: random.Random) -> list[int]:
    seed = params.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0:
        return [seed + i for i in range(k)]
    return [rng.randrange(2**31) for _ in range(k)]


async def handle_generate(ctx: JobContext) -> None:
    """Generate the round of `ctx.job` (payload `{"round_id": …}`) and compatible queued
    rounds; every job of the batch completes in its round's transaction."""
    _round_id(ctx.job)  # a malformed payload is dead-lettered before any work
    generator = await get_generator(ctx)
    batch = [ctx.job]
    batch_key = ctx.job.payload.get("batch")
    if batch_key is not None:
        limit = ctx.settings.generation.batch_rounds - 1
        batch += await ctx.claim_matching({"batch": batch_key}, limit)
    # An exception fails the batch's jobs (the worker's `jobs.fail`); a job dead-lettered
    # there fails its round in the same transaction, so the requester sees why and can retry.
    await _generate_batch(ctx, generator, batch)


async def _generate_batch(ctx: JobContext, generator: Generator, batch: list[jobs.Job]) -> None:
    started = time.perf_counter()
    settings = ctx.settings.generation
    versions = await _serving_versions(ctx, generator)
    candidate_ids = [v.id for v in versions.candidates]
    work: list[_Round] = []
    lost = 0  # jobs whose lease another worker took meanwhile
    for job in batch:
        try:
            round_id = _round_id(job)
        except PermanentError as exc:  # only an extra job can get here
            await jobs.fail(ctx.pool, job, ctx.worker_id, str(exc), retry=False)
            ctx.settled(job)
            continue
        view = await rounds.start_generating(ctx.pool, round_id)
        if view is None:  # e.g. its requester was forgotten meanwhile
            lost += not await _commit(ctx, job, round_id)
            continue
        try:
            params = SamplingParams.for_round(view.round.params, settings)
        except ValueError as exc:
            lost += not await _commit(ctx, job, round_id, failure=str(exc))
            continue
        rng = random.Random(job.id)  # a retry of this job plans and draws the same round
        plan = plan_round(
            view.round.k, versions.incumbent.id, candidate_ids, ab_share=settings.ab_share, rng=rng
        )
        work.append(_Round(job, view, params, plan, _seeds(view.round.params, view.round.k, rng)))

    by_params: dict[SamplingParams, list[_Round]] = {}
    for item in work:
        by_params.setdefault(item.params, []).append(item)
    made: dict[int, list[GeneratedImage]] = {}
    for params, items in by_params.items():
        requests = [
            ImageRequest(
                item.view.prompt,
                item.view.negative_prompt,
                seed,
                versions.adapter_of(version_id),
            )
            for item in items
            for seed, version_id in zip(item.seeds, item.plan.versions, strict=True)
        ]
        images = await asyncio.to_thread(generator.generate, requests, params)
        for item in items:
            made[item.job.id], images = images[: item.view.round.k], images[item.view.round.k :]
    generated_at = time.perf_counter()
    run = {
        "batch": [item.job.id for item in work],
        "device": generator.device,
        "generate_seconds": round(generated_at - started, 3),
    }

    for item in work:
        lost += not await _finish_round(ctx, item, made[item.job.id], run)
    ctx.log.info(
        "generated %d round(s) (jobs %s), %d image(s) in %.2f s (pipeline %.2f s)%s",
        len(work),
        run["batch"],
        sum(len(images) for images in made.values()),
        time.perf_counter() - started,
        generated_at - started,
        f"; {lost} job(s) taken over meanwhile" if lost else "",
    )
    if not ctx.completed:
        raise LeaseLost(f"job {ctx.job.id} was taken over by another worker")


async def _finish_round(
    ctx: JobContext, item: _Round, images: list[GeneratedImage], run: dict[str, Any]
) -> bool:
    # Their keys and digests only: they are uploaded under their keys' locks, in `_complete`.
    stored = [ctx.store.blob(image.png) for image in images]
    rows = [
        NewImage(
            position=position,
            sha256=blob.sha256,
            storage_key=blob.key,
            seed=seed,
            model_version_id=version_id,
            width=image.width,
            height=image.height,
            nsfw=image.nsfw,
        )
        for position, (image, blob, seed, version_id) in enumerate(
            zip(images, stored, item.seeds, item.plan.versions, strict=True), start=1
        )
    ]
    round_id = item.view.round.id
    result = {
        "round_id": round_id,
        "plan": item.plan.as_json(),
        "images": [
            {
                "position": row.position,
                "seed": row.seed,
                "model_version_id": row.model_version_id,
                "nsfw": row.nsfw,
                "sha256": row.sha256,
            }
            for row in rows
        ],
        **run,  # the batch it was generated in, the device, the pipeline's time
    }
    flagged = sum(row.nsfw for row in rows)
    if len(rows) - flagged < MIN_SHOWN:
        failure = (
            f"The safety filter held back {flagged} of the {len(rows)} images, leaving too few "
            "to choose from. Try another prompt."
        )
        return await _commit(ctx, item.job, round_id, result=result, failure=failure)
    files = [image.png for image in images]
    return await _commit(
        ctx, item.job, round_id, result=result, images=rows, files=files,
        incumbent=item.plan.incumbent,
    )  # fmt: skip


async def _commit(
    ctx: JobContext,
    job: jobs.Job,
    round_id: int,
    *,
    result: dict[str, Any] | None = None,
    images: list[NewImage] | None = None,
    files: Sequence[bytes] = (),
    failure: str | None = None,
    incumbent: int | None = None,
) -> bool:
    """The round's outcome and the job's completion, in one transaction (a finished round
    records its plan's `incumbent`); with neither `images` nor `failure` the job completes
    as a no-op. A failed round keeps no image rows, so that retrying it starts clean. False
    (and nothing written) if another worker took the job over. Files uploaded for the round
    that no row names in the end (the round failed or was forgotten meanwhile, the job was
    taken over, an upload failed) are deleted, unless something else uses them."""
    result = dict(result or {"round_id": round_id})
    try:
        return await _complete(ctx, job, round_id, result, images, files, failure, incumbent)
    finally:
        if images is not None and result.get("status") != "ready":
            await _delete_strays(ctx, [row.storage_key for row in images])


async def _delete_strays(ctx: JobContext, keys: list[str]) -> None:
    try:
        await image_rows.delete_unreferenced(ctx.pool, keys, ctx.store.delete)
    except LockTimeout as exc:  # unreferenced files are harmless, if wasteful
        ctx.log.warning("could not delete the images of an unfinished round: %s", exc)


async def _complete(
    ctx: JobContext,
    job: jobs.Job,
    round_id: int,
    result: dict[str, Any],
    images: list[NewImage] | None,
    files: Sequence[bytes],
    failure: str | None,
    incumbent: int | None,
) -> bool:
    try:
        async with transaction(ctx.pool) as conn:
            if failure is not None:
                await rounds.fail_round(conn, round_id, failure)
                result.update(status="failed", error=failure)
            elif images is not None and await rounds.finish_round(
                conn,
                round_id,
                images,
                incumbent_id=incumbent,
                # Concurrently: on an object store each is one conditional PUT.
                store_files=lambda: asyncio.gather(*(ctx.store.put_async(f) for f in files)),
            ):
                result["status"] = "ready"
            else:
                result.update(status="skipped", reason="the round no longer waits for images")
            if not await ctx.complete(conn, result, job=job):
                raise LeaseLost(f"job {job.id} was taken over by another worker")
    except LeaseLost:
        ctx.log.warning("lost the lease of job %s: its round's outcome was rolled back", job.id)
        result["status"] = "lost"
        return False
    return True
