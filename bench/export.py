"""Export benchmark: N synthetic choices (default 1M) exported to Parquet.

Builds a scratch database on the test server (`HPS_TEST_DATABASE_URL`, default the local
server as `postgres`) migrated to head, loads N rounds of K images with the requester's pick
by binary COPY (asyncpg's `copy_records_to_table`), then times `hps export OUT --format
parquet` as a user runs it, in a child process whose peak RSS is measured. Targets: < 30 s
and < 500 MB peak for 1M choices. The scratch database is dropped at the end.

    python bench/export.py [--choices 1000000] [--k 4]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from db import migrate  # noqa: E402
from db.prompts import prompt_hash  # noqa: E402

ADMIN_URL = os.environ.get("HPS_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
CHUNK = 50_000
WORDS = [
    "red",
    "blue",
    "green",
    "cat",
    "dog",
    "castle",
    "forest",
    "portrait",
    "city",
    "night",
    "sunset",
    "ocean",
    "robot",
]


def _url(database: str) -> str:
    return ADMIN_URL.rsplit("/", 1)[0] + f"/{database}"


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN_URL)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def load(url: str, n: int, k: int, users: int, prompts: int) -> float:
    """COPY n rounds (K images each, a requester pick) into the database; returns seconds."""
    started = time.monotonic()
    rng = random.Random(0)
    now = datetime.now(UTC)
    conn = await asyncpg.connect(url)
    try:
        await conn.copy_records_to_table(
            "users",
            records=[
                (i, 10_000_000 + i, uuid.UUID(int=i).hex, "discord") for i in range(1, users + 1)
            ],
            columns=["id", "discord_id", "pseudonym", "source"],
        )
        texts = [f"{' '.join(rng.choices(WORDS, k=6))} #{i}" for i in range(1, prompts + 1)]
        await conn.copy_records_to_table(
            "prompts",
            records=[
                (i, t, "", prompt_hash(t), prompt_hash(t)) for i, t in enumerate(texts, start=1)
            ],
            columns=["id", "text", "negative_text", "norm_hash", "text_hash"],
        )
        for start in range(1, n + 1, CHUNK):
            ids = range(start, min(start + CHUNK, n + 1))
            requesters = {r: rng.randint(1, users) for r in ids}
            params = json.dumps({"steps": 50, "guidance_scale": 7.5, "width": 512, "height": 512})
            await conn.copy_records_to_table(
                "rounds",
                records=[
                    (r, rng.randint(1, prompts), requesters[r], params, k, "closed", now, now)
                    for r in ids
                ],
                columns=["id", "prompt_id", "requester_id", "params", "k", "status",
                         "ready_at", "closed_at"],
            )  # fmt: skip
            images = []
            for r in ids:
                for position in range(1, k + 1):
                    digest = hashlib.sha256(f"{r}:{position}".encode()).hexdigest()
                    key = f"{digest[:2]}/{digest[2:4]}/{digest}.png"
                    images.append((r, position, digest, key, r * 10 + position, 512, 512))
            await conn.copy_records_to_table(
                "images",
                records=images,
                columns=["round_id", "position", "sha256", "storage_key", "seed", "width",
                         "height"],
            )  # fmt: skip
            await conn.copy_records_to_table(
                "choices",
                records=[(r, requesters[r], "pick", rng.randint(1, k), True) for r in ids],
                columns=["round_id", "user_id", "verdict", "chosen_position", "is_requester"],
            )
            print(f"  loaded {ids[-1]:,} / {n:,} rounds", flush=True)
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    return time.monotonic() - started


def export(url: str, out: Path) -> tuple[float, float, str]:
    """Run `hps export` in a child process: (seconds, peak RSS in MB, its output)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPS_")}
    env.update({"HPS_DATABASE_URL": url, "HPS_DATA_DIR": str(out.parent / "data")})
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "cli", "export", str(out), "--format", "parquet"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    seconds = time.monotonic() - started
    if result.returncode != 0:
        raise SystemExit(f"export failed:\n{result.stderr}")
    # The largest peak of any waited-for child (KiB on Linux): here, the export's.
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return seconds, peak_kib / 1024, result.stdout.strip()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--choices", type=int, default=1_000_000)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--prompts", type=int, default=300_000)
    args = parser.parse_args()

    name = f"hps_bench_{uuid.uuid4().hex[:10]}"
    await _admin(f'CREATE DATABASE "{name}"')
    try:
        url = _url(name)
        await asyncio.to_thread(migrate.upgrade, url)
        print(f"loading {args.choices:,} choices ...", flush=True)
        load_seconds = await load(
            url, args.choices, args.k, args.users, min(args.prompts, args.choices)
        )
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "export"
            seconds, peak_mb, output = export(url, out)
            parquet = out / "choices.parquet"
            rows = pq.read_metadata(parquet).num_rows
            size_mb = parquet.stat().st_size / 2**20
    finally:
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    result = {
        "benchmark": "export",
        "choices": args.choices,
        "k": args.k,
        "rows": rows,
        "export_seconds": round(seconds, 2),
        "choices_per_second": round(rows / seconds),
        "peak_rss_mb": round(peak_mb, 1),
        "parquet_mb": round(size_mb, 1),
        "load_seconds": round(load_seconds, 1),
        "targets": {"export_seconds": 30, "peak_rss_mb": 500},
        "meets_targets": seconds < 30 and peak_mb < 500,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}",
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "cli_output": output,
    }
    print(json.dumps(result, indent=2))
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "export.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
