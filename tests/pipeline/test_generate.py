"""The generate job end to end: a real worker, the tiny SD pipeline loaded with
`from_pretrained`, LoRA adapters loaded with `load_lora_weights`, real PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import io
from datetime import timedelta
from pathlib import Path

import pytest
from PIL import Image as PILImage

import pipeline.generate as generate
from db import jobs, models, rounds, users
from db.images import images_of_round
from db.rounds import ROUNDS_CHANNEL
from hps.store import LocalImageStore
from pipeline.generate import (
    GENERATOR_KEY,
    Generator,
    ImageRequest,
    SamplingParams,
    handle_generate,
)
from pipeline.handlers import JobContext, LeaseLost
from pipeline.worker import Worker
from tests.db.test_rounds import Listener
from tests.pipeline.conftest import make_settings, running, stored_pngs, wait_until

PROMPT = "a red cube on a wooden table"


def _settings(sd: Path, **generation):  # type: ignore[no-untyped-def]
    return make_settings(
        generation={
            "sd_model": str(sd),
            "steps": 2,
            "width": 64,
            "height": 64,
            "safety_checker": False,
            **generation,
        }
    )


def _worker(pool, settings, name: str = "gpu-0") -> Worker:  # type: ignore[no-untyped-def]
    return Worker(pool, settings, kinds=["generate"], worker_id=name)


async def _done(pool, job_id: int) -> jobs.Job | None:  # type: ignore[no-untyped-def]
    job = await jobs.get(pool, job_id)
    return job if job.state == "done" else None


def _sha(png: bytes) -> str:
    return hashlib.sha256(png).hexdigest()


async def test_a_generate_job_makes_k_images_with_seeds_versions_and_a_notify(
    pool, database_url: str, tiny_sd_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    settings = _settings(tiny_sd_dir)
    created = await rounds.create_round(pool, requester_discord_id=7, prompt=PROMPT, k=4)
    round_id = created.round.id
    worker = _worker(pool, settings)
    async with Listener(database_url, ROUNDS_CHANNEL) as heard, running(worker):
        assert await heard.next() == {"round_id": round_id, "status": "generating"}
        assert await heard.next() == {"round_id": round_id, "status": "ready"}
        job = await wait_until(lambda: _done(pool, created.job.id))
    view = await rounds.get_round_view(pool, round_id)
    assert view.round.status == "ready" and [i.position for i in view.images] == [1, 2, 3, 4]
    base = await models.get(pool, f"sd_base:{tiny_sd_dir}")
    assert base.kind == "sd_base" and base.status == "serving"
    assert {i.model_version_id for i in view.images} == {base.id}
    seeds = [i.seed for i in view.images]
    assert len(set(seeds)) == 4
    assert job.worker_id == "gpu-0" and job.attempts == 1
    assert job.result["status"] == "ready" and job.result["device"] == "cpu"
    assert job.result["plan"] == {
        "incumbent": base.id,
        "candidate": None,
        "versions": [base.id] * 4,
    }
    assert (
        await pool.fetchval("SELECT incumbent_version_id FROM rounds WHERE id = $1", round_id)
        == base.id
    )
    assert [i["seed"] for i in job.result["images"]] == seeds
    assert job.result["batch"] == [job.id]

    store = LocalImageStore(settings.images_dir)
    for image in view.images:
        png = store.get(image.storage_key)
        assert _sha(png) == image.sha256 and not image.nsfw
        assert PILImage.open(io.BytesIO(png)).size == (64, 64) == (image.width, image.height)
    # The recorded seeds are the real ones: they make the same images again.
    generator: Generator = worker.cache[GENERATOR_KEY][1]
    params = SamplingParams.for_round({}, settings.generation)
    again = generator.generate([ImageRequest(PROMPT, "", seed) for seed in seeds], params)
    assert [_sha(i.png) for i in again] == [i.sha256 for i in view.images]


async def test_compatible_queued_rounds_are_generated_in_one_batch(pool, tiny_sd_dir: Path) -> None:  # type: ignore[no-untyped-def]
    settings = _settings(tiny_sd_dir, batch_rounds=3)
    same = [
        await rounds.create_round(pool, requester_discord_id=n, prompt=f"cube {n}", k=2 + n % 2)
        for n in range(4)
    ]
    other = await rounds.create_round(
        pool, requester_discord_id=9, prompt="sphere", k=2, params={"steps": 3}
    )
    async with running(_worker(pool, settings)):
        for created in [*same, other]:
            await wait_until(lambda c=created: _done(pool, c.job.id))
    results = [(await jobs.get(pool, c.job.id)).result for c in [*same, other]]
    ids = [c.job.id for c in same]
    # At most 3 rounds a call: the first three of equal parameters together, then the rest.
    assert [r["batch"] for r in results] == [ids[:3]] * 3 + [ids[3:]] + [[other.job.id]]
    for created, result in zip([*same, other], results, strict=True):
        assert result["status"] == "ready"
        assert len(await images_of_round(pool, created.round.id, include_nsfw=True)) == (
            created.round.k
        )


async def test_a_round_mixing_two_adapters_records_the_version_of_each_image(
    pool, tiny_sd_dir: Path, tiny_lora_dirs: list[Path]
) -> None:  # type: ignore[no-untyped-def]
    base = await models.ensure_base(pool, kind="sd_base", artifact=str(tiny_sd_dir))
    serving, testing = [
        await models.register(pool, kind="sd_adapter", artifact=str(path), parent_id=base.id)
        for path in tiny_lora_dirs
    ]
    await models.promote(pool, serving.id, actor="test")
    await models.start_testing(pool, testing.id, actor="test")
    settings = _settings(tiny_sd_dir, ab_share=1.0)
    created = await rounds.create_round(pool, requester_discord_id=1, prompt=PROMPT, k=4)
    worker = _worker(pool, settings)
    async with running(worker):
        job = await wait_until(lambda: _done(pool, created.job.id))
    shown = (await rounds.get_round_view(pool, created.round.id)).images
    versions = [i.model_version_id for i in shown]
    assert sorted(versions) == sorted([serving.id, testing.id] * 2)
    assert job.result["plan"] == {
        "incumbent": serving.id,
        "candidate": testing.id,
        "versions": versions,
    }
    # The round records its incumbent: the candidate's side is the other version's.
    incumbent = "SELECT incumbent_version_id FROM rounds WHERE id = $1"
    assert await pool.fetchval(incumbent, created.round.id) == serving.id
    # Each image is what its recorded version makes from its recorded seed (the same
    # calls again: batch composition changes CPU numerics), and differs from what the base
    # model and the other adapter make from that seed.
    generator: Generator = worker.cache[GENERATOR_KEY][1]
    params = SamplingParams.for_round({}, settings.generation)
    swap = {serving.id: testing.id, testing.id: serving.id}

    def make(adapter_of) -> list[str]:  # type: ignore[no-untyped-def]
        requests = [ImageRequest(PROMPT, "", i.seed, adapter_of(i)) for i in shown]
        return [_sha(image.png) for image in generator.generate(requests, params)]

    assert make(lambda i: f"v{i.model_version_id}") == [i.sha256 for i in shown]
    by_base = make(lambda i: None)
    by_other = make(lambda i: f"v{swap[i.model_version_id]}")
    for image, base_sha, other_sha in zip(shown, by_base, by_other, strict=True):
        assert image.sha256 != base_sha and image.sha256 != other_sha


async def test_flagged_images_are_recorded_never_shown_and_too_many_fail_the_round(
    pool, tiny_sd_flagging_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    # The stand-in safety checker flags the first image of each pipeline call of 4.
    settings = _settings(tiny_sd_flagging_dir, safety_checker=True)
    async with running(_worker(pool, settings)):
        four = await rounds.create_round(pool, requester_discord_id=1, prompt=PROMPT, k=4)
        await wait_until(lambda: _done(pool, four.job.id))
        two = await rounds.create_round(pool, requester_discord_id=2, prompt="a blue cone", k=2)
        failed_job = await wait_until(lambda: _done(pool, two.job.id))

    recorded = await images_of_round(pool, four.round.id, include_nsfw=True)
    assert [i.nsfw for i in recorded] == [True, False, False, False]
    view = await rounds.get_round_view(pool, four.round.id)
    assert view.round.status == "ready" and [i.position for i in view.images] == [2, 3, 4]
    blacked = LocalImageStore(settings.images_dir).get(recorded[0].storage_key)
    assert PILImage.open(io.BytesIO(blacked)).getextrema() == ((0, 0), (0, 0), (0, 0))

    failed = await rounds.get_round(pool, two.round.id)
    reason = (
        "The safety filter held back 1 of the 2 images, leaving too few to choose from. "
        "Try another prompt."
    )
    assert failed.status == "failed" and failed.error == reason
    assert await images_of_round(pool, two.round.id, include_nsfw=True) == []
    assert failed_job.result["status"] == "failed" and failed_job.result["error"] == reason
    assert [i["nsfw"] for i in failed_job.result["images"]] == [True, False]
    # The failed round's files went with it (its blacked image has the bytes, and so the
    # file, of the ready round's, which stays).
    assert stored_pngs(settings.images_dir) == sorted(f"{i.sha256}.png" for i in recorded)


async def test_a_model_without_a_safety_checker_is_refused_while_the_check_is_on(
    pool, tiny_sd_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    """Its images would go out unchecked: the job dies at once (retrying cannot help) and
    the requester is told, rather than seeing unchecked images."""
    # tiny_sd_dir has no checker, and no standalone one is configured.
    settings = _settings(tiny_sd_dir, safety_checker=True, safety_checker_model=None)
    async with running(_worker(pool, settings)):
        created = await rounds.create_round(pool, requester_discord_id=1, prompt=PROMPT, k=4)
        dead = await wait_until(lambda: _state(pool, created.job.id, "dead"), within=60)
    assert dead.attempts == 1
    assert dead.error == (
        f"{tiny_sd_dir} has no safety checker, so its images could not be checked: set "
        "generation.safety_checker_model (HPS_GENERATION__SAFETY_CHECKER_MODEL) to check them "
        "with the standalone one, or generation.safety_checker = false "
        "(HPS_GENERATION__SAFETY_CHECKER=false) to post them unchecked"
    )
    failed = await rounds.get_round(pool, created.round.id)
    assert failed.status == "failed"
    assert failed.error == "Generation failed after 1 attempt(s). You can retry it."
    assert await images_of_round(pool, created.round.id, include_nsfw=True) == []


async def _state(pool, job_id: int, state: str) -> jobs.Job | None:  # type: ignore[no-untyped-def]
    job = await jobs.get(pool, job_id)
    return job if job.state == state else None


async def test_a_retry_after_a_crash_never_duplicates_images(
    pool, tiny_sd_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    real_commit = generate._commit
    crashes = []

    async def crash_once(*args, **kwargs):  # type: ignore[no-untyped-def]
        if not crashes:
            crashes.append(1)
            raise ConnectionResetError("the database went away")
        return await real_commit(*args, **kwargs)

    monkeypatch.setattr(generate, "_commit", crash_once)
    settings = _settings(tiny_sd_dir)
    created = await rounds.create_round(pool, requester_discord_id=1, prompt=PROMPT, k=4)
    async with running(_worker(pool, settings)):
        job = await wait_until(lambda: _done(pool, created.job.id))
    assert job.attempts == 2 and crashes == [1]
    images = await images_of_round(pool, created.round.id, include_nsfw=True)
    assert [i.position for i in images] == [1, 2, 3, 4]
    # The retry drew the same seeds, so it stored the same four files again (no strays).
    assert stored_pngs(settings.images_dir) == sorted(f"{i.sha256}.png" for i in images)


async def test_rounds_that_cannot_be_generated_end_their_job_without_images(
    pool, tiny_sd_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    settings = _settings(tiny_sd_dir)
    # The requester of a round is forgotten while its job runs: the round and its job are
    # deleted, and the worker lets go of the job, writing nothing.
    gone = await rounds.create_round(pool, requester_discord_id=2, prompt=PROMPT, k=2)
    [claimed] = await jobs.claim(pool, ["generate"], "w", timedelta(minutes=1))
    await users.forget_user(pool, 2)
    ctx = JobContext(claimed, settings, pool, LocalImageStore(settings.images_dir), "w", "cpu", {})
    with pytest.raises(LeaseLost):
        await handle_generate(ctx)
    assert await jobs.get(pool, gone.job.id) is None

    # Forgotten once the images are made, before the worker's commit: nothing is stored.
    real_finish = rounds.finish_round

    async def forgotten_first(*args, **kwargs):  # type: ignore[no-untyped-def]
        await users.forget_user(pool, 3)
        return await real_finish(*args, **kwargs)

    late = await rounds.create_round(pool, requester_discord_id=3, prompt=PROMPT, k=2)
    [claimed] = await jobs.claim(pool, ["generate"], "w", timedelta(minutes=1))
    ctx = JobContext(claimed, settings, pool, LocalImageStore(settings.images_dir), "w", "cpu", {})
    monkeypatch.setattr(rounds, "finish_round", forgotten_first)
    with pytest.raises(LeaseLost):
        await handle_generate(ctx)
    monkeypatch.setattr(rounds, "finish_round", real_finish)
    assert await jobs.get(pool, late.job.id) is None
    assert await rounds.get_round(pool, late.round.id) is None
    assert stored_pngs(settings.images_dir) == []

    # Forgotten while the images are uploaded (under their keys' locks): the forget waits for
    # the worker's commit, then deletes the round with its images, and the files go too.
    class ForgettingStore(LocalImageStore):
        forget: asyncio.Task[object] | None = None

        async def put_async(self, data: bytes, suffix: str = ".png"):  # type: ignore[no-untyped-def]
            if self.forget is None:
                self.forget = asyncio.create_task(
                    users.forget_user(pool, 4, delete=LocalImageStore(settings.images_dir).delete)
                )
                await asyncio.sleep(0.2)  # the forget is waiting for the round now
            return await super().put_async(data, suffix)

    during = await rounds.create_round(pool, requester_discord_id=4, prompt=PROMPT, k=2)
    [claimed] = await jobs.claim(pool, ["generate"], "w", timedelta(minutes=1))
    store = ForgettingStore(settings.images_dir)
    ctx = JobContext(claimed, settings, pool, store, "w", "cpu", {})
    await handle_generate(ctx)
    assert store.forget is not None  # handle_generate committed: the forget waited for it
    forgotten = await store.forget
    assert forgotten is not None and forgotten.rounds_deleted == 1
    assert forgotten.files_deleted == 2
    assert await rounds.get_round(pool, during.round.id) is None
    assert stored_pngs(settings.images_dir) == []  # stored, then deleted: no row names them

    bad = await rounds.create_round(
        pool, requester_discord_id=1, prompt=PROMPT, k=2, params={"steps": 0}
    )
    malformed, _ = await jobs.enqueue(pool, "generate", {"round_id": "seven"})
    async with running(_worker(pool, settings)):
        await wait_until(lambda: _done(pool, bad.job.id))
        dead = await wait_until(lambda: _dead(pool, malformed.id))
    failed = await rounds.get_round(pool, bad.round.id)
    assert failed.status == "failed" and failed.error == (
        "This round's parameters are not valid (steps: Input should be greater than or equal to 1)."
    )
    assert await images_of_round(pool, bad.round.id, include_nsfw=True) == []
    assert dead.attempts == 1
    assert dead.error == "payload has no integer round_id: {'round_id': 'seven'}"


async def _dead(pool, job_id: int) -> jobs.Job | None:  # type: ignore[no-untyped-def]
    job = await jobs.get(pool, job_id)
    return job if job.state == "dead" else None


def test_an_adapters_identifier_leads_the_negative_prompt(
    tiny_sd_dir: Path, tiny_lora_dirs: list[Path]
) -> None:
    assert generate.join_negative("Weird image. ", "") == "Weird image. "
    assert generate.join_negative("Weird image. ", "blurry") == "Weird image. blurry"
    assert generate.join_negative("Weird image.", "blurry") == "Weird image. blurry"
    assert generate.join_negative("", "blurry") == "blurry"
    generator = Generator(str(tiny_sd_dir), device="cpu", safety_checker=False)
    params = SamplingParams(steps=2, guidance_scale=7.5, width=64, height=64)
    generator.load_adapter("tagged", str(tiny_lora_dirs[0]), "Weird image. ")
    generator.load_adapter("plain", str(tiny_lora_dirs[0]))
    [tagged] = generator.generate([ImageRequest(PROMPT, "blurry", 3, "tagged")], params)
    [spelled] = generator.generate(
        [ImageRequest(PROMPT, "Weird image. blurry", 3, "plain")], params
    )
    [untagged] = generator.generate([ImageRequest(PROMPT, "blurry", 3, "plain")], params)
    assert tagged.png == spelled.png != untagged.png
    # The base pipeline has no identifier; a version's comes from its config.
    [base] = generator.generate([ImageRequest(PROMPT, "", 3)], params)
    assert base.png != generator.generate([ImageRequest(PROMPT, "", 3, "tagged")], params)[0].png
    generator.keep_adapters({"plain"})
    assert generator.identifiers == {"plain": ""}


def test_a_model_without_a_checker_is_checked_by_the_standalone_one(
    tiny_sd_dir: Path, tmp_path: Path
) -> None:
    """SDXL and SD 2.x ship no checker: the one SD 1.x ships runs on their images instead,
    loaded through `from_pretrained` from `generation.safety_checker_model`."""
    from pipeline.generate import Generator, ImageRequest, SamplingParams
    from pipeline.tiny_models import build_tiny_safety_checker

    params = SamplingParams(steps=2, guidance_scale=7.5, width=64, height=64)
    requests = [ImageRequest(PROMPT, "", seed) for seed in (1, 2)]
    unchecked = Generator(str(tiny_sd_dir), device="cpu", safety_checker=False)
    assert unchecked.checker is None
    plain = unchecked.generate(requests, params)
    for flag_all, expected in ((False, [False, False]), (True, [True, True])):
        folder = build_tiny_safety_checker(tmp_path / f"checker-{flag_all}", flag_all=flag_all)
        generator = Generator(
            str(tiny_sd_dir), device="cpu", safety_checker=True, safety_checker_model=str(folder)
        )
        made = generator.generate(requests, params)
        assert [image.nsfw for image in made] == expected
        for image, same in zip(made, plain, strict=True):
            pixels = PILImage.open(io.BytesIO(image.png)).getextrema()
            if image.nsfw:  # blacked out, as the pipeline's own checker does
                assert pixels == ((0, 0), (0, 0), (0, 0))
            else:
                assert image.png == same.png
