"""The operators' commands as a user runs them: `hps health`, `hps jobs`, `hps users`."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import asyncpg

from db import images, jobs, rounds, services, users
from hps.settings import load_settings
from hps.storage import storage
from tests.factories import queued_round, stored_round
from tests.test_cli import hps

LEASE = timedelta(minutes=1)


async def test_health_says_which_process_is_down_and_exits_1(
    pool: asyncpg.Pool, database_url: str
) -> None:
    env = {"HPS_DATABASE_URL": database_url}
    nothing = hps("health", env=env)
    assert nothing.returncode == 1, nothing.stderr
    for kind in ("bot", "worker", "scheduler"):
        assert f"down {kind:<9} none healthy" in nothing.stdout
    await jobs.register_worker(pool, "gpu-1:7", ["generate"], "cuda:0")
    await services.heartbeat(pool, "scheduler", {"schedules": []})
    await services.heartbeat(pool, "bot", {"gateway": False, "guilds": 0})
    disconnected = hps("health", "bot", env=env)
    assert disconnected.returncode == 1
    assert "(NOT connected to the gateway)" in disconnected.stdout
    await services.heartbeat(pool, "bot", {"gateway": True, "guilds": 2})
    healthy = hps("health", env=env)
    assert healthy.returncode == 0, healthy.stdout
    assert "(connected to the gateway, 2 guild(s))" in healthy.stdout
    assert "ok   worker    gpu-1:7: last heartbeat" in healthy.stdout
    # --here: only this machine's processes (the worker was registered from this host too);
    # with no kind, the kinds that run here.
    assert hps("health", "scheduler", "--here", env=env).returncode == 0
    await pool.execute("UPDATE services SET hostname = 'elsewhere' WHERE kind = 'bot'")
    mine = hps("health", "--here", env=env)
    assert mine.returncode == 0 and " bot " not in mine.stdout and "ok   scheduler" in mine.stdout
    await pool.execute("UPDATE workers SET hostname = 'elsewhere'")
    here = hps("health", "worker", "--here", env=env)
    assert here.returncode == 1 and "none healthy on this machine" in here.stdout
    # A worker that stopped heartbeating longer than the lease ago is down.
    await pool.execute("UPDATE workers SET last_seen_at = now() - interval '10 minutes'")
    assert hps("health", "worker", env=env).returncode == 1
    assert hps("health", "nonsense", env=env).returncode == 2


async def test_health_forgets_processes_silent_for_over_a_day(
    pool: asyncpg.Pool, database_url: str
) -> None:
    """A process killed last week (it never said it stopped) is no longer reported, nor does
    it make `hps health --here` fail on a machine where only the bot runs now."""
    env = {"HPS_DATABASE_URL": database_url}
    await jobs.register_worker(pool, "gpu-1:7", ["generate"], "cuda:0")
    await services.heartbeat(pool, "scheduler", {"schedules": []})
    await services.heartbeat(pool, "bot", {"gateway": True, "guilds": 1})
    await pool.execute(
        "UPDATE services SET last_seen_at = now() - interval '7 days', id = 'scheduler:old:1',"
        " started_at = now() - interval '8 days' WHERE kind = 'scheduler'"
    )
    await pool.execute("UPDATE workers SET last_seen_at = now() - interval '7 days'")
    await services.heartbeat(pool, "scheduler", {"schedules": []})  # a scheduler elsewhere
    await pool.execute(
        "UPDATE services SET hostname = 'elsewhere' WHERE kind = 'scheduler'"
        " AND id <> 'scheduler:old:1'"
    )
    shown = hps("health", env=env)
    assert "scheduler:old:1" not in shown.stdout and "gpu-1:7" not in shown.stdout
    assert "ok   scheduler" in shown.stdout and "down worker    none healthy" in shown.stdout
    here = hps("health", "--here", env=env)
    assert here.returncode == 0, here.stdout
    assert "ok   bot" in here.stdout and "scheduler" not in here.stdout
    # Silent for less than a day: still reported, as down.
    await pool.execute("UPDATE workers SET last_seen_at = now() - interval '3 hours'")
    recent = hps("health", "worker", env=env)
    assert recent.returncode == 1 and "down worker    gpu-1:7: last heartbeat" in recent.stdout


async def test_jobs_list_dead_retry_and_cancel(pool: asyncpg.Pool, database_url: str) -> None:
    env = {"HPS_DATABASE_URL": database_url, "COLUMNS": "200"}  # tables unwrapped
    score, _ = await jobs.enqueue(pool, "score", {"prompt": "x", "image_keys": []})
    [claimed] = await jobs.claim(pool, ["score"], "w", LEASE)
    await jobs.fail(pool, claimed, "w", "Traceback ...\nValueError: bad image", retry=False)
    dead = hps("jobs", "dead", env=env)
    assert dead.returncode == 0 and "ValueError: bad image" in dead.stdout
    shown = hps("jobs", "show", str(score.id), env=env)
    assert '"state": "dead"' in shown.stdout and "Traceback" in shown.stdout
    retried = hps("jobs", "retry", str(score.id), env=env)
    assert retried.returncode == 0 and f"job {score.id}: queued again" in retried.stdout
    assert (await jobs.get(pool, score.id)).state == "queued"
    again = hps("jobs", "retry", str(score.id), env=env)
    assert again.returncode == 1 and "is queued, not dead or cancelled" in again.stdout

    # A generate job's round goes with it: cancelled, the round fails (its requester sees
    # why); retried, the round is queued again.
    round_id = await queued_round(pool, requester=5)
    [generate] = await jobs.list_jobs(pool, kind="generate")
    cancelled = hps("jobs", "cancel", str(generate.id), env=env)
    assert cancelled.returncode == 0, cancelled.stderr
    assert f"job {generate.id}: cancelled; round {round_id} failed" in cancelled.stdout
    failed = await rounds.get_round(pool, round_id)
    assert (failed.status, failed.error) == (
        "failed",
        "A maintainer cancelled this round's generation. You can retry it.",
    )
    assert hps("jobs", "cancel", str(generate.id), env=env).returncode == 1
    requeued = hps("jobs", "retry", str(generate.id), env=env)
    assert f"round {round_id} queued again" in requeued.stdout
    assert (await rounds.get_round(pool, round_id)).status == "queued"
    listed = hps("jobs", "list", "--kind", "generate", "--state", "queued", env=env)
    assert f"│ {generate.id} " in listed.stdout


async def test_users_ban_unban_and_forget_by_discord_id(
    pool: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    env = {"HPS_DATABASE_URL": database_url}
    assert (
        hps(
            "users", "ban", "710000000000000009", "--shadow", "--reason", "spam", env=env
        ).returncode
        == 0
    )
    listed = hps("users", "banned", env=env)
    assert "710000000000000009" in listed.stdout and "shadow" in listed.stdout
    assert "spam" in listed.stdout and "cli:" in listed.stdout
    assert hps("users", "unban", "710000000000000009", env=env).returncode == 0
    assert not (await users.get_user(pool, 710000000000000009)).shadow_banned
    unknown = hps("users", "unban", "42", env=env)
    assert unknown.returncode == 1 and "42 is unknown here" in unknown.stderr

    # A deletion request, the store failing halfway through the files: the rows are gone,
    # the CLI says what was committed and what is pending, and the rest stays recorded.
    data_dir = tmp_path / "data"
    store = storage(load_settings(data_dir=data_dir)).images
    await stored_round(pool, store, requester=710000000000000010, k=4)
    keys = sorted(r["storage_key"] for r in await pool.fetch("SELECT storage_key FROM images"))
    stuck = store.objects.path(keys[1])  # a file the store cannot delete (it is a folder)
    stuck.unlink()
    stuck.mkdir()
    (stuck / "inside").write_bytes(b"x")
    env = {**env, "HPS_DATA_DIR": str(data_dir)}
    forgot = hps("users", "forget", "710000000000000010", "--yes", env=env)
    assert forgot.returncode == 0, forgot.stderr
    lines = forgot.stdout.splitlines()
    assert lines[0] == (
        "Forgot 710000000000000010: deleted 1 round(s), 0 choice(s) and 0 click event(s); "
        "4 image file(s) to delete."
    )
    assert lines[1] == "Deleted 1 image file(s)."
    assert lines[2].startswith("3 image file(s) could not be deleted now (IsADirectoryError: ")
    assert "they are recorded (image_deletions) and the bot deletes them" in forgot.stdout
    assert "training runs' files" in forgot.stdout and "image keys and choice ids" in forgot.stdout
    assert await pool.fetchval("SELECT count(*) FROM rounds") == 0
    assert [store.exists(k) for k in keys] == [False, False, True, True]
    pending = await pool.fetch("SELECT storage_key FROM image_deletions ORDER BY storage_key")
    assert [r["storage_key"] for r in pending] == keys[1:]
    nobody = hps("users", "forget", "710000000000000010", "--yes", env=env)
    assert nobody.returncode == 1 and "no data about 710000000000000010" in nobody.stderr
    # The store can delete it again: the bot's next sweep deletes what is left.
    (stuck / "inside").unlink()
    stuck.rmdir()
    await pool.execute("UPDATE image_deletions SET next_attempt_at = now()")
    assert (await images.delete_pending(pool, store.delete)).deleted == 3
    assert await pool.fetchval("SELECT count(*) FROM image_deletions") == 0
