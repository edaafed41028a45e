"""A stand-in for the GPU worker in end-to-end tests.

The real worker (`pipeline/worker.py`, `pipeline/generate.py`, the HPS scorer) is written
concurrently by other engineers, so these tests serve the queue with this small worker: it
claims `generate` jobs and writes real small PNG images through the image store and
`db.rounds.finish_round` (completing the job in the same transaction, as the handler
contract asks), and completes `score` jobs with a deterministic score computed from each
image's bytes. It runs only when a test calls `run_once`, so tests decide when rounds get
ready.
"""

from __future__ import annotations

import hashlib
import io
from datetime import timedelta
from typing import Any

import asyncpg
from PIL import Image

from db import jobs, rounds
from db.connect import transaction
from db.images import NewImage
from hps.store import ImageStore

WORKER_ID = "e2e-test-worker"
LEASE = timedelta(minutes=5)


def png(seed: int, size: int = 32) -> bytes:
    """A small PNG whose colour (and bytes) depend on `seed`."""
    digest = hashlib.sha256(str(seed).encode()).digest()
    image = Image.new("RGB", (size, size), tuple(digest[:3]))
    image.putpixel((0, 0), tuple(digest[3:6]))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def fake_score(data: bytes) -> float:
    """The deterministic "HPS" of an image: 15.00 … 24.99 from its bytes."""
    return 15 + int(hashlib.sha256(data).hexdigest()[:8], 16) % 1000 / 100


class TestWorker:
    __test__ = False  # not a pytest class

    def __init__(self, pool: asyncpg.Pool, store: ImageStore) -> None:
        self.pool = pool
        self.store = store
        self.fail_with: str | None = None  # the next generate job fails its round with this
        self.nsfw_positions: set[int] = set()  # flagged by the "safety checker"
        self.model_versions: dict[int, int] = {}  # position → model version (A/B rounds)
        self.done: list[jobs.Job] = []

    async def run_once(self, kinds: tuple[str, ...] = ("generate", "score")) -> list[jobs.Job]:
        """Take every due job of `kinds` and finish it; returns the jobs taken."""
        claimed = await jobs.claim(self.pool, list(kinds), WORKER_ID, LEASE, limit=100)
        for job in claimed:
            if job.kind == "generate":
                await self._generate(job)
            else:
                await self._score(job)
        self.done += claimed
        return claimed

    async def _generate(self, job: jobs.Job) -> None:
        round_id = job.payload["round_id"]
        view = await rounds.start_generating(self.pool, round_id)
        assert view is not None
        if self.fail_with is not None:
            async with transaction(self.pool) as conn:
                await rounds.fail_round(conn, round_id, self.fail_with)
                assert await jobs.complete(conn, job, WORKER_ID, {"failed": True})
            self.fail_with = None
            return
        images = []
        for position in range(1, view.round.k + 1):
            seed = round_id * 100 + position
            blob = self.store.put(png(seed))
            images.append(
                NewImage(
                    position=position,
                    sha256=blob.sha256,
                    storage_key=blob.key,
                    seed=seed,
                    width=32,
                    height=32,
                    nsfw=position in self.nsfw_positions,
                    model_version_id=self.model_versions.get(position),
                )
            )
        async with transaction(self.pool) as conn:
            assert await rounds.finish_round(conn, round_id, images)
            assert await jobs.complete(conn, job, WORKER_ID, {"images": len(images)})

    async def _score(self, job: jobs.Job) -> None:
        scores = [fake_score(self.store.get(key)) for key in job.payload["image_keys"]]
        result: dict[str, Any] = {"scores": scores, "scale": "hps", "model": "test-scorer"}
        assert await jobs.complete(self.pool, job, WORKER_ID, result)
