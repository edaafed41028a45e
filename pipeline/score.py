"""The `score` job: the HPS of stored images for a prompt, by the serving classifier.

Payload `{"prompt": str, "image_keys": [image-store keys]}`; result
`{"scores": [float, ...], "scale": "hps", "model": <version name or configured model>}`.
The loaded model stays in the worker's cache until another version serves.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from db.connect import Executor
from hps.settings import Settings
from hps.store import StoreError
from pipeline import registry
from pipeline.handlers import JobContext, PermanentError
from pipeline.hps_model import SCALE, HPSModel, ImageError, ModelLoadError

log = logging.getLogger(__name__)

CACHE_KEY = "hps_scorer"


async def serving_scorer(db: Executor, settings: Settings, cache: dict[str, Any]) -> HPSModel:
    """The serving HPS model, loaded once and kept in `cache` while it keeps serving."""
    spec, label, version = await registry.serving_model(db, settings)
    identity = (spec, label, version.sha256 if version else None)
    cached = cache.get(CACHE_KEY)
    if cached is not None and cached[0] == identity:
        return cached[1]
    log.info("loading the HPS model %s", label)
    model = await asyncio.to_thread(registry.load_spec, spec, settings, label)
    cache[CACHE_KEY] = (identity, model)
    return model


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
        images = [ctx.store.get(key) for key in keys]
    except StoreError as exc:
        raise PermanentError(f"cannot score: {exc}") from None
    try:
        model = await serving_scorer(ctx.pool, ctx.settings, ctx.cache)
    except ModelLoadError as exc:
        raise PermanentError(f"the HPS model cannot be loaded: {exc}") from None
    try:
        scores = await asyncio.to_thread(
            model.score, prompt, images, max_pixels=ctx.settings.limits.score_max_pixels
        )
    except ImageError as exc:
        raise PermanentError(f"cannot score {exc}") from None
    return {"scores": scores, "scale": SCALE, "model": model.name}
