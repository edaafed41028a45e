"""Report benchmark: `hps report` over a year of synthetic activity with N choices (1M).

Builds a scratch database on the test server (`HPS_TEST_DATABASE_URL`, default the local
server as `postgres`) migrated to head and loads, by binary COPY (asyncpg's
`copy_records_to_table`, foreign-key triggers off for the load: `session_replication_role`),
a year of rounds growing in number over time: K images each (half of the last four months'
rounds show the base model and an adapter in A/B testing, two images each), HPS scores by
one classifier and then another, a requester's verdict on most rounds and other people's
votes, shadow-banned users' flagged choices, failed rounds, times to images. Then it times
`hps report OUT` as a user runs it, in a child process whose peak RSS is measured, three
times (the median counts: the machine is shared), and (in this process) how long
collecting the data and drawing the plots take. Targets: under 15 s and a bounded peak
(under 500 MB, whatever N). The scratch database is dropped at the end (`--keep` keeps it;
`--database NAME` reuses a kept one instead of loading).

    python bench/report.py [--choices 1000000] [--keep] [--database NAME]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from db import migrate  # noqa: E402
from db.prompts import prompt_hash  # noqa: E402

ADMIN_URL = os.environ.get("HPS_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
CHUNK = 100_000  # rounds per COPY batch
DAYS = 365
START = datetime(2025, 12, 1, tzinfo=UTC)
AB_FROM_DAY = DAYS - 120  # the adapter's A/B test: the last four months
NEW_CLASSIFIER_DAY = 200  # scores by classifier-a before, classifier-b after
SHADOW_BANNED = 100  # users 1..100
WORDS = ["red", "blue", "castle", "forest", "portrait", "city", "night", "ocean", "robot"]
# Versions: 1 the base, 2 the adapter in testing, 3 and 4 the classifiers.
BASE, ADAPTER, OLD_CLASSIFIER, CLASSIFIER = 1, 2, 3, 4


def _url(database: str) -> str:
    return ADMIN_URL.rsplit("/", 1)[0] + f"/{database}"


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN_URL)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _versions() -> list[tuple]:
    metrics = {"test": {"n": 2000, "top1": 0.42, "top1_ci": [0.40, 0.44], "chance": 0.25}}
    return [
        (BASE, "sd_base", "sd_base:CompVis/stable-diffusion-v1-4",
         "CompVis/stable-diffusion-v1-4", "{}", "serving"),
        (ADAPTER, "sd_adapter", "sd_adapter-bench", "/models/a", "{}", "testing"),
        (OLD_CLASSIFIER, "classifier", "classifier-a", "/models/c1", json.dumps(metrics),
         "retired"),
        (CLASSIFIER, "classifier", "classifier-b", "/models/c2", json.dumps(metrics), "serving"),
    ]  # fmt: skip


async def load(url: str, choices: int, users: int, prompts: int, k: int) -> dict[str, int]:
    """COPY a year of activity with about `choices` choices; returns the row counts."""
    rng = random.Random(0)
    rounds = choices // 2
    # 80 % of the (not failed) rounds get the requester's verdict; the rest are votes.
    others_per_round = max(0.0, (choices - 0.8 * 0.98 * rounds) / (0.98 * rounds))
    conn = await asyncpg.connect(url)
    counts = {"rounds": 0, "images": 0, "choices": 0}
    try:
        await conn.execute("SET session_replication_role = replica")  # no FK triggers
        await conn.copy_records_to_table(
            "users",
            records=[
                (i, 10_000_000 + i, uuid.UUID(int=i).hex, "discord", i <= SHADOW_BANNED,
                 START, START)
                for i in range(1, users + 1)
            ],
            columns=["id", "discord_id", "pseudonym", "source", "shadow_banned",
                     "first_seen_at", "last_seen_at"],
        )  # fmt: skip
        texts = [f"{' '.join(rng.choices(WORDS, k=6))} #{i}" for i in range(1, prompts + 1)]
        await conn.copy_records_to_table(
            "prompts",
            records=[
                (i, t, "", prompt_hash(t), prompt_hash(t)) for i, t in enumerate(texts, start=1)
            ],
            columns=["id", "text", "negative_text", "norm_hash", "text_hash"],
        )
        await conn.copy_records_to_table(
            "model_versions",
            records=_versions(),
            columns=["id", "kind", "name", "artifact", "metrics", "status"],
        )
        # Activity grows over the year: the density of round times rises linearly.
        days = sorted(DAYS * math.sqrt(rng.random()) for _ in range(rounds))
        for start in range(0, rounds, CHUNK):
            batch = _batch(rng, days, start, min(start + CHUNK, rounds), users, prompts, k,
                           others_per_round)  # fmt: skip
            for table, (columns, records) in batch.items():
                await conn.copy_records_to_table(table, records=records, columns=columns)
                counts[table] += len(records)
            print(f"  loaded {min(start + CHUNK, rounds):,} / {rounds:,} rounds", flush=True)
        await conn.execute("SET session_replication_role = DEFAULT")
        for table in ("users", "prompts", "model_versions", "rounds", "images", "choices"):
            await conn.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                f"(SELECT max(id) FROM {table}))"
            )
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    return counts


def _batch(
    rng: random.Random,
    days: list[float],
    start: int,
    stop: int,
    users: int,
    prompts: int,
    k: int,
    others_per_round: float,
) -> dict[str, tuple[list[str], list[tuple]]]:
    rounds, images, choices = [], [], []
    params = json.dumps({"steps": 50, "guidance_scale": 7.5})
    last_day = DAYS - 1
    for index in range(start, stop):
        round_id = index + 1
        day = days[index]
        created = START + timedelta(days=day)
        requester = rng.randint(1, users)
        failed = rng.random() < 0.02
        ready = None if failed else created + timedelta(seconds=rng.lognormvariate(3.0, 0.4))
        status = "failed" if failed else "ready" if day >= last_day else "closed"
        rounds.append((round_id, rng.randint(1, prompts), requester, params, k, status, created,
                       created + timedelta(seconds=1), ready))  # fmt: skip
        if failed:
            continue
        ab = day >= AB_FROM_DAY and rng.random() < 0.5
        versions = [BASE, BASE, ADAPTER, ADAPTER] if ab else [BASE] * k
        if ab:
            rng.shuffle(versions)
        scorer = OLD_CLASSIFIER if day < NEW_CLASSIFIER_DAY else CLASSIFIER
        shown = []
        for position, version in enumerate(versions, start=1):
            digest = hashlib.blake2b(f"{round_id}:{position}".encode(), digest_size=32).hexdigest()
            nsfw = rng.random() < 0.005
            score = rng.gauss(22.0 + (0.4 if version == ADAPTER else 0.0), 1.2)
            unscored = rng.random() < 0.003
            key = f"{digest[:2]}/{digest[2:4]}/{digest}.png"
            scored = (None, None) if unscored else (score, scorer)
            images.append((round_id, position, version, round_id * 10 + position, digest,
                           key, 512, 512, nsfw, *scored, ready))  # fmt: skip
            if not nsfw:
                shown.append((position, version))
        if not shown:
            continue
        voters = [requester] if rng.random() < 0.8 else []
        extra = int(others_per_round) + (rng.random() < others_per_round % 1)
        voters += [(requester + j * 7919 - 1) % users + 1 for j in range(1, extra + 1)]
        for n, user in enumerate(voters):
            at = ready + timedelta(minutes=rng.expovariate(1 / 5))
            verdict = rng.choices(("pick", "tie", "none"), (85, 10, 5))[0]
            position = None
            if verdict == "pick":
                if ab and {v for _, v in shown} == {BASE, ADAPTER}:
                    wanted = ADAPTER if rng.random() < 0.55 else BASE  # the adapter wins more
                    position = rng.choice([p for p, v in shown if v == wanted])
                else:  # a bias towards the first image shown
                    weights = [1.3 if p == 1 else 1.0 for p, _ in shown]
                    position = rng.choices([p for p, _ in shown], weights)[0]
            choices.append((round_id, user, verdict, position, n == 0 and user == requester,
                            user <= SHADOW_BANNED, at, at))  # fmt: skip
    return {
        "rounds": (["id", "prompt_id", "requester_id", "params", "k", "status", "created_at",
                    "started_at", "ready_at"], rounds),
        "images": (["round_id", "position", "model_version_id", "seed", "sha256",
                    "storage_key", "width", "height", "nsfw", "hps_score", "hps_version_id",
                    "created_at"], images),
        "choices": (["round_id", "user_id", "verdict", "chosen_position", "is_requester",
                     "flagged", "created_at", "updated_at"], choices),
    }  # fmt: skip


async def _counts(url: str) -> dict[str, int]:
    conn = await asyncpg.connect(url)
    try:
        return {t: await conn.fetchval(f"SELECT count(*) FROM {t}")
                for t in ("rounds", "images", "choices")}  # fmt: skip
    finally:
        await conn.close()


def run_report(url: str, out: Path) -> tuple[float, float, str]:
    """`hps report OUT` in a child process: (seconds, peak RSS in MB, its output)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPS_")}
    env.update({"HPS_DATABASE_URL": url, "HPS_DATA_DIR": str(out.parent / "data")})
    started = time.monotonic()
    # /usr/bin/time reports this child's own peak (getrusage would give the largest of all
    # children this process ever waited for).
    result = subprocess.run(
        ["/usr/bin/time", "-f", "peak_kib=%M", sys.executable, "-m", "cli", "report", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    seconds = time.monotonic() - started
    if result.returncode != 0:
        raise SystemExit(f"report failed:\n{result.stderr}")
    peak_kib = int(result.stderr.rsplit("peak_kib=", 1)[1].split()[0])
    return seconds, peak_kib / 1024, result.stdout.strip()


async def phases(url: str) -> dict[str, float]:
    """Collecting and drawing, timed apart in this process."""
    from db.connect import create_pool
    from hps.settings import AdaptSettings
    from pipeline.report import build_plots, collect

    timings: dict[str, float] = {}
    pool = await create_pool(url, min_size=1, max_size=2)
    try:
        started = time.monotonic()
        data = await collect(pool, AdaptSettings())
        timings["collect_seconds"] = round(time.monotonic() - started, 2)
        started = time.monotonic()
        build_plots(data)
        timings["draw_seconds"] = round(time.monotonic() - started, 2)
        timings["period"] = data["span"].period  # type: ignore[assignment]
    finally:
        await pool.close()
    return timings


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--choices", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--prompts", type=int, default=200_000)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    parser.add_argument("--database", help="a database kept by --keep: measure, do not load")
    args = parser.parse_args()

    name = args.database or f"hps_bench_{uuid.uuid4().hex[:10]}"
    url = _url(name)
    counts: dict[str, int] = {}
    load_seconds = None
    if args.database is None:
        await _admin(f'CREATE DATABASE "{name}"')
    try:
        if args.database is None:
            await asyncio.to_thread(migrate.upgrade, url)
            print(f"loading about {args.choices:,} choices ...", flush=True)
            started = time.monotonic()
            counts = await load(url, args.choices, args.users, args.prompts, args.k)
            load_seconds = round(time.monotonic() - started, 1)
        else:
            counts = await _counts(url)
        runs = []
        with tempfile.TemporaryDirectory() as tmp:
            for run in range(3):
                out = Path(tmp) / f"report-{run}"
                seconds, peak_mb, output = run_report(url, out)
                runs.append((seconds, peak_mb, os.getloadavg()[0]))
                print(f"  hps report: {seconds:.1f} s, {peak_mb:.0f} MB", flush=True)
            plots = len(list(out.glob("*.png")))
            page_kb = (out / "report.html").stat().st_size / 1024
            breakdown = await phases(url)
    finally:
        if args.keep or args.database:
            print(f"kept the database {name}")
        else:
            await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    seconds = sorted(r[0] for r in runs)[1]
    peak_mb = max(r[1] for r in runs)

    result = {
        "benchmark": "report",
        **counts,
        "days": DAYS,
        "report_seconds": round(seconds, 2),
        "report_runs": [
            {"seconds": round(r[0], 2), "peak_rss_mb": round(r[1], 1), "load": round(r[2], 2)}
            for r in runs
        ],
        "peak_rss_mb": round(peak_mb, 1),
        **breakdown,
        "plots": plots,
        "page_kb": round(page_kb),
        "load_seconds": load_seconds,
        "targets": {"report_seconds": 15, "peak_rss_mb": 500},
        "meets_targets": seconds < 15 and peak_mb < 500,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}",
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "cli_output": output,
    }
    print(json.dumps(result, indent=2))
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "report.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
