"""Settings: sources and precedence, validation messages, secrets never shown."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest

from hps.logs import JsonFormatter, RedactingFilter, TextFormatter
from hps.settings import ConfigError, load_settings, redact_url


def test_environment_overrides_toml_overrides_defaults(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "hps.toml"
    config.write_text(
        "[limits]\nrounds_per_hour = 3\nrounds_per_week = 9\n[discord]\nguild_ids = [1, 2]\n"
    )
    monkeypatch.setenv("HPS_CONFIG", str(config))
    monkeypatch.setenv("HPS_LIMITS__ROUNDS_PER_HOUR", "7")
    settings = load_settings()
    assert settings.limits.rounds_per_hour == 7  # env
    assert settings.limits.rounds_per_week == 9  # file
    assert settings.limits.rounds_in_flight == 2  # default
    assert settings.discord.guild_ids == [1, 2]


def test_invalid_settings_are_named_without_their_value(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("HPS_GENERATION__IMAGES_PER_ROUND", "99")
    monkeypatch.setenv("HPS_WORKER__LEASE_SECONDS", "secret-looking-value")
    with pytest.raises(ConfigError) as error:
        load_settings()
    message = str(error.value)
    assert "HPS_GENERATION__IMAGES_PER_ROUND (generation.images_per_round)" in message
    assert "HPS_WORKER__LEASE_SECONDS (worker.lease_seconds)" in message
    assert "secret-looking-value" not in message


def test_unknown_variables_and_files_are_errors(monkeypatch, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("HPS_LIMITS__ROUND_PER_HOUR", "3")  # typo
    with pytest.raises(ConfigError, match="HPS_LIMITS__ROUND_PER_HOUR"):
        load_settings()
    monkeypatch.delenv("HPS_LIMITS__ROUND_PER_HOUR")
    monkeypatch.setenv("HPS_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="no such file"):
        load_settings()
    bad = tmp_path / "bad.toml"
    bad.write_text("[limits]\nrounds_per_hour = \n")
    monkeypatch.setenv("HPS_CONFIG", str(bad))
    with pytest.raises(ConfigError):
        load_settings()


def test_an_empty_hps_config_means_no_toml_file(monkeypatch, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`HPS_CONFIG=` reads no file: not `./hps.toml`, and no error about a missing one."""
    config = tmp_path / "hps.toml"
    config.write_text("[limits]\nrounds_per_hour = 3\n")
    monkeypatch.setattr("hps.settings.DEFAULT_CONFIG_FILE", config)
    monkeypatch.delenv("HPS_CONFIG", raising=False)
    assert load_settings().limits.rounds_per_hour == 3  # unset: ./hps.toml
    for empty in ("", "  "):
        monkeypatch.setenv("HPS_CONFIG", empty)
        assert load_settings().limits.rounds_per_hour != 3


