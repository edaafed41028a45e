"""The store's cost: image put/get latency and throughput on a folder and on S3 (moto's
server on loopback, in a process of its own, spoken to over HTTP by obstore, as the
platform does), and what S3 adds to a round's images on their way to Discord.

- put / get: `--n` images of `--size` bytes (a 512 px PNG is about 400 kB), one at a time
  through the async API (latency p50/p99), then `--concurrency` at once (images/s, MB/s).
- round path: the store's part of a round's way from the GPU worker to the channel, as
  `pipeline.generate` and the bot do it: the worker puts the round's K images under their
  keys' locks before its commit (at once: a conditional PUT each), and the bot gets the K
  images to post them. Per round,
  p50/p99 on each backend and the difference: the target is that S3 on loopback adds
  < 20 ms at p99. Also the CPU time this process spent per round (the client's share:
  the server's, moto's, is in its own process).

    python bench/store.py [--n 200] [--rounds 200]
    python bench/store.py --endpoint http://127.0.0.1:9000 --access-key K --secret-key S
        # also against another S3 server (MinIO, ...) with a bucket named `bench`

Results: bench/results/store.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hps.settings import load_settings  # noqa: E402
from hps.storage import storage  # noqa: E402
from hps.store import ImageStore  # noqa: E402

BUCKET = "bench"
KEY, SECRET = "bench-key", "bench-secret"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    """moto's S3 server in its own process (not competing with the client for the GIL)."""
    port = _free_port()
    code = (
        "import logging; logging.getLogger('werkzeug').setLevel(logging.ERROR)\n"
        "from moto.server import ThreadedMotoServer\n"
        f"s = ThreadedMotoServer(ip_address='127.0.0.1', port={port}, verbose=False)\n"
        "s.start(); import time\nwhile True: time.sleep(3600)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
            break
        except OSError:
            time.sleep(0.05)
    import boto3

    boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id=KEY, aws_secret_access_key=SECRET,
    ).create_bucket(Bucket=BUCKET)  # fmt: skip
    return process, endpoint


def _ms(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 2),
        "p99_ms": round(p99 * 1000, 2),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 2),
    }


def _images(n: int, size: int) -> list[bytes]:
    return [os.urandom(size) for _ in range(n)]


async def put_get(store: ImageStore, n: int, size: int, concurrency: int) -> dict[str, Any]:
    one = _images(n, size)
    puts, gets, keys = [], [], []
    for data in one:
        started = time.perf_counter()
        keys.append((await store.put_async(data)).key)
        puts.append(time.perf_counter() - started)
    for key in keys:
        started = time.perf_counter()
        await store.get_async(key)
        gets.append(time.perf_counter() - started)
    many = _images(n, size)
    limit = asyncio.Semaphore(concurrency)

    async def put(data: bytes) -> str:
        async with limit:
            return (await store.put_async(data)).key

    async def get(key: str) -> bytes:
        async with limit:
            return await store.get_async(key)

    started = time.perf_counter()
    stored = await asyncio.gather(*(put(d) for d in many))
    put_seconds = time.perf_counter() - started
    started = time.perf_counter()
    await asyncio.gather(*(get(k) for k in stored))
    get_seconds = time.perf_counter() - started
    mb = n * size / 1e6
    return {
        "put_one_at_a_time": _ms(puts),
        "get_one_at_a_time": _ms(gets),
        "concurrency": concurrency,
        "put_images_per_s": round(n / put_seconds, 1),
        "put_mb_per_s": round(mb / put_seconds, 1),
        "get_images_per_s": round(n / get_seconds, 1),
        "get_mb_per_s": round(mb / get_seconds, 1),
    }


async def round_path(store: ImageStore, rounds: int, k: int, size: int) -> dict[str, Any]:
    """Per round: the worker's puts under the keys' locks before its commit (all K at once:
    `db.rounds.finish_round` with `store_files`, from `pipeline.generate._complete`), then
    the bot's gets (all K at once: `bot.cogs.dream._image_files`)."""
    totals, puts, gets, cpu = [], [], [], 0.0
    for _ in range(rounds):
        images = _images(k, size)
        cpu_started = time.process_time()  # this process only: the client, not the server
        started = time.perf_counter()
        blobs = await asyncio.gather(*(store.put_async(data) for data in images))
        stored = time.perf_counter()
        posted = await asyncio.gather(*(store.get_async(b.key) for b in blobs))
        done = time.perf_counter()
        totals.append(done - started)
        puts.append(stored - started)
        gets.append(done - stored)
        cpu += time.process_time() - cpu_started
        assert posted == images
    client_cpu = round(cpu / rounds * 1000, 2)
    return {
        "k": k,
        "rounds": rounds,
        **_ms(totals),
        "worker_puts": _ms(puts),
        "bot_gets": _ms(gets),
        "client_cpu_ms_per_round": client_cpu,
    }


async def measure(settings: Any, args: argparse.Namespace) -> dict[str, Any]:
    store = storage(settings).images
    await store.put_async(os.urandom(args.size))  # warm-up: connections
    return {
        "backend": store.objects.description,
        "images": await put_get(store, args.n, args.size, args.concurrency),
        "round_path": await round_path(store, args.rounds, args.k, args.size),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--size", type=int, default=400_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--endpoint", help="also an S3 server there (its bucket `bench`)")
    parser.add_argument("--access-key", default=KEY)
    parser.add_argument("--secret-key", default=SECRET)
    parser.add_argument("--endpoint-name", default="s3_other", help="its name in the results")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "store.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    moto, endpoint = start_moto()
    try:
        with tempfile.TemporaryDirectory() as folder:
            local = load_settings(data_dir=Path(folder) / "local")
            s3 = load_settings(
                data_dir=Path(folder) / "s3",
                store={"url": f"s3://{BUCKET}/hps", "endpoint_url": endpoint,
                       "access_key_id": KEY, "secret_access_key": SECRET},
            )  # fmt: skip
            results = {
                "local": asyncio.run(measure(local, args)),
                "s3_loopback": asyncio.run(measure(s3, args)),
            }
            if args.endpoint:
                other = load_settings(
                    data_dir=Path(folder) / "other",
                    store={"url": f"s3://{BUCKET}/hps", "endpoint_url": args.endpoint,
                           "access_key_id": args.access_key,
                           "secret_access_key": args.secret_key},
                )  # fmt: skip
                results[args.endpoint_name] = asyncio.run(measure(other, args))
    finally:
        moto.terminate()
        moto.wait()
    added = {
        name: {
            q: round(results[name]["round_path"][q] - results["local"]["round_path"][q], 2)
            for q in ("p50_ms", "p99_ms")
        }
        for name in results
        if name != "local"
    }
    report = {
        "benchmark": "store",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "image_bytes": args.size,
        **results,
        "s3_adds_to_a_round": added,
        "target": "S3 on loopback adds < 20 ms p99 to a round's images reaching Discord",
        "target_met": {name: figures["p99_ms"] < 20 for name, figures in added.items()},
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
