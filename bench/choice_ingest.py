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
5. every click's answer is sorted: recorded (in `choice_events`, by interaction id), busy
   (refused by the bot's admission control, `bot.clicks_in_flight`: nothing may be
   written), uncertain (the database too slow), late (after Discord's 3 s: the server
   refuses it, as Discord does) or unanswered; an acknowledged click that is not in the
   database, or a refused one that is, is counted as a violation;
6. the sustainable rate is the highest offered rate whose clicks were all recorded with p99
   under the target (50 ms); an overload stage then offers twice that (`--overload`), where
   every click must still be answered within the deadline, at least 90 % of the sustainable
   rate recorded, and no click acknowledged without being committed; and one at twice the
   highest rate all recorded within the deadline whatever their latency; the same overloads
   are then offered to a bot without the bounds (`--baseline`: no admission control,
   unbounded HTTP connections, as before them) for comparison;
7. the bot's resident memory and whether it mapped any torch library are read from /proc.

    python bench/choice_ingest.py

Targets on the 2-core development machine: ≥ 500 choices/s sustained with p99 < 50 ms, no
click lost, graceful overload (above), the bot under 200 MB and without torch. This
process, the bot and PostgreSQL share the machine's cores. Results:
bench/results/choice_ingest.json.
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
import time
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
_private: Any = None  # --private-postgres: the server this run started
GUILD_ID, CHANNEL_ID = 820000000000000001, 820000000000000011
RESULTS = ROOT / "bench" / "results" / "choice_ingest.json"


def _admin_url() -> str:
    return _private.url if _private is not None else ADMIN_URL


def _url(database: str) -> str:
    return urlunsplit(urlsplit(_admin_url())._replace(path=f"/{database}"))


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(_admin_url())
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
    fake: FakeDiscord,
    url: str,
    data_dir: Path,
    profile: Path | None,
    in_flight: int | None,
    bot_settings: dict[str, str] | None = None,
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
    if in_flight is not None:
        env["HPS_BOT__CLICKS_IN_FLIGHT"] = str(in_flight)
    env.update(bot_settings or {})
    identified = fake.identifies
    command = [sys.executable, "-m", "cli", "bot"]
    if profile is not None:  # cProfile writes its statistics when the bot exits cleanly
        command[1:1] = ["-m", "cProfile", "-o", str(profile)]
    process = await asyncio.create_subprocess_exec(*command, cwd=ROOT, env=env)
    await fake.wait_for(lambda: fake.identifies > identified, within=60)
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
BUSY_ANSWER = "Too many clicks at once"  # admission control: nothing written
UNCERTAIN_ANSWER = "The database is slow"
DEADLINE_MS = 3000.0


def _answer_kind(click: Any) -> str:
    if click.responded_at is None:
        return "late" if click.late else "unanswered"
    content = click.response_data.get("content", "")
    if content.startswith(RECORDED_ANSWERS):
        return "recorded"
    if content.startswith(BUSY_ANSWER):
        return "busy"
    if content.startswith(UNCERTAIN_ANSWER):
        return "uncertain"
    return "other"


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
    pool: asyncpg.Pool,
    message_id: int,
    users: list[FakeUser],
    rate: float,
    seconds: float,
    rng: random.Random,
    bot_pid: int,
) -> dict[str, Any]:
    with CpuUse(bot_pid) as cpu:
        stage = await _clicks(fake, pool, message_id, users, rate, seconds, rng)
    per_click = {k: round(v * 1000 / stage["clicks"], 3) for k, v in cpu.seconds.items()}
    return {**stage, "cores_used": cpu.cores, "cpu_ms_per_click": per_click}


