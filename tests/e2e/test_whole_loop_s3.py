"""The whole loop of issue 10 (`tests/whole_loop.py`: `hps serve` with the bot, the
scheduler and the real worker as child processes, the tiny models, the local Discord
server) once more with the store in an S3 bucket (moto's server on loopback): the same
scenario and expectations, and afterwards the images and every registered version are in
the bucket, none on the machine's disk. Skipped until that scenario is merged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg
import pytest

from hps.model_store import is_key
from hps.settings import load_settings
from hps.storage import storage
from tests import whole_loop
from tests.s3 import store_env


@pytest.mark.slow
async def test_the_whole_loop_with_an_object_store(
    database_url: str, tmp_path: Path, loop_models: Any, s3_store: dict[str, Any]
) -> None:
    data_dir = tmp_path / "data"
    async with whole_loop.standard_fake() as fake:
        env = whole_loop.serve_env(fake, database_url, data_dir, loop_models, **store_env(s3_store))
        async with whole_loop.served(env, tmp_path / "serve.log", database_url, fake) as loop:
            await whole_loop.run_scenario(loop)
            loop.serve.stop_cleanly()
        assert loop.serve.problems() == []

    bucket = storage(load_settings(data_dir=tmp_path / "another-machine", store=s3_store))
    conn = await asyncpg.connect(database_url)
    try:
        keys = [r["storage_key"] for r in await conn.fetch("SELECT storage_key FROM images")]
        artifacts = await conn.fetch(
            "SELECT name, artifact FROM model_versions WHERE kind IN ('classifier', 'sd_adapter')"
        )
    finally:
        await conn.close()
    assert keys and all(bucket.images.exists(key) for key in keys)
    assert artifacts and all(is_key(r["artifact"]) for r in artifacts)
    assert all(bucket.models.manifest(r["artifact"]) is not None for r in artifacts)
    assert not (data_dir / "images").exists() and not (data_dir / "models").exists()
