"""The adaptation loop end to end on the tiny models: the adapt_sd job crashes mid-fine-tune,
leaving the registry as it was; retried, it resumes and registers an adapter in A/B testing;
`hps adapt eval`'s gate retires a candidate that fails it."""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from pathlib import Path

import pytest
from PIL import Image

import pipeline.adapt.lora_train as lora_train
from db import jobs, models, rounds
from hps.files import sha256_file
from hps.store import LocalImageStore
from pipeline.adapt.prompts import is_held_out
from pipeline.adapt.recipes import handle_adapt_sd
from pipeline.adapt.run import evaluate_version
from pipeline.generate import Generator, load_version
from pipeline.handlers import JobContext
from pipeline.hps_model import HPSModel
from pipeline.runs import Resources, Run
from pipeline.worker import Worker
from tests.colour_task import COLOURS, OBJECTS
from tests.pipeline.conftest import make_settings, running, wait_until

PROMPTS = [f"a {colour} {thing}" for colour in list(COLOURS)[:4] for thing in OBJECTS[:4]]


def _settings(tiny_sd_dir: Path, tiny_model: tuple[Path, Path], regularization: Path, **adapt):  # type: ignore[no-untyped-def]
    config, weights = tiny_model
    return make_settings(
        generation={"sd_model": str(tiny_sd_dir), "steps": 2, "width": 64, "height": 64,
                    "safety_checker": False},
        models={"hps_arch": str(config), "hps_pretrained": str(weights), "device": "cpu"},
        adapt={
            "min_prompts": 4, "heldout_fraction": 0.25, "eval_prompts": 4, "eval_seeds": 2,
            "sample_batch": 8, "resolution": 64, "batch_size": 4, "total_batch_size": 4,
            "learning_rate": 1e-2, "max_train_steps": 6, "checkpointing_steps": 3,
            "num_workers": 0, "validation_images": 1, "validation_prompts": ["a red cube"],
            "regularization_data": str(regularization), "offline_gate": "none", **adapt,
        },
    )  # fmt: skip


