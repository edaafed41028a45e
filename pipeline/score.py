"""Scoring jobs, by the serving HPS classifier (kept in the worker's cache until another
version serves):

- `score` (the bot's /score): payload `{"prompt": str, "image_keys": [image-store keys]}`;
  result `{"scores": [float, ...], "scale": "hps", "model": <version or configured model>}`.
- `score_images` (scheduled): scores up to `limit` shown images that have no score yet with
  their round's prompt and stores the scores with the classifier version that gave them
  (`images.hps_score`, `hps_version_id`), so reports and analysts can compare the images
  each model version served. Result `{"scored": n, "missing": n, "model": ...}`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from db import images as db_images
from db.connect import Executor
from db.models import ModelVersion
from hps.settings import Settings
from hps.store import StoreError
from pipeline import registry
from pipeline.handlers import JobContext, PermanentError
from pipeline.hps_model import SCALE, HPSModel, ImageError, ModelLoadError

log = logging.getLogger(__name__)

CACHE_KEY = "hps_scorer"


async def serving_scorer(
    db: Executor, settings: Settings, cache: dict[str, Any]
) -> tuple[HPSModel, ModelVersion | None]:
    """The serving HPS model and its version (None: the configured model), loaded once and
    kept in `cache` while it keeps serving."""
    spec, label, version = await registry.serving_model(db, settings)
    identity = (spec, label, version.sha256 if version else None)
    cached = cache.get(CACHE_KEY)
    if cached is not None and cached[0] == identity:
        return cached[1], version
    log.info("loading the HPS model %s", label)
    model = await asyncio.to_thread(registry.load_spec, spec, settings, label)
    cache[CACHE_KEY] = (identity, model)
    return model, version


def _payload(payload: Any) -> tuple[str, list[str]]:
    if not isinstance(payload, dict):
        raise PermanentError("score payload must be an object")
    prompt, keys = payload.get("prompt"), payload.get("image_keys")
    if not isinstance(prompt, str) or not prompt.strip():
        raise PermanentError("score payload needs a non-empty 'prompt'")
    if not isinstance(keys, list) or not keys or not all(isinstance(k, str) for k in keys):
        raise PermanentError("score payload needs 'image_keys', a non-empty list of keys")
    return prompt, keys


async def handle_score(ctx: JobContext) -> dict[str, Any]:
    prompt, keys = _payload(ctx.job.payload)
    try:
        images = list(await asyncio.gather(*(ctx.store.get_async(key) for key in keys)))
    except StoreError as exc:
        raise PermanentError(f"cannot score: {exc}") from None
    try:
        model, _ = await serving_scorer(ctx.pool, ctx.settings, ctx.cache)
    except ModelLoadError as exc:
        raise PermanentError(f"the HPS model cannot be loaded: {exc}") from None
    try:
        scores = await asyncio.to_thread(
            model.score, prompt, images, max_pixels=ctx.settings.limits.score_max_pixels
        )
    except ImageError as exc:
        raise PermanentError(f"cannot score {exc}") from None
    return {"scores": scores, "scale": SCALE, "model": model.name}


async def handle_score_images(ctx: JobContext) -> dict[str, Any]:
    limit = ctx.job.payload.get("limit", ctx.settings.schedules.score_images_batch)
    if not isinstance(limit, int) or limit < 1:
        raise PermanentError("score_images payload 'limit' must be a positive integer")
    pending = await db_images.unscored_images(ctx.pool, limit)
    if not pending:
        return {"scored": 0, "missing": 0, "model": None}
    try:
        model, version = await serving_scorer(ctx.pool, ctx.settings, ctx.cache)
    except ModelLoadError as exc:
        raise PermanentError(f"the HPS model cannot be loaded: {exc}") from None

    def work() -> tuple[dict[int, float], int]:
        found: list[tuple[db_images.UnscoredImage, bytes]] = []
        for image in pending:
            try:
                found.append((image, ctx.store.get(image.storage_key)))
            except StoreError:
                pass  # its file is gone (a database restored without the store?): skip it
        scores = model.score([i.prompt for i, _ in found], [data for _, data in found])
        by_id = {i.id: score for (i, _), score in zip(found, scores, strict=True)}
        return by_id, len(pending) - len(found)

    scores, missing = await asyncio.to_thread(work)
    if missing:
        ctx.log.warning("%d image file(s) missing from the store: left unscored", missing)
    await db_images.set_scores(ctx.pool, scores, version.id if version else None)
    return {"scored": len(scores), "missing": missing, "model": model.name}
