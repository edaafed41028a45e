"""The bound on clicks in flight (bot/admission.py), without Discord: a clock is set by hand."""

from __future__ import annotations

import logging

import pytest

from bot import admission
from bot.admission import Admission


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [100.0]
    monkeypatch.setattr(admission.time, "monotonic", lambda: now[0])
    return now


def test_at_most_the_limit_is_admitted_and_a_release_frees_a_place(clock: list[float]) -> None:
    gate = Admission(2)
    assert gate.admit() and gate.admit()
    assert not gate.admit()
    assert (gate.in_flight, gate.admitted, gate.refused) == (2, 2, 1)
    gate.release()
    assert gate.admit()
    assert (gate.in_flight, gate.admitted, gate.refused) == (2, 3, 1)
    with pytest.raises(ValueError, match="at least 1"):
        Admission(0)


def test_refusals_are_logged_as_one_summary_at_most_every_ten_seconds(
    caplog: pytest.LogCaptureFixture, clock: list[float]
) -> None:
    gate = Admission(1)
    assert gate.admit()
    with caplog.at_level(logging.WARNING, logger="bot.admission"):
        for _ in range(5):  # the first is logged at once, the next four wait
            assert not gate.admit()
            clock[0] += 1.0
        clock[0] += 6.0
        assert not gate.admit()  # 11 s after the first summary: the next one
    assert [r.getMessage() for r in caplog.records] == [
        "busy: 1 click(s) refused in 0.0 s (1 in flight at most)",
        "busy: 5 click(s) refused in 10.0 s (1 in flight at most)",
    ]
