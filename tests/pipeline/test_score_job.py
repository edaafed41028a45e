"""The score job: the serving model scores stored images; bad input is a permanent error."""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import pytest

from db import jobs, models
from hps.settings import load_settings
from hps.store import LocalImageStore
from pipeline.handlers import JobContext, PermanentError, load_handler
from pipeline.hps_model import HPSModel
from tests.colour_task import colour_image


def _png(colour: str) -> bytes:
    buffer = io.BytesIO()
    colour_image(colour, random.Random(1)).save(buffer, format="PNG")
    return buffer.getvalue()


async def _job(pool: Any, payload: dict[str, Any]) -> jobs.Job:
    job, _ = await jobs.enqueue(pool, "score", payload)
    return job


async def test_score_job_uses_the_serving_model_and_keeps_it_loaded(
    pool, tiny_model, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    config, weights = tiny_model
    settings = load_settings(models={"hps_arch": str(config), "hps_pretrained": str(weights)})
    store = LocalImageStore(settings.images_dir)
    keys = [store.put(_png(c)).key for c in ("red", "blue")]
    cache: dict[str, Any] = {}
    handle = load_handler("score")

    async def score(payload: dict[str, Any]) -> Any:
        job = await _job(pool, payload)
        ctx = JobContext(job, settings, pool, store, "w", "cpu", cache)
        return await handle(ctx)

    configured = await score({"prompt": "a red cube", "image_keys": keys})
    reference = HPSModel.load(config, pretrained=str(weights))
    expected = reference.score("a red cube", [store.get(k) for k in keys])
    assert configured == {
        "scores": expected,
        "scale": "hps",
        "model": f"configured:{config} pretrained={weights}",
    }
    first = cache["hps_scorer"][1]
    await score({"prompt": "a blue ball", "image_keys": keys[:1]})
    assert cache["hps_scorer"][1] is first  # still serving: not loaded again

    # A promoted classifier version takes over at the next job.
    reference.save(tmp_path / "v2")
    version = await models.register(
        pool, kind="classifier", name="classifier-v2", artifact=str(tmp_path / "v2")
    )
    await models.promote(pool, version.id, actor="test")
    promoted = await score({"prompt": "a red cube", "image_keys": keys})
    assert promoted["model"] == "classifier-v2" and promoted["scores"] == expected


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"image_keys": ["x"]}, "score payload needs a non-empty 'prompt'"),
        ({"prompt": "a", "image_keys": []}, "needs 'image_keys', a non-empty list"),
        ({"prompt": "a", "image_keys": ["bad-key"]}, "cannot score: malformed storage key"),
        ({"prompt": "a", "image_keys": ["BAD"]}, "cannot score image 2: the image bytes is not"),
    ],
)
async def test_score_job_bad_input_is_permanent(pool, tiny_model, payload, message) -> None:  # type: ignore[no-untyped-def]
    config, weights = tiny_model
    settings = load_settings(models={"hps_arch": str(config), "hps_pretrained": str(weights)})
    store = LocalImageStore(settings.images_dir)
    if payload.get("image_keys") == ["BAD"]:
        payload["image_keys"] = [store.put(_png("red")).key, store.put(b"not an image").key]
    ctx = JobContext(await _job(pool, payload), settings, pool, store, "w", "cpu", {})
    with pytest.raises(PermanentError, match=message):
        await load_handler("score")(ctx)


async def test_score_images_scores_each_shown_unscored_image_once(
    pool, tiny_model, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from db import rounds
    from db.images import NewImage, count_unscored, images_of_round

    config, weights = tiny_model
    settings = load_settings(models={"hps_arch": str(config), "hps_pretrained": str(weights)})
    store = LocalImageStore(settings.images_dir)
    created = await rounds.create_round(pool, requester_discord_id=1, prompt="a red cube", k=3)
    await rounds.start_generating(pool, created.round.id)
    blobs = [store.put(_png(c)) for c in ("red", "blue", "green")]
    await rounds.finish_round(
        pool,
        created.round.id,
        [NewImage(p, b.sha256, b.key, nsfw=p == 3) for p, b in enumerate(blobs, start=1)],
    )
    handle = load_handler("score_images")
    cache: dict[str, Any] = {}
    job, _ = await jobs.enqueue(pool, "score_images", {"limit": 10})
    result = await handle(JobContext(job, settings, pool, store, "w", "cpu", cache))

    reference = HPSModel.load(config, pretrained=str(weights))
    expected = reference.score("a red cube", [store.get(b.key) for b in blobs[:2]])
    assert result == {"scored": 2, "missing": 0, "model": reference_label(config, weights)}
    stored = await images_of_round(pool, created.round.id, include_nsfw=True)
    assert [i.hps_score for i in stored[:2]] == pytest.approx(expected, abs=1e-4)
    assert stored[2].hps_score is None  # safety-flagged images are never scored
    assert await count_unscored(pool) == 0
    again = await handle(JobContext(job, settings, pool, store, "w", "cpu", cache))
    assert again == {"scored": 0, "missing": 0, "model": None}
    with pytest.raises(PermanentError, match="positive integer"):
        bad, _ = await jobs.enqueue(pool, "score_images", {"limit": "all"})
        await handle(JobContext(bad, settings, pool, store, "w", "cpu", cache))


def reference_label(config: Path, weights: Path) -> str:
    return f"configured:{config} pretrained={weights}"
