"""Choice ingest: clicks per second the real bot records, and click-to-commit latency.

On a fresh database of the test server (`HPS_TEST_DATABASE_URL`, default the local one):

1. the local Discord-compatible server (`bot/fake_discord`) starts in this process, and
   the real bot as a subprocess, `python -m cli bot`, pointed at it through
   `HPS_DISCORD__API_BASE_URL` / `HPS_DISCORD__GATEWAY_URL`;
2. a requester runs /dream; the test worker (`tests/e2e/worker.py`) makes the round's
   images; the bot posts them with their buttons;
3. simulated users (`--users` distinct ones) click the round's buttons through the gateway
   at increasing rates (`--rates`, clicks per second, `--seconds` each), open loop: click i
   is sent at start + i / rate whatever the bot's answers do;
4. per click, latency = the bot's interaction callback arriving at the server minus the
   click's dispatch. The bot answers after `record_choice` committed, so this bounds
   click-to-commit from above;
5. at the end the database must hold one choice event per click sent (zero lost), and the
   bot's resident memory and whether it mapped any torch library are read from /proc.

    python bench/choice_ingest.py

Targets on the 2-core development machine: ≥ 500 choices/s sustained with p99 < 50 ms, no
click lost, the bot under 200 MB and without torch. This process, the bot and PostgreSQL
share the machine's cores. Results: bench/results/choice_ingest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import random
import shutil
import statistics
import sys
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
import psutil  # noqa: E402

from bot.fake_discord import FakeDiscord, FakeGuild, FakeUser, button_ids  # noqa: E402
from db import migrate  # noqa: E402
from db.connect import create_pool  # noqa: E402
from hps.store import LocalImageStore  # noqa: E402
from tests.e2e.worker import TestWorker  # noqa: E402

ADMIN_URL = os.environ.get("HPS_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
GUILD_ID, CHANNEL_ID = 820000000000000001, 820000000000000011
RESULTS = ROOT / "bench" / "results" / "choice_ingest.json"


def _url(database: str) -> str:
    return urlunsplit(urlsplit(ADMIN_URL)._replace(path=f"/{database}"))


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN_URL)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _start_bot(
    fake: FakeDiscord, url: str, data_dir: Path, profile: Path | None
) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPS_")}
    env.update(
        HPS_DATABASE_URL=url,
        HPS_DATA_DIR=str(data_dir),
        HPS_DISCORD__TOKEN=fake.token,
        HPS_DISCORD__GUILD_IDS=f"[{GUILD_ID}]",
        HPS_DISCORD__API_BASE_URL=fake.api_base_url,
        HPS_DISCORD__GATEWAY_URL=fake.gateway_url,
        HPS_BOT__GUILD_READY_TIMEOUT="0.1",
        HPS_LOG_LEVEL="WARNING",
    )
    command = [sys.executable, "-m", "cli", "bot"]
    if profile is not None:  # cProfile writes its statistics when the bot exits cleanly
        command[1:1] = ["-m", "cProfile", "-o", str(profile)]
    process = await asyncio.create_subprocess_exec(*command, cwd=ROOT, env=env)
    await fake.wait_connected(within=60)
    await asyncio.sleep(0.5)  # READY, GUILD_CREATE and the LISTEN connection settle
    return process


async def _round_message(fake: FakeDiscord, worker: TestWorker, requester: FakeUser) -> int:
    interaction = await fake.slash(requester, "dream", {"prompt": "a benchmark of clicks"})
    await interaction.wait_response()
    await fake.wait_for(
        lambda: "Queued" in fake.messages[interaction.original_message_id]["content"]
    )
    await asyncio.sleep(0.2)  # the bot records the message id
    await worker.run_once()
    message_id = interaction.original_message_id
    assert message_id is not None
    await fake.wait_for(lambda: button_ids(fake.messages[message_id]), within=30)
    return message_id


# The answers to a click that was recorded (in choice_events): new, changed, the same again,
# or made before the click the choice already holds.
RECORDED_ANSWERS = ("Recorded", "Changed", "You had already", "A later click")


async def _requester_clicks(
    fake: FakeDiscord, message_id: int, requester: FakeUser, clicks: int
) -> dict[str, Any]:
    """The heaviest click: the requester's pick, answered by editing the round's message
    (the chosen button highlighted), then a private confirmation and the chosen image
    posted at full size. One at a time, alternating images, timed to the first answer."""
    ids = [i for i in button_ids(fake.messages[message_id]) if ":pick:" in i]
    latencies = []
    for i in range(clicks):
        click = await fake.click(requester, message_id, ids[i % 2])
        await click.wait_response()
        await click.followup()  # the confirmation: the handler has done its work
        latencies.append((click.responded_at - click.dispatched_at) * 1000)  # type: ignore[operator]
    return {
        "clicks": clicks,
        "first_answer_ms_p50": round(_percentile(latencies, 0.50), 2),
        "first_answer_ms_max": round(max(latencies), 2),
    }


class PeakMemory:
    """The bot process's largest resident set size, sampled every 50 ms meanwhile."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self.process.memory_info().rss)
            await asyncio.sleep(0.05)

    def __enter__(self) -> PeakMemory:
        self._task = asyncio.get_running_loop().create_task(self._sample())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def _stage(
    fake: FakeDiscord,
    message_id: int,
    users: list[FakeUser],
    rate: float,
    seconds: float,
    rng: random.Random,
) -> dict[str, Any]:
    ids = button_ids(fake.messages[message_id])
    count = int(rate * seconds)
    answered_before = fake.callbacks
    sent = []
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(count):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        sent.append(await fake.click(rng.choice(users), message_id, rng.choice(ids)))
    sending = loop.time() - start
    try:
        await fake.wait_for(lambda: fake.callbacks >= answered_before + count, within=30)
    except TimeoutError:
        pass
    answered = [c for c in sent if c.responded_at is not None]
    latencies = [(c.responded_at - c.dispatched_at) * 1000 for c in answered]  # type: ignore[operator]
    first = min(c.dispatched_at for c in sent)
    last = max((c.responded_at for c in answered), default=first)  # type: ignore[type-var]
    recorded = [
        c for c in answered if c.response_data.get("content", "").startswith(RECORDED_ANSWERS)
    ]
    return {
        "offered_per_s": rate,
        "clicks": count,
        "sending_s": round(sending, 3),
        "answered": len(answered),
        "recorded": len(recorded),
        "lost": count - len(recorded),
        "achieved_per_s": round(len(recorded) / (last - first), 1) if last > first else 0.0,
        "latency_ms_p50": round(_percentile(latencies, 0.50), 2),
        "latency_ms_p99": round(_percentile(latencies, 0.99), 2),
        "latency_ms_max": round(max(latencies, default=float("nan")), 2),
        "latency_ms_mean": round(statistics.fmean(latencies), 2) if latencies else None,
    }


