"""`hps worker`, `hps scheduler` and `hps serve` as real processes: signals, kills, exits."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from db import jobs, rounds
from db.images import images_of_round
from pipeline.worker import Worker
from tests.pipeline.conftest import make_settings, running, stored_pngs, wait_until

ROOT = Path(__file__).resolve().parents[1]
FAST = {
    "HPS_WORKER__LEASE_SECONDS": "5",
    "HPS_WORKER__HEARTBEAT_SECONDS": "1",
    "HPS_WORKER__POLL_SECONDS": "0.2",
    "HPS_MODELS__DEVICE": "cpu",
}


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HPS_")}
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "cli", *args],
            env={**clean, **FAST, **env},
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def wait_exit(process: subprocess.Popen[bytes]) -> int:
    return await asyncio.to_thread(process.wait, 30)


async def _job(pool, job_id: int, state: str) -> jobs.Job | None:  # type: ignore[no-untyped-def]
    job = await jobs.get(pool, job_id)
    return job if job.state == state else None


def _worker_args(*extra: str) -> list[str]:
    return ["worker", "--device", "cpu", "--handler", "effect=tests.job_handlers:effect", *extra]


async def test_sigterm_lets_the_job_in_hand_finish_and_claims_nothing_more(
    pool, database_url: str, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    in_hand, _ = await jobs.enqueue(pool, "effect", {"seconds": 2})
    waiting, _ = await jobs.enqueue(pool, "effect", {"seconds": 0})
    env = {"HPS_DATABASE_URL": database_url, "HPS_DATA_DIR": str(tmp_path / "data")}
    worker = spawn(_worker_args("--kinds", "effect", "--id", "w1"), env, tmp_path / "w.log")
    try:
        await wait_until(lambda: _job(pool, in_hand.id, "running"))
        worker.send_signal(signal.SIGTERM)
        assert await wait_exit(worker) == 0, (tmp_path / "w.log").read_text()
    finally:
        worker.kill()
    done = await jobs.get(pool, in_hand.id)
    assert done.state == "done" and done.result == {"worker": "w1"}
    untouched = await jobs.get(pool, waiting.id)
    assert untouched.state == "queued" and untouched.attempts == 0
    [row] = await jobs.list_workers(pool)
    assert row.id == "w1" and row.stopped_at is not None
    log = (tmp_path / "w.log").read_text()
    assert f"job {in_hand.id} done" in log and "worker w1 stopped" in log


async def test_past_the_grace_period_the_job_is_released_with_nothing_written(
    pool, database_url: str, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    job, _ = await jobs.enqueue(pool, "effect", {"seconds": 60})
    env = {
        "HPS_DATABASE_URL": database_url,
        "HPS_DATA_DIR": str(tmp_path / "data"),
        "HPS_WORKER__SHUTDOWN_GRACE_SECONDS": "0.5",
    }
    worker = spawn(_worker_args("--kinds", "effect"), env, tmp_path / "w.log")
    try:
        await wait_until(lambda: _job(pool, job.id, "running"))
        await asyncio.sleep(0.5)  # the handler has written its effect, uncommitted
        worker.send_signal(signal.SIGTERM)
        assert await wait_exit(worker) == 0, (tmp_path / "w.log").read_text()
    finally:
        worker.kill()
    released = await jobs.get(pool, job.id)
    assert released.state == "queued" and released.attempts == 0 and released.worker_id is None
    assert await pool.fetchval("SELECT count(*) FROM prompts") == 0  # rolled back
    assert f"job {job.id} released" in (tmp_path / "w.log").read_text()


@pytest.mark.slow
async def test_a_worker_killed_mid_job_has_its_job_taken_over_and_done_once(
    pool, database_url: str, tmp_path: Path, tiny_sd_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    generation = {"sd_model": str(tiny_sd_dir), "steps": 2, "width": 64, "height": 64}
    env = {
        "HPS_DATABASE_URL": database_url,
        "HPS_DATA_DIR": str(tmp_path / "data"),
        **{f"HPS_GENERATION__{k.upper()}": str(v) for k, v in generation.items()},
        "HPS_GENERATION__SAFETY_CHECKER": "false",
    }
    created = await rounds.create_round(pool, requester_discord_id=1, prompt="a red cube", k=4)
    handler = "generate=tests.job_handlers:generate_hanging_before_commit"
    args = ["worker", "--device", "cpu", "--kinds", "generate", "--id", "doomed"]
    doomed = spawn([*args, "--handler", handler], env, tmp_path / "doomed.log")
    images_dir = tmp_path / "data" / "images"
    try:
        # It hangs once the images are stored and before their rows commit: kill it there.
        await wait_until(lambda: len(stored_pngs(images_dir)) == 4, within=90)
        doomed.send_signal(signal.SIGKILL)
        assert await wait_exit(doomed) == -signal.SIGKILL
    finally:
        doomed.kill()
    held = await jobs.get(pool, created.job.id)
    assert held.state == "running" and held.worker_id == "doomed"
    assert await images_of_round(pool, created.round.id, include_nsfw=True) == []

    settings = make_settings(generation={**generation, "safety_checker": False})
    async with running(Worker(pool, settings, kinds=["generate"], worker_id="taker")):
        done = await wait_until(lambda: _job(pool, created.job.id, "done"), within=60)
    assert done.attempts == 2 and done.worker_id == "taker"
    images = await images_of_round(pool, created.round.id, include_nsfw=True)
    assert [i.position for i in images] == [1, 2, 3, 4]
    assert (await rounds.get_round(pool, created.round.id)).status == "ready"
    # The same seeds made the same files: the store holds the round's four images only.
    assert stored_pngs(images_dir) == sorted(f"{i.sha256}.png" for i in images)
    doomed_row = next(w for w in await jobs.list_workers(pool) if w.id == "doomed")
    assert doomed_row.stopped_at is None  # it never said goodbye


async def _stopped_worker(pool) -> jobs.Worker | None:  # type: ignore[no-untyped-def]
    workers = await jobs.list_workers(pool)
    return workers[0] if workers and workers[0].stopped_at is not None else None


async def test_serve_without_a_token_runs_scheduler_and_worker_and_stops_cleanly(
    empty_database_url: str, tmp_path: Path
) -> None:
    env = {"HPS_DATABASE_URL": empty_database_url, "HPS_DATA_DIR": str(tmp_path / "data")}
    serve = spawn(["serve"], env, tmp_path / "serve.log")
    pool = None
    try:
        # It migrated the empty database, then started the worker (which registered).
        pool = await wait_until(lambda: _pool_when_migrated(empty_database_url), within=60)
        await wait_until(lambda: jobs.list_workers(pool), within=60)
        children = await wait_until(lambda: _named_children(serve, {"scheduler", "worker"}))
        serve.send_signal(signal.SIGTERM)
        assert await wait_exit(serve) == 0, (tmp_path / "serve.log").read_text()
        assert not any(child.is_running() for child in children.values())
        assert await _stopped_worker(pool) is not None
    finally:
        serve.kill()
        if pool is not None:
            await pool.close()
    log = (tmp_path / "serve.log").read_text()
    assert (
        "no Discord bot token (set HPS_DISCORD__TOKEN in the environment or .env, or [discord] "
        "token in hps.toml): running the scheduler and a worker without the bot (`hps demo` "
        "shows the bot without Discord)"
    ) in log
    assert "database is up to date" in log and "SIGTERM: stopping" in log
    assert "started bot" not in log


async def test_serve_exits_non_zero_when_a_child_dies(database_url: str, tmp_path: Path) -> None:
    env = {"HPS_DATABASE_URL": database_url, "HPS_DATA_DIR": str(tmp_path / "data")}
    serve = spawn(["serve"], env, tmp_path / "serve.log")
    try:
        children = await wait_until(lambda: _named_children(serve, {"scheduler", "worker"}))
        children["worker"].kill()
        assert await wait_exit(serve) == 1
        assert not children["scheduler"].is_running()
    finally:
        serve.kill()
    assert "worker exited with code -9: stopping the others" in (tmp_path / "serve.log").read_text()


def _named_children(
    process: subprocess.Popen[bytes], names: set[str]
) -> dict[str, psutil.Process] | None:
    children = {c.cmdline()[-1]: c for c in psutil.Process(process.pid).children()}
    return children if names <= set(children) else None


async def _pool_when_migrated(url: str):  # type: ignore[no-untyped-def]
    from db.connect import create_pool

    pool = await create_pool(url, max_size=2)
    if await pool.fetchval("SELECT to_regclass('workers') IS NOT NULL"):
        return pool
    await pool.close()
    return None


def test_bad_options_exit_2_with_a_message(database_url: str, tmp_path: Path) -> None:
    env = {"HPS_DATABASE_URL": database_url, "HPS_DATA_DIR": str(tmp_path / "data")}
    log = tmp_path / "out.log"
    # `train` is short for train_classifier; `teleport` is no kind at all.
    worker = spawn(["worker", "--device", "cpu", "--kinds", "train,generate,teleport"], env, log)
    assert worker.wait(60) == 2
    assert "unknown job kind(s) teleport: choose from adapt_sd, generate, score" in log.read_text()
    scheduler = spawn(["scheduler"], {**env, "HPS_SCHEDULES__ADAPT_SD": "every sunday"}, log)
    assert scheduler.wait(60) == 2
    assert "HPS_SCHEDULES__ADAPT_SD (schedules.adapt_sd): invalid cron" in log.read_text()