async def _clicks(
    fake: FakeDiscord,
    pool: asyncpg.Pool,
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
    await asyncio.sleep(0.5)  # a click answered late has been committed by now, if at all
    kinds: dict[str, list[Any]] = {}
    for click in sent:
        kinds.setdefault(_answer_kind(click), []).append(click)
    answered = [c for c in sent if c.responded_at is not None]
    latencies = [(c.responded_at - c.dispatched_at) * 1000 for c in answered]  # type: ignore[operator]
    first = min(c.dispatched_at for c in sent)
    recorded = kinds.get("recorded", [])
    last = max((c.responded_at for c in recorded), default=first)  # type: ignore[type-var]
    committed = {
        r["interaction_id"]
        for r in await pool.fetch(
            "SELECT interaction_id FROM choice_events WHERE interaction_id = ANY($1::bigint[])",
            [c.id for c in sent],
        )
    }
    return {
        "offered_per_s": rate,
        "clicks": count,
        "sending_s": round(sending, 3),
        "sent_per_s": round(count / sending, 1) if sending > 0 else None,
        "answered": len(answered),
        "answers": {kind: len(clicks) for kind, clicks in sorted(kinds.items())},
        "answered_within_deadline": sum(1 for ms in latencies if ms <= DEADLINE_MS),
        "recorded": len(recorded),
        "committed": len(committed),
        "lost": count - len(recorded),
        "acknowledged_not_committed": sum(1 for c in recorded if c.id not in committed),
        "refused_but_written": sum(1 for c in kinds.get("busy", []) if c.id in committed),
        "achieved_per_s": round(len(recorded) / (last - first), 1) if last > first else 0.0,
        "latency_ms_p50": round(_percentile(latencies, 0.50), 2),
        "latency_ms_p99": round(_percentile(latencies, 0.99), 2),
        "latency_ms_max": round(max(latencies, default=float("nan")), 2),
        "latency_ms_mean": round(statistics.fmean(latencies), 2) if latencies else None,
    }


def _meets_target(stage: dict[str, Any], p99_target_ms: float) -> bool:
    """Every click recorded, at the offered rate, with p99 under the target."""
    return (
        stage["lost"] == 0
        and stage["latency_ms_p99"] < p99_target_ms
        and stage["achieved_per_s"] >= 0.95 * stage["offered_per_s"]
    )


def _overload_verdict(stage: dict[str, Any], reference: float) -> dict[str, Any]:
    """How an overload stage at twice `reference` fared against the targets."""
    share = round(stage["achieved_per_s"] / reference, 3)
    return {
        "sustainable_per_s": reference,
        "recorded_share_of_sustainable": share,
        "meets_targets": {
            "every_click_answered_within_deadline": stage["answered_within_deadline"]
            == stage["clicks"],
            "recorded_at_least_90_percent_of_sustainable": share >= 0.9,
            "no_click_acknowledged_without_commit": stage["acknowledged_not_committed"] == 0
            and stage["refused_but_written"] == 0,
        },
    }


def _print_stage(name: str, stage: dict[str, Any]) -> None:
    print(
        f"{name} {stage['offered_per_s']:6.0f}/s (sent {stage['sent_per_s']}/s): recorded "
        f"{stage['achieved_per_s']:7.1f}/s, p50 {stage['latency_ms_p50']:7.2f} ms, "
        f"p99 {stage['latency_ms_p99']:7.2f} ms, answers {stage['answers']}, "
        f"cores {stage['cores_used']}, CPU ms per click {stage['cpu_ms_per_click']}",
        flush=True,
    )


class CpuUse:
    """Cores used meanwhile by the bot, this process (the fake Discord and the clicks),
    PostgreSQL's processes, and the whole machine (other work included)."""

    def __init__(self, bot_pid: int) -> None:
        self.bot = psutil.Process(bot_pid)
        self.me = psutil.Process()

    def _postgres(self) -> float:
        total = 0.0
        for process in psutil.process_iter(["name", "cpu_times"]):
            if process.info["name"] == "postgres" and process.info["cpu_times"]:
                total += sum(process.info["cpu_times"][:2])
        return total

    def _now(self) -> tuple[float, ...]:
        machine = psutil.cpu_times()
        return (
            time.monotonic(),
            sum(self.bot.cpu_times()[:2]),
            sum(self.me.cpu_times()[:2]),
            self._postgres(),
            machine.user + machine.system + machine.nice,
        )

    def __enter__(self) -> CpuUse:
        self.start = self._now()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._now()
        wall = end[0] - self.start[0]
        self.seconds = dict(
            zip(
                ("bot", "bench", "postgres", "machine"),
                (b - a for a, b in zip(self.start[1:], end[1:], strict=True)),
                strict=True,
            )
        )
        self.cores = {k: round(v / wall, 2) for k, v in self.seconds.items()}


def _scheduling() -> dict[str, Any]:
    """This run's scheduling priority: on a machine shared with other work, the run may be
    given a larger share (`nice`, and Linux's per-session autogroup)."""
    autogroup = Path("/proc/self/autogroup")
    return {
        "nice": os.nice(0),
        "autogroup": autogroup.read_text().strip() if autogroup.exists() else None,
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
    if args.no_commit_wait:
        await _admin(f'ALTER DATABASE "{database}" SET synchronous_commit = off')
    url = _url(database)
    data_dir = Path(f"/tmp/{database}")
    fake = FakeDiscord(guilds=[FakeGuild(GUILD_ID, "bench", [CHANNEL_ID])])
    process = None
    try:
        await asyncio.to_thread(migrate.upgrade, url)
        await fake.start()
        process = await _start_bot(
            fake, url, data_dir, args.profile, args.clicks_in_flight, dict(args.env or [])
        )
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
        warmup = await _stage(
            fake, pool, message_id, users, args.rates[0] / 2, args.warmup_seconds, rng, process.pid
        )
        warmup_clicks = warmup["clicks"]
        stages = []
        with PeakMemory(process.pid) as memory:
            for rate in args.rates:
                stage = await _stage(
                    fake, pool, message_id, users, rate, args.seconds, rng, process.pid
                )
                stages.append(stage)
                _print_stage("offered", stage)
            # Sustainable: every click recorded, p99 within the target. The highest rate all
            # recorded within Discord's deadline, whatever the latency, is doubled too.
            sustainable = max(
                (s["offered_per_s"] for s in stages if _meets_target(s, args.p99_target_ms)),
                default=0.0,
            )
            all_recorded = max(
                (
                    s["offered_per_s"]
                    for s in stages
                    if s["recorded"] == s["clicks"] and s["latency_ms_max"] <= DEADLINE_MS
                ),
                default=0.0,
            )
            references = sorted({args.sustainable or sustainable, all_recorded} - {0.0})
            rates = args.overload_rates or [2 * r for r in references]
            overloads = []
            for rate in rates if args.overload else []:
                await asyncio.sleep(2)  # the queue drains
                overload = await _stage(
                    fake, pool, message_id, users, rate, args.seconds, rng, process.pid
                )
                overload.update(_overload_verdict(overload, rate / 2))
                overloads.append(overload)
                _print_stage("overload", overload)
                print(f"overload targets: {overload['meets_targets']}", flush=True)
            requester_path = await _requester_clicks(fake, message_id, requester, 20)
            print(
                f"requester's clicks: first answer p50 {requester_path['first_answer_ms_p50']} ms,"
                f" max {requester_path['first_answer_ms_max']} ms",
                flush=True,
            )
        facts = _bot_process_facts(process.pid)
        facts["peak_rss_mb"] = round(memory.peak / 2**20, 1)
        sent = sum(s["clicks"] for s in stages) + warmup_clicks + requester_path["clicks"]
        sent += sum(o["clicks"] for o in overloads)
        refused = sum(s["answers"].get("busy", 0) for s in [*stages, *overloads])
        refused += warmup["answers"].get("busy", 0)
        round_id = await pool.fetchval("SELECT id FROM rounds")
        events = await pool.fetchval(
            "SELECT count(*) FROM choice_events WHERE round_id = $1", round_id
        )
        choices = await pool.fetchval("SELECT count(*) FROM choices WHERE round_id = $1", round_id)
        baselines = []
        if args.baseline and overloads:
            # The same overloads offered to a bot without the bounds (no admission control,
            # discord.py's unbounded connections): what the bounds change.
            process.terminate()
            await asyncio.wait_for(process.wait(), 30)
            process = await _start_bot(
                fake,
                url,
                data_dir,
                None,
                100_000,
                {"HPS_BOT__HTTP_CONNECTIONS": "0"},
            )
            for overload in overloads:
                await asyncio.sleep(2)
                baseline = await _stage(
                    fake, pool, message_id, users, overload["offered_per_s"], args.seconds, rng,
                    process.pid,
                )  # fmt: skip
                baseline.update(_overload_verdict(baseline, overload["sustainable_per_s"]))
                baselines.append(baseline)
                _print_stage("without bounds", baseline)
        await pool.close()
        sustained = sustainable
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
                "scheduling": _scheduling(),
            },
            "config": {
                "clicks_in_flight": args.clicks_in_flight or "the default",
                "bot_settings": dict(args.env or []),
                "synchronous_commit": "off" if args.no_commit_wait else "on",
                "users": args.users,
                "seconds_per_stage": args.seconds,
                "warmup_seconds": args.warmup_seconds,
            },
            "stages": stages,
            "sustainable_per_s": sustainable,
            "all_recorded_per_s": all_recorded,
            "overload": overloads,
            "overload_without_bounds": baselines,
            "requester_clicks": requester_path,
            "sustained_choices_per_s": sustained,
            "p99_target_ms": args.p99_target_ms,
            "clicks_sent": sent,
            "clicks_refused_busy": refused,
            "choice_events_in_db": events,
            "lost_clicks": sent - events - refused,
            "distinct_choices_in_db": choices,
            "bot": {**facts, "cpu_seconds_in_stages": round(facts["cpu_seconds"] - cpu_before, 2)},
            "gpu": "not measured: the bot uses no GPU",
        }
        print(
            f"sustained {sustained}/s with p99 < {args.p99_target_ms} ms; "
            f"{sent} clicks sent, {refused} refused (busy), {events} choice events stored "
            f"({sent - events - refused} lost), "
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
    parser.add_argument("--rates", type=float, nargs="+", default=[250, 500, 750, 1000])
    parser.add_argument("--seconds", type=float, default=8.0, help="Length of each stage.")
    parser.add_argument("--warmup-seconds", type=float, default=2.0)
    parser.add_argument("--users", type=int, default=2000, help="Distinct clicking users.")
    parser.add_argument("--p99-target-ms", type=float, default=50.0)
    parser.add_argument(
        "--overload",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Then offer twice the sustainable rate, and twice the highest rate all recorded.",
    )
    parser.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Then offer the overload again to a bot without admission control or bounded "
        "connections, for comparison.",
    )
    parser.add_argument(
        "--overload-rates",
        type=float,
        nargs="+",
        help="The overload stages' rates (default: twice the sustainable rate and twice the "
        "highest rate all recorded); each is judged against half its rate.",
    )
    parser.add_argument(
        "--sustainable",
        type=float,
        help="The sustainable rate the overload stage doubles (default: the measured one).",
    )
    parser.add_argument(
        "--clicks-in-flight", type=int, help="The bot's bound (bot.clicks_in_flight)."
    )
    parser.add_argument(
        "--env",
        type=lambda text: tuple(text.split("=", 1)),
        action="append",
        metavar="HPS_X=VALUE",
        help="A setting of the bot (repeatable), e.g. HPS_BOT__HTTP_CONNECTIONS=0.",
    )
    parser.add_argument(
        "--private-postgres",
        action="store_true",
        help="Run on a PostgreSQL server of its own (pgserver's binaries, fsync on), not the "
        "machine's shared one, which other work may be loading.",
    )
    parser.add_argument(
        "--no-commit-wait",
        action="store_true",
        help="synchronous_commit = off for the benchmark's database: commits do not wait for "
        "the disk (to tell the disk's share from the rest; not how production runs).",
    )
    parser.add_argument("--keep", action="store_true", help="Keep the database afterwards.")
    parser.add_argument("--profile", type=Path, help="Run the bot under cProfile, stats here.")
    parser.add_argument("--out", type=Path, default=RESULTS)
    arguments = parser.parse_args()
    if arguments.private_postgres:
        from tests.e2e.private_pg import PrivatePostgres

        _private = PrivatePostgres()
        _private.init()
        _private.start(fsync=True)
    try:
        outcome = asyncio.run(main(arguments))
    finally:
        if _private is not None:
            _private.cleanup()
    outcome["database"] = "private (pgserver, fsync on)" if _private else "the machine's server"
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    arguments.out.write_text(json.dumps(outcome, indent=2) + "\n")
    print(f"wrote {arguments.out}")