def _bot_process_facts(pid: int) -> dict[str, Any]:
    process = psutil.Process(pid)
    torch_maps = sorted({m.path for m in process.memory_maps() if "torch" in m.path})
    return {
        "rss_mb": round(process.memory_info().rss / 2**20, 1),
        "torch_imported": bool(torch_maps),
        "cpu_seconds": round(sum(process.cpu_times()[:2]), 2),
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    database = f"hps_bench_{uuid.uuid4().hex[:10]}"
    await _admin(f'CREATE DATABASE "{database}"')
    url = _url(database)
    data_dir = Path(f"/tmp/{database}")
    fake = FakeDiscord(guilds=[FakeGuild(GUILD_ID, "bench", [CHANNEL_ID])])
    process = None
    try:
        await asyncio.to_thread(migrate.upgrade, url)
        await fake.start()
        process = await _start_bot(fake, url, data_dir, args.profile)
        pool = await create_pool(url)
        worker = TestWorker(pool, LocalImageStore(data_dir / "images"))
        requester = FakeUser(760000000000000000, "requester")
        message_id = await _round_message(fake, worker, requester)
        users = [FakeUser(770000000000000000 + i, f"user{i}") for i in range(args.users)]
        rng = random.Random(42)
        load_before = os.getloadavg()
        cpu_before = _bot_process_facts(process.pid)["cpu_seconds"]
        # This process keeps every interaction and request it saw: its cyclic garbage
        # collector's full passes grow with them and would stall the clicks it times. Its
        # garbage is acyclic (reference counting frees it), so the collector stays off.
        gc.disable()
        # Warm-up, not reported: the bot's pool opens its connections, caches fill.
        warmup = await _stage(fake, message_id, users, args.rates[0] / 2, args.warmup_seconds, rng)
        warmup_clicks = warmup["clicks"]
        stages = []
        with PeakMemory(process.pid) as memory:
            for rate in args.rates:
                stage = await _stage(fake, message_id, users, rate, args.seconds, rng)
                stages.append(stage)
                print(
                    f"offered {rate:6.0f}/s: recorded {stage['achieved_per_s']:7.1f}/s, "
                    f"p50 {stage['latency_ms_p50']:6.2f} ms, "
                    f"p99 {stage['latency_ms_p99']:7.2f} ms, lost {stage['lost']}",
                    flush=True,
                )
            requester_path = await _requester_clicks(fake, message_id, requester, 20)
            print(
                f"requester's clicks: first answer p50 {requester_path['first_answer_ms_p50']} ms,"
                f" max {requester_path['first_answer_ms_max']} ms",
                flush=True,
            )
        facts = _bot_process_facts(process.pid)
        facts["peak_rss_mb"] = round(memory.peak / 2**20, 1)
        sent = sum(s["clicks"] for s in stages) + warmup_clicks + requester_path["clicks"]
        round_id = await pool.fetchval("SELECT id FROM rounds")
        events = await pool.fetchval(
            "SELECT count(*) FROM choice_events WHERE round_id = $1", round_id
        )
        choices = await pool.fetchval("SELECT count(*) FROM choices WHERE round_id = $1", round_id)
        await pool.close()
        meeting = [
            s
            for s in stages
            if s["lost"] == 0
            and s["latency_ms_p99"] < args.p99_target_ms
            and s["achieved_per_s"] >= 0.95 * s["offered_per_s"]
        ]
        sustained = max((s["offered_per_s"] for s in meeting), default=0)
        result = {
            "benchmark": "choice_ingest",
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "load_avg_before": [round(x, 2) for x in load_before],
                "load_avg_after": [round(x, 2) for x in os.getloadavg()],
                "note": "this process (fake Discord + click generator), the bot process and "
                "PostgreSQL share the machine's cores",
            },
            "config": {
                "users": args.users,
                "seconds_per_stage": args.seconds,
                "warmup_seconds": args.warmup_seconds,
            },
            "stages": stages,
            "requester_clicks": requester_path,
            "sustained_choices_per_s": sustained,
            "p99_target_ms": args.p99_target_ms,
            "clicks_sent": sent,
            "choice_events_in_db": events,
            "lost_clicks": sent - events,
            "distinct_choices_in_db": choices,
            "bot": {**facts, "cpu_seconds_in_stages": round(facts["cpu_seconds"] - cpu_before, 2)},
            "gpu": "not measured: the bot uses no GPU",
        }
        print(
            f"sustained {sustained}/s with p99 < {args.p99_target_ms} ms; "
            f"{sent} clicks sent, {events} choice events stored ({sent - events} lost), "
            f"{choices} choices; bot RSS {facts['rss_mb']} MB (peak {facts['peak_rss_mb']} MB), "
            "torch imported: "
            f"{facts['torch_imported']}"
        )
        return result
    finally:
        if process is not None:
            process.terminate()
            await asyncio.wait_for(process.wait(), 30)
        await fake.stop()
        if not args.keep:
            await _admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[250, 500, 750, 1000, 1250, 1500])
    parser.add_argument("--seconds", type=float, default=8.0, help="Length of each stage.")
    parser.add_argument("--warmup-seconds", type=float, default=2.0)
    parser.add_argument("--users", type=int, default=2000, help="Distinct clicking users.")
    parser.add_argument("--p99-target-ms", type=float, default=50.0)
    parser.add_argument("--keep", action="store_true", help="Keep the database afterwards.")
    parser.add_argument("--profile", type=Path, help="Run the bot under cProfile, stats here.")
    parser.add_argument("--out", type=Path, default=RESULTS)
    arguments = parser.parse_args()
    outcome = asyncio.run(main(arguments))
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    arguments.out.write_text(json.dumps(outcome, indent=2) + "\n")
    print(f"wrote {arguments.out}")
