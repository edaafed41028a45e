"""Workers on machines that share no folder, through the object store (moto's S3 server on
loopback): a training worker reads the images from the bucket and publishes the classifier
it registers; a third worker, whose cache is empty, fetches that version on first use and
scores with it. And a generate job whose store is unreachable: retried with backoff while
its round waits, then the round fails with a reason its requester reads."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from db import jobs, models, rounds
from db.images import images_of_round
from hps.storage import storage
from pipeline.hps_model import HPSModel
from pipeline.tiny_models import tiny_config
from pipeline.worker import Worker
from tests.colour_task import write_colour_hpd
from tests.pipeline.conftest import make_settings, running, wait_until

FAST = {
    "learning_rate": 1e-3,
    "batch_size": 10,
    "epochs": 1,
    "image_blocks": 99,
    "text_blocks": 99,
    "num_workers": 1,  # DataLoader processes read the local copy of the bucket's images
    "min_examples": 20,
    "promote_margin": 0.0,
}


def _png(colour: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(out, format="PNG")
    return out.getvalue()


async def _done(pool: Any, job_id: int) -> jobs.Job | None:
    job = await jobs.get(pool, job_id)
    return job if job.state in ("done", "dead") else None


@pytest.mark.slow
async def test_a_classifier_trained_on_one_worker_scores_on_another_with_an_empty_cache(
    pool: Any, tmp_path: Path, s3_store: dict[str, Any]
) -> None:
    from pipeline.datasets import import_hpd

    config_file = tiny_config(tmp_path)
    trainer = make_settings(
        data_dir=tmp_path / "trainer",
        store=s3_store,
        models={"hps_arch": str(config_file), "hps_pretrained": None, "device": "cpu"},
        train=FAST,
    )
    hpd = write_colour_hpd(tmp_path / "hpd", n_train=48, n_test=16, k=4)
    async with pool.acquire() as conn:  # into the bucket, as `hps import` on any machine
        await import_hpd(conn, storage(trainer).images, hpd, progress=False)

    job, _ = await jobs.enqueue_training(pool, "classifier", requested_by="test")
    async with running(Worker(pool, trainer, kinds=["train_classifier"], worker_id="trainer")):
        trained = await wait_until(lambda: _done(pool, job.id), within=240)
    assert trained.state == "done", trained.error
    version = await models.get(pool, trained.result["version"])
    assert version.artifact == f"models/{version.name}/{version.sha256}"
    if version.status != "serving":  # the tiny model may tie the untuned one: serve it anyway
        await models.promote(pool, version.id, actor="test")
    # Published to the bucket only: the trainer keeps no model folder, and the run's copies
    # of the bucket's images are gone with the run.
    assert not (tmp_path / "trainer" / "models").exists()
    run = tmp_path / "trainer" / "runs" / version.name
    assert (run / "examples.jsonl").is_file() and not (run / "image-copies").exists()
    assert not list((tmp_path / "trainer").rglob("*.jpg"))

    scorer = make_settings(
        data_dir=tmp_path / "scorer",
        store=s3_store,
        models={"hps_arch": "no-such-architecture", "device": "cpu"},  # never used
    )
    images = storage(scorer).images
    keys = [(await images.put_async(_png(c))).key for c in ("red", "blue")]
    scoring, _ = await jobs.enqueue(pool, "score", {"prompt": "a red cube", "image_keys": keys})
    cached = tmp_path / "scorer" / "cache" / "models" / version.name / version.sha256
    assert not cached.exists()
    async with running(Worker(pool, scorer, kinds=["score"], worker_id="scorer")):
        scored = await wait_until(lambda: _done(pool, scoring.id), within=60)
    assert scored.state == "done", scored.error
    assert scored.result["model"] == version.name
    reference = HPSModel.load(cached, device="cpu")  # the fetched, verified copy
    expected = reference.score("a red cube", [_png("red"), _png("blue")])
    assert scored.result["scores"] == pytest.approx(expected, abs=1e-4)


@pytest.mark.slow
async def test_an_unreachable_store_retries_the_generate_job_then_fails_its_round(
    pool: Any, tmp_path: Path, tiny_sd_dir: Path, s3_bucket: str
) -> None:
    from tests.s3 import store_section

    created = await rounds.create_round(pool, requester_discord_id=1, prompt="a red cube", k=2)
    settings = make_settings(
        data_dir=tmp_path / "gpu",
        store=store_section("http://127.0.0.1:9", s3_bucket),  # nothing listens there
        generation={"sd_model": str(tiny_sd_dir), "steps": 2, "width": 64, "height": 64,
                    "safety_checker": False, "images_per_round": 2},
        worker={"backoff_seconds": 0.5},
    )  # fmt: skip
    await pool.execute("UPDATE jobs SET max_attempts = 2 WHERE id = $1", created.job.id)
    async with running(Worker(pool, settings, kinds=["generate"], worker_id="gpu")):
        first = await wait_until(
            lambda: _state(pool, created.job.id, "queued", attempts=1), within=60
        )
        # Retried after a backoff; meanwhile the round still waits for its images.
        assert "cannot reach the object store" in first.error
        assert (await rounds.get_round(pool, created.round.id)).status in ("queued", "generating")
        dead = await wait_until(lambda: _done(pool, created.job.id), within=60)
    assert dead.state == "dead" and dead.attempts == 2
    failed = await rounds.get_round(pool, created.round.id)
    assert failed.status == "failed"
    assert failed.error == "Generation failed after 2 attempt(s). You can retry it."
    assert await images_of_round(pool, created.round.id, include_nsfw=True) == []


async def _state(pool: Any, job_id: int, state: str, attempts: int) -> jobs.Job | None:
    job = await jobs.get(pool, job_id)
    return job if job.state == state and job.attempts == attempts else None
