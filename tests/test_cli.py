"""The `hps` CLI, run as a user runs it (a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]


def hps(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HPS_")}
    clean.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        capture_output=True,
        text=True,
        env=clean,
        cwd=ROOT,
        timeout=120,
    )


def test_db_upgrade_status_downgrade(empty_database_url: str) -> None:
    env = {"HPS_DATABASE_URL": empty_database_url}
    status = hps("db", "status", env=env)
    assert status.returncode == 1 and "migrations are pending" in status.stderr
    assert hps("db", "upgrade", env=env).returncode == 0
    status = hps("db", "status", env=env)
    assert status.returncode == 0 and "up to date" in status.stdout
    assert hps("db", "downgrade", "base", "--yes", env=env).returncode == 0
    assert hps("db", "status", env=env).returncode == 1


def test_db_commands_take_libpq_url_options_and_relative_revisions(empty_database_url: str) -> None:
    # Managed servers are reached with options such as sslmode in the URL's query.
    sep = "&" if "?" in empty_database_url else "?"
    env = {"HPS_DATABASE_URL": f"{empty_database_url}{sep}sslmode=disable&application_name=t"}
    upgraded = hps("db", "upgrade", env=env)
    assert upgraded.returncode == 0, upgraded.stderr
    down = hps("db", "downgrade", "-1", "--yes", env=env)  # as the README writes it
    assert down.returncode == 0, down.stderr
    status = hps("db", "status", env=env)
    assert status.returncode == 1 and status.stdout.count("pending:") == 1
    too_far = hps("db", "downgrade", "-99", "--yes", env=env)
    assert too_far.returncode == 1 and "Traceback" not in too_far.stderr
    assert "error: Relative revision -99 didn't produce 99 migrations" in too_far.stderr


def test_an_unreachable_database_is_a_clear_error(tmp_path: Path) -> None:
    env = {"HPS_DATABASE_URL": "postgresql://hps:pw-SECRET@127.0.0.1:1/hps"}
    result = hps("db", "status", env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "cannot connect to the database postgresql://hps:***@127.0.0.1:1/hps" in result.stderr
    assert "HPS_DATABASE_URL" in result.stderr and "SECRET" not in result.stderr


def test_config_show_redacts_secrets(tmp_path: Path) -> None:
    env = {
        "HPS_DISCORD__TOKEN": "tok-SECRET",
        "HPS_DATABASE_URL": "postgresql://u:pw-SECRET@h/db",
        "HPS_DATA_DIR": str(tmp_path),
    }
    shown = hps("config", "show", env=env)
    assert shown.returncode == 0
    assert "SECRET" not in shown.stdout + shown.stderr
    assert "postgresql://u:***@h/db" in shown.stdout
    as_json = hps("config", "show", "--json", env=env)
    assert '"token": "********"' in as_json.stdout


def test_invalid_config_fails_at_start_naming_the_setting() -> None:
    result = hps("db", "status", env={"HPS_LIMITS__ROUNDS_PER_HOUR": "many"})
    assert result.returncode == 2
    assert "HPS_LIMITS__ROUNDS_PER_HOUR" in result.stderr and "many" not in result.stderr


@pytest.mark.slow
def test_embedded_postgres_is_the_default(tmp_path: Path) -> None:
    """With no database URL, `hps db upgrade` starts pgserver in the data directory."""
    env = {"HPS_DATA_DIR": str(tmp_path / "data")}
    upgrade = hps("db", "upgrade", env=env)
    assert upgrade.returncode == 0, upgrade.stderr
    assert (tmp_path / "data" / "postgres" / "PG_VERSION").is_file()
    status = hps("db", "status", env=env)
    assert status.returncode == 0 and "up to date" in status.stdout
    assert "host=" in status.stdout  # a Unix socket in the data directory, no TCP server

    # The server stops when the last process using it exits.
    pgdata = str(tmp_path / "data" / "postgres")
    running = [
        p for p in psutil.process_iter(["cmdline"]) if pgdata in " ".join(p.info["cmdline"] or [])
    ]
    assert running == []


def test_every_training_setting_is_an_option_and_the_old_spellings_still_work() -> None:
    from hps.settings import AdaptSettings, TrainSettings

    for command, section in ((["train"], TrainSettings), (["adapt", "run"], AdaptSettings)):
        shown = hps(*command, "--help", env={"COLUMNS": "300"})
        assert shown.returncode == 0, shown.stderr
        options = {word for word in shown.stdout.replace(",", " ").split() if word[:2] == "--"}
        assert {"--" + name.replace("_", "-") for name in section.model_fields} <= options
    adapt = hps("adapt", "run", "--help", env={"COLUMNS": "300"}).stdout
    for spelling in ("--steps", "--lr", "--ema", "--no-ema", "--gradient-checkpointing"):
        assert spelling in adapt
    train = hps("train", "--help", env={"COLUMNS": "300"}).stdout
    assert "--exclude-contains-name" in train and "--lr" in train
    # Values are checked as the settings file's are, naming the option.
    refused = hps("train", "--epochs", "0", "--data", "/nowhere", "--no-register")
    assert refused.returncode == 1
    assert "--epochs: Input should be greater than or equal to 1" in refused.stderr
