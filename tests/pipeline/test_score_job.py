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
from tests.tiny_clip import colour_image


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