def test_hps_env_file_names_the_env_file_and_empty_means_none(monkeypatch, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    default = tmp_path / ".env"
    default.write_text("HPS_LIMITS__ROUNDS_PER_HOUR=3\nPOSTGRES_PASSWORD=x\n")
    monkeypatch.setattr("hps.settings.DEFAULT_ENV_FILE", default)
    assert load_settings().limits.rounds_per_hour == 3  # unset: ./.env
    other = tmp_path / "other.env"
    other.write_text("HPS_LIMITS__ROUNDS_PER_HOUR=4\n")
    monkeypatch.setenv("HPS_ENV_FILE", str(other))
    assert load_settings().limits.rounds_per_hour == 4
    for empty in ("", " "):
        monkeypatch.setenv("HPS_ENV_FILE", empty)
        assert load_settings().limits.rounds_per_hour == 10  # the default: no file read
    # A typo in a file that is not read is no error; in the one read, it is.
    default.write_text("HPS_LIMITS__ROUND_PER_HOUR=3\n")
    assert load_settings().limits.rounds_per_hour == 10
    monkeypatch.delenv("HPS_ENV_FILE")
    with pytest.raises(ConfigError, match="HPS_LIMITS__ROUND_PER_HOUR"):
        load_settings()
    monkeypatch.setenv("HPS_ENV_FILE", str(tmp_path / "missing.env"))
    with pytest.raises(ConfigError, match="HPS_ENV_FILE: no such file"):
        load_settings()


def test_secrets_are_redacted(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HPS_DISCORD__TOKEN", "tok-ABC.123")
    monkeypatch.setenv("HPS_DATABASE_URL", "postgresql://app:pa55word@db:5432/hps")
    settings = load_settings()
    shown = str(settings.redacted())
    assert "tok-ABC.123" not in shown and "pa55word" not in shown
    assert "postgresql://app:***@db:5432/hps" in shown
    assert "tok-ABC.123" not in repr(settings) and "pa55word" not in repr(settings)
    assert sorted(settings.secret_values()) == ["pa55word", "tok-ABC.123"]
    assert redact_url("postgresql://u@h/db") == "postgresql://u@h/db"
    monkeypatch.setenv("HPS_DATABASE_URL", "postgresql://app@db/hps?password=q-s3cret")
    assert load_settings().secret_values() == ["tok-ABC.123", "q-s3cret"]
    assert redact_url("postgresql://app@db/hps?sslmode=require&password=q-s3cret") == (
        "postgresql://app@db/hps?sslmode=require&password=***"
    )
    # The hub's token for gated models (docs/deploy.md) is redacted in the logs too.
    monkeypatch.setenv("HF_TOKEN", "hf_s3cretHubToken")
    assert "hf_s3cretHubToken" in load_settings().secret_values()


def test_aws_secrets_the_s3_client_reads_from_the_environment_are_redacted_in_logs(
    monkeypatch,  # type: ignore[no-untyped-def]
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-S3CRET")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "aws-T0KEN")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")  # an id, not a secret
    assert load_settings().secret_values() == ["aws-S3CRET", "aws-T0KEN"]


def test_a_password_with_reserved_characters_is_never_shown(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # Written raw, a `#` or `/` would end the URL's user part early; both ways it stays hidden.
    assert redact_url("postgresql://u:pa#ss/x@h/db") == "postgresql://u:***@h/db"
    monkeypatch.setenv("HPS_DATABASE_URL", "postgresql://u:pa#ss@h/db")
    with pytest.raises(ConfigError) as error:
        load_settings()
    assert "percent-encoded" in str(error.value) and "pa#ss" not in str(error.value)
    monkeypatch.setenv("HPS_DATABASE_URL", "postgresql://u:pa%23ss@h/db?sslmode=require")
    settings = load_settings()
    assert settings.redacted()["database_url"] == "postgresql://u:***@h/db?sslmode=require"
    assert settings.secret_values() == ["pa%23ss", "pa#ss"]  # as written, and decoded


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("localhost", "must be a URL like postgresql://"),
        ("mysql://u@h/db", "must be a URL like postgresql://"),
        ("postgresql://u@h:99999/db", "port that is not a number"),
    ],
)
def test_a_database_url_that_is_no_postgresql_url_is_named(
    monkeypatch, url: str, problem: str
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("HPS_DATABASE_URL", url)
    with pytest.raises(ConfigError) as error:
        load_settings()
    assert "HPS_DATABASE_URL (database_url)" in str(error.value)
    assert problem in str(error.value)


def test_an_empty_database_url_means_the_embedded_server(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("HPS_DATABASE_URL", "")
    assert load_settings().database_url is None


@pytest.mark.parametrize("formatter", [TextFormatter(), JsonFormatter()])
def test_logs_never_carry_secrets(formatter: logging.Formatter) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(RedactingFilter(["tok-ABC.123"]))
    logger = logging.getLogger("test.redaction")
    logger.addHandler(handler)
    try:
        logger.warning(
            "connecting with %s", "tok-ABC.123", extra={"round_id": 5, "dsn": "x tok-ABC.123"}
        )
        try:
            raise RuntimeError("bad token tok-ABC.123")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    output = stream.getvalue()
    assert "tok-ABC.123" not in output
    assert output.count("********") >= 2 and "round_id" in output


def test_with_changes_validates_and_leaves_the_original() -> None:
    from pydantic import ValidationError

    settings = load_settings()
    changed = settings.with_changes("train", epochs=3, learning_rate=None, choosers="all")
    assert (changed.train.epochs, changed.train.choosers) == (3, "all")
    assert changed.train.learning_rate == settings.train.learning_rate == 1.7e-5
    assert settings.train.epochs == 1 and changed.limits == settings.limits
    with pytest.raises(ValidationError, match="choosers"):
        settings.with_changes("train", choosers="everyone")


def test_a_dot_env_file_is_read_below_the_environment(monkeypatch, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`.env` (as Compose reads it) sets HPS_* settings; its other variables are left alone,
    the environment wins over it, and an unknown HPS_* name in it is refused."""
    env_file = tmp_path / ".env"
    env_file.write_text(
        "POSTGRES_PASSWORD=compose-only\nHPS_DISCORD__TOKEN=tok-from-dotenv\n"
        "HPS_LIMITS__ROUNDS_PER_HOUR=4\nHPS_LIMITS__ROUNDS_PER_WEEK=5\n"
    )
    monkeypatch.setattr("hps.settings.DEFAULT_ENV_FILE", env_file)
    monkeypatch.setenv("HPS_LIMITS__ROUNDS_PER_WEEK", "6")
    settings = load_settings()
    assert settings.discord.token is not None
    assert settings.discord.token.get_secret_value() == "tok-from-dotenv"
    assert settings.limits.rounds_per_hour == 4
    assert settings.limits.rounds_per_week == 6  # the environment wins
    assert settings.redacted()["discord"]["token"] == "********"
    env_file.write_text("HPS_LIMITS__ROUND_PER_HOUR=3\n")
    with pytest.raises(ConfigError, match=r"HPS_LIMITS__ROUND_PER_HOUR \(in .*\.env\)"):
        load_settings()


def test_hps_config_show_reads_dot_env_and_redacts_the_token(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    (tmp_path / ".env").write_text("HPS_DISCORD__TOKEN=tok-from-dotenv\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPS_")}
    env["PYTHONPATH"] = str(root)
    shown = subprocess.run(
        [sys.executable, "-m", "cli", "config", "show", "--json"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert '"token": "********"' in shown.stdout
    assert "tok-from-dotenv" not in shown.stdout + shown.stderr
