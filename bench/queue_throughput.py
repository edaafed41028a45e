"""Job queue throughput and pick-up latency with real worker processes.

On a fresh database of the test server (`HPS_TEST_DATABASE_URL`, default the local one),
with no-op jobs and N `python -m cli worker` processes:

1. enqueue: `--jobs` jobs from `--producers` concurrent tasks, no worker running yet: jobs/s
   enqueued;
2. drain: the N workers start and empty that backlog: jobs/s completed (first claim to last
   completion);
3. mixed: `--jobs` more enqueued as fast as the producers go while the workers run: jobs/s
   enqueued and completed (first enqueue to last completion);
4. latency: `--latency-jobs` jobs enqueued at a steady `--rate` per second (below capacity):
   pick-up latency, claim time minus enqueue time (both the database's clock), p50/p99/max.

    python bench/queue_throughput.py --workers 4

Targets on the 2-core development machine: ≥ 500 jobs/s with 4 workers, pick-up p99 < 100 ms.
The producers, the workers and PostgreSQL share the machine's cores. Results:
bench/results/queue_throughput.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from db import jobs, migrate, stats  # noqa: E402
from db.connect import create_pool  # noqa: E402

BACKLOG_KIND, MIXED_KIND, LATENCY_KIND = KINDS = ("bench_backlog", "bench_mixed", "bench_latency")
ADMIN_URL = os.environ.get("HPS_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


async def noop(ctx: Any) -> None:
    """The benchmark's job: nothing, so that the queue's own cost is what is measured."""


def _url(database: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    return urlunsplit(urlsplit(ADMIN_URL)._replace(path=f"/{database}"))


async def _admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(ADMIN_URL)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _poll(predicate: Any) -> None:
    # The database is the only place the state lives: poll it.
    while not await predicate():  # noqa: ASYNC110
        await asyncio.sleep(0.05)


async def _finished(pool: Any, kind: str) -> stats.QueueTimings:
    """Wait until no job of `kind` is queued or running, then time them."""

    async def drained() -> bool:
        depth = (await stats.queue_depth(pool)).get(kind, {})
        return not depth.get("queued") and not depth.get("running")

    await _poll(drained)
    return await stats.queue_timings(pool, kind, timedelta(hours=1))


async def start_workers(url: str, args: argparse.Namespace) -> list[asyncio.subprocess.Process]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPS_")}
    env.update(HPS_DATABASE_URL=url, HPS_LOG_LEVEL="WARNING", HPS_DATA_DIR="/tmp/hps-bench")
    command = ["-m", "cli", "worker", "--kinds", ",".join(KINDS), "--device", "cpu"]
    command += ["--concurrency", str(args.concurrency)]
    for kind in KINDS:
        command += ["--handler", f"{kind}=bench.queue_throughput:noop"]
    return [
        await asyncio.create_subprocess_exec(
            sys.executable, *command, "--id", f"bench-{n}", cwd=ROOT, env=env
        )
        for n in range(args.workers)
    ]


async def enqueue_all(pool: Any, kind: str, n: int, producers: int) -> float:
    """Enqueue `n` jobs from `producers` concurrent tasks; returns jobs/s."""

    async def produce(count: int) -> None:
        for _ in range(count):
            await jobs.enqueue(pool, kind)

    started = time.perf_counter()
    await asyncio.gather(*(produce(n // producers) for _ in range(producers)))
    return (n // producers * producers) / (time.perf_counter() - started)


async def bench(url: str, args: argparse.Namespace) -> dict[str, Any]:
    pool = await create_pool(url, min_size=args.producers, max_size=args.producers + 2)
    workers: list[asyncio.subprocess.Process] = []
    try:
        enqueued = await enqueue_all(pool, BACKLOG_KIND, args.jobs, args.producers)
        workers = await start_workers(url, args)
        drained = await _finished(pool, BACKLOG_KIND)
        await _poll(lambda: _registered(pool, args.workers))
        await asyncio.sleep(0.5)  # every worker is LISTENing and idle

        mixed_enqueued = await enqueue_all(pool, MIXED_KIND, args.jobs, args.producers)
        mixed = await _finished(pool, MIXED_KIND)

        interval = 1 / args.rate
        next_at = time.perf_counter()
        for _ in range(args.latency_jobs):
            await jobs.enqueue(pool, LATENCY_KIND)
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        steady = await _finished(pool, LATENCY_KIND)
    finally:
        await pool.close()
        for worker in workers:
            worker.terminate()
        for worker in workers:
            await worker.wait()
    return {
        "enqueue_only": {"jobs": args.jobs, "enqueued_per_s": round(enqueued, 1)},
        "drain_backlog": {
            "jobs": drained.jobs,
            "completed_per_s": round(drained.jobs / drained.drain_seconds, 1),
            "seconds": round(drained.drain_seconds, 3),
            "workers_used": drained.workers,
        },
        "enqueue_while_working": {
            "jobs": mixed.jobs,
            "enqueued_per_s": round(mixed_enqueued, 1),
            "completed_per_s": round(mixed.jobs / mixed.span_seconds, 1),
            "seconds": round(mixed.span_seconds, 3),
            "pickup_p50_ms": round(mixed.pickup_p50_ms, 1),
        },
        "pickup_latency": {
            "jobs": steady.jobs,
            "rate_per_s": args.rate,
            "p50_ms": round(steady.pickup_p50_ms, 2),
            "p99_ms": round(steady.pickup_p99_ms, 2),
            "max_ms": round(steady.pickup_max_ms, 2),
        },
    }


async def _registered(pool: Any, n: int) -> bool:
    return len(await jobs.list_workers(pool)) >= n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4, help="worker processes")
    parser.add_argument("--concurrency", type=int, default=4, help="jobs per worker at once")
    parser.add_argument("--jobs", type=int, default=5000, help="jobs in the throughput phase")
    parser.add_argument("--producers", type=int, default=4, help="concurrent enqueuers")
    parser.add_argument("--latency-jobs", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=100, help="jobs/s in the latency phase")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/queue_throughput.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    name = f"hps_bench_{uuid.uuid4().hex[:8]}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    url = _url(name)
    try:
        migrate.upgrade(url)
        figures = asyncio.run(bench(url, args))
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    report = {
        "benchmark": "queue_throughput",
        "params": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
        **figures,
    }
    print(json.dumps(report, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
