"""The suite's log check (tests/log_check.py) catches log calls that only fail when their
level is enabled, which a suite logging above INFO never saw."""

from __future__ import annotations

import logging

import pytest

from tests.log_check import LogCheck, parse_json_lines, problems

log = logging.getLogger("bot.test_log_check")


def test_every_logger_of_ours_is_at_debug_and_third_parties_at_info() -> None:
    assert log.getEffectiveLevel() == logging.DEBUG
    assert logging.getLogger("discord.gateway").getEffectiveLevel() == logging.INFO


def test_an_extra_key_clashing_with_the_record_fails_the_test(
    log_calls_are_built: LogCheck,
) -> None:
    with pytest.raises(KeyError, match="Attempt to overwrite 'created' in LogRecord"):
        log.info("training requested", extra={"job_id": 1, "created": True})  # noqa: G101
    [error] = log_calls_are_built.errors
    assert error.startswith("making a record of bot.test_log_check: 'training requested'")
    log_calls_are_built.errors.clear()  # caught on purpose: the test passes


def test_arguments_that_do_not_fit_fail_the_test(log_calls_are_built: LogCheck) -> None:
    # Logging prints a traceback and goes on (pytest's own capture handler raises, but only
    # for records at its level, and it is not there in processes).
    with pytest.raises(TypeError):
        log.debug("%d rounds", "three")
    errors = log_calls_are_built.errors
    assert errors and all("'%d rounds'" in e for e in errors)
    assert all("TypeError: %d format: a real number is required" in e for e in errors)
    errors.clear()


def test_process_logs_show_errors_and_broken_log_calls() -> None:
    output = "\n".join(
        [
            '{"ts": "t", "level": "INFO", "logger": "bot.client", "msg": "ready"}',
            '{"ts": "t", "level": "ERROR", "logger": "bot.client", "msg": "/retrain failed"}',
            '{"ts": "t", "level": "ERROR", "logger": "db.listen", "msg": "expected outage"}',
            "hps serve: started bot (pid 12)",
            'Loading: 40%|####  | 2/5{"level": "ERROR", "logger": "x", "msg": "after a bar"}',
            "--- Logging error ---",
        ]
    )
    records, others = parse_json_lines(output)
    assert [r["level"] for r in records] == ["INFO", "ERROR", "ERROR", "ERROR"]
    assert others == [
        "hps serve: started bot (pid 12)",
        "Loading: 40%|####  | 2/5",
        "--- Logging error ---",
    ]
    assert problems(records, others, allowed=["expected outage"]) == [
        '{"ts": "t", "level": "ERROR", "logger": "bot.client", "msg": "/retrain failed"}',
        '{"level": "ERROR", "logger": "x", "msg": "after a bar"}',
        "--- Logging error ---",
    ]