def _regularization(folder: Path) -> Path:
    folder.mkdir()
    rows = []
    for name, colour in (("sky.png", "skyblue"), ("grass.png", "green")):
        Image.new("RGB", (64, 64), colour).save(folder / name)
        rows.append({"file_name": name, "caption": f"a photo of {colour}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


async def test_the_job_crashes_mid_fine_tune_changes_nothing_then_resumes_and_registers(
    pool,
    tiny_sd_dir: Path,
    tiny_lora_dirs: list[Path],
    tiny_model,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # type: ignore[no-untyped-def]
    settings = _settings(tiny_sd_dir, tiny_model, _regularization(tmp_path / "laion"))
    for prompt in PROMPTS:
        await rounds.create_round(pool, requester_discord_id=7, prompt=prompt, k=4)
    base = await models.ensure_base(pool, kind="sd_base", artifact=str(tiny_sd_dir))
    serving = await models.register(pool, kind="sd_adapter", artifact=str(tiny_lora_dirs[0]),
                                    config={"identifier": "Odd. "}, parent_id=base.id)  # fmt: skip
    await models.promote(pool, serving.id, actor="test")
    before = {v.id: v.status for v in await models.list_versions(pool)}
    job, _ = await jobs.enqueue_training(pool, "sd", requested_by="test")

    # Attempt 1 crashes at fine-tuning step 5 (after checkpoint 3).
    real_record = lora_train.record_step

    def crash(path: Path, record: dict) -> None:
        if record["step"] == 5:
            raise RuntimeError("injected crash mid-fine-tune")
        real_record(path, record)

    monkeypatch.setattr(lora_train, "record_step", crash)
    [claimed] = await jobs.claim(pool, ["adapt_sd"], "crashing", timedelta(minutes=5))
    store = LocalImageStore(settings.images_dir)
    ctx = JobContext(claimed, settings, pool, store, "crashing", "cpu", {})
    with pytest.raises(RuntimeError, match="injected crash"):
        await handle_adapt_sd(ctx)
    await jobs.fail(pool, claimed, "crashing", "injected crash", backoff=timedelta(0))
    monkeypatch.setattr(lora_train, "record_step", real_record)

    name = f"sd_adapter-job{job.id}"
    assert {v.id: v.status for v in await models.list_versions(pool)} == before
    assert await models.get(pool, name) is None and not (settings.models_dir / name).exists()
    run = Run.open(settings.runs_dir / name)
    assert list(run.data["stages"]) == ["prompts", "samples", "label"]
    assert run.data["parent"] == {"id": serving.id, "name": serving.name, "kind": "sd_adapter"}
    assert [s for s, _ in lora_train.checkpoints(run.path / "train")] == [3]

    # The samples: 4 images per training prompt, seeds recorded, made by the serving
    # adapter, scored by the configured (tiny) HPS model.
    prompts = json.loads((run.path / "prompts.json").read_text())
    assert sorted(prompts["train"] + prompts["heldout"]) == sorted(PROMPTS)
    assert sorted(prompts["heldout"]) == ["a blue ball", "a red house"]  # by hash: 2 of 16
    assert all(is_held_out(p, 0.25) for p in prompts["heldout"])
    samples = [json.loads(x) for x in (run.path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 * len(prompts["train"])
    assert len({s["seed"] for s in samples}) == len(samples)
    config, weights = tiny_model
    scorer = HPSModel.load(config, pretrained=str(weights), device="cpu")
    first = samples[0]
    rescored = scorer.score(first["prompt"], [run.path / first["file"]])[0]
    assert rescored == pytest.approx(first["score"], abs=1.0)  # JPEG of the scored pixels
    generator = Generator(str(tiny_sd_dir), device="cpu", safety_checker=False)
    adapter = load_version(generator, serving, settings)
    assert generator.identifiers[adapter] == "Odd. "
    finetune = [json.loads(x) for x in (run.path / "finetune.jsonl").read_text().splitlines()]
    label = run.stage("label")
    assert label["regularization"] == 2 and len(finetune) == (
        label["positives"] + label["negatives"] + 2
    )
    for item in finetune:
        if item["kind"] == "negative":
            assert item["caption"].startswith("Weird image. ")
            assert item["caption"].removeprefix("Weird image. ") in prompts["train"]

    # Attempt 2, by a worker: resumes after labelling, fine-tunes on from checkpoint 3.
    caplog.set_level(logging.INFO, logger="pipeline.runs")
    worker = Worker(pool, settings, kinds=["adapt_sd"], worker_id="gpu-1")
    async with running(worker):
        done = await wait_until(lambda: _state(pool, job.id, "done"), within=120)
    assert done.attempts == 2
    assert f"run {name} resumes after its label stage" in caplog.text
    run = Run.open(settings.runs_dir / name)
    assert run.stage("train")["resumed_from"] == 3 and run.stage("train")["steps"] == 6

    version = await models.get(pool, name)
    assert version.kind == "sd_adapter" and version.status == "testing"
    assert version.parent_id == serving.id
    assert version.config["identifier"] == "Weird image. "
    assert version.config["recipe"]["adapt"]["max_train_steps"] == 6
    # Published in the (local) store as models/<name>/<sha256 of the weights>.
    assert version.artifact == f"models/{name}/{version.sha256}"
    artifact = settings.data_dir / version.artifact
    assert version.sha256 == sha256_file(artifact / "pytorch_lora_weights.safetensors")
    assert (artifact / "hps-manifest.json").is_file()
    assert version.metrics["data"]["positives"] == label["positives"]
    assert version.metrics["training"]["steps"] == 6
    offline = version.metrics["offline"]
    assert offline["pairs"] == 4 and offline["prompts"] == 2 and offline["parent"] == serving.name
    assert offline["passed"] and offline["gate"].startswith("the offline gate is off")
    assert len(list((run.path / "eval" / "images").iterdir())) == 8
    # The serving versions are as they were: the new adapter only entered A/B testing.
    assert (await models.serving(pool, "sd_adapter")).id == serving.id
    assert (await models.serving(pool, "sd_base")).id == base.id
    assert done.result["status"] == "registered" and done.result["testing"] is True
    assert done.result["version"] == name
    summary = done.result["summary"]
    assert summary.startswith(f"SD adaptation run {name}: 14 prompts, 56 images")
    assert f"Registered {name}. In A/B testing: the offline gate is off" in summary
    assert done.result["metrics"]["steps"] == 6

    # `hps adapt eval` on a candidate with a strict gate: recorded, then retired.
    candidate = await models.register(
        pool, kind="sd_adapter", artifact=version.artifact, config=version.config,
        parent_id=serving.id,
    )  # fmt: skip
    strict = settings.with_changes("adapt", offline_gate="win_rate", offline_min_win_rate=0.99)
    resources = Resources(generator=_async(generator), scorer=_async(scorer))
    evaluated, report, passed, reason = await evaluate_version(
        pool, strict, None, resources=resources, actor="test", progress=False
    )
    assert evaluated.id == candidate.id and evaluated.status == "retired" and not passed
    assert report["pairs"] == 4 and reason.startswith("offline evaluation failed: paired win")
    assert reason.endswith("win-rate lower bound ≤ 99%")
    assert evaluated.metrics["offline"]["gate"] == reason
    [event] = [e for e in await models.events(pool, "sd_adapter") if e["name"] == candidate.name
               and e["action"] == "retired"]  # fmt: skip
    assert event["reason"] == reason and event["actor"] == "test"


def _async(value):  # type: ignore[no-untyped-def]
    async def get():  # type: ignore[no-untyped-def]
        return value

    return get


async def _state(pool, job_id: int, state: str) -> jobs.Job | None:  # type: ignore[no-untyped-def]
    job = await jobs.get(pool, job_id)
    if job.state == "dead":
        raise AssertionError(f"job {job_id} died: {job.error}")
    return job if job.state == state else None


async def test_too_few_prompts_skip_the_job_saying_why(
    pool, tiny_sd_dir: Path, tiny_model, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    settings = _settings(
        tiny_sd_dir, tiny_model, tmp_path, min_prompts=50, regularization_data=None
    )
    await rounds.create_round(pool, requester_discord_id=7, prompt="a red cube", k=4)
    await rounds.create_round(pool, requester_discord_id=7, prompt="a blue cone", k=4)  # held out
    job, _ = await jobs.enqueue_training(pool, "sd", requested_by="test")
    async with running(Worker(pool, settings, kinds=["adapt_sd"])):
        done = await wait_until(lambda: _state(pool, job.id, "done"))
    assert done.result["status"] == "skipped"
    assert done.result["summary"] == (
        "SD adaptation skipped: 1 prompts to learn from, fewer than the 50 needed "
        "(adapt.min_prompts)."
    )
    assert await models.list_versions(pool, "sd_adapter") == []


async def test_bad_regularization_data_dead_letters_the_job_before_any_work(
    pool, tiny_sd_dir: Path, tiny_model, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    settings = _settings(tiny_sd_dir, tiny_model, tmp_path / "missing", min_prompts=1,
                         images_per_prompt=4, max_prompts=1)  # fmt: skip
    await rounds.create_round(pool, requester_discord_id=7, prompt="a red cube", k=4)
    await rounds.create_round(pool, requester_discord_id=7, prompt="a blue cone", k=4)
    job, _ = await jobs.enqueue_training(pool, "sd", requested_by="test")
    async with running(Worker(pool, settings, kinds=["adapt_sd"])):
        dead = await wait_until(lambda: _dead(pool, job.id), within=60)
    assert dead.attempts == 1
    assert dead.error.startswith("SD adaptation cannot run: no regularization data at ")
    assert await models.list_versions(pool, "sd_adapter") == []
    assert not settings.runs_dir.exists()  # stopped before any work


async def _dead(pool, job_id: int) -> jobs.Job | None:  # type: ignore[no-untyped-def]
    job = await jobs.get(pool, job_id)
    return job if job.state == "dead" else None
