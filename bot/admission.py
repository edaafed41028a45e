"""Admission control of clicks: a bound on the clicks in flight, so that an overloaded bot
refuses the excess at once instead of making every click wait.

Without a bound, clicks arriving faster than the database records them pile up waiting for
a pool connection; every click then waits longer, past Discord's 3 s deadline, and the bot
spends its time on clicks nobody will hear about (its throughput collapses). With at most
`bot.clicks_in_flight` clicks admitted, the others are answered at once, privately, "busy,
please click again", having written nothing; the admitted ones keep their short latency,
and the bot keeps recording at the rate the database sustains.

The one click guard (`bot.views._guarded`) asks `Admission.admit()` first and `release()`s
when the click is answered. Refusals are logged as one summary line at most every
`LOG_EVERY` seconds: an overloaded bot must not spend its time logging either.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Coroutine
from typing import Any

import discord

from bot import formats

log = logging.getLogger(__name__)

LOG_EVERY = 10.0  # seconds between two summaries of refused clicks


class Admission:
    """At most `limit` clicks in flight in this bot process."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the bound on clicks in flight must be at least 1, not {limit}")
        self.limit = limit
        self.in_flight = 0
        self.admitted = 0  # since start, for the log and the tests
        self.refused = 0
        self._window: tuple[float, int] | None = None  # (first refusal, refusals) unlogged
        self._last_log = float("-inf")

    def admit(self) -> bool:
        """Take a place if one is free (the caller must `release` it); False when full."""
        if self.in_flight >= self.limit:
            self.refused += 1
            self._note_refusal()
            return False
        self.in_flight += 1
        self.admitted += 1
        return True

    def release(self) -> None:
        """An admitted click was answered (or failed): its place is free again."""
        assert self.in_flight > 0, "released more clicks than were admitted"
        self.in_flight -= 1

    def _note_refusal(self) -> None:
        now = time.monotonic()
        since, count = self._window or (now, 0)
        self._window = (since, count + 1)
        if now - self._last_log < LOG_EVERY:
            return
        log.warning(
            "busy: %d click(s) refused in %.1f s (at most %d in flight)",
            count + 1,
            now - since,
            self.limit,
            extra={"refused": count + 1, "clicks_in_flight": self.limit},
        )
        self._window = None
        self._last_log = now


async def refuse(interaction: discord.Interaction, handling: Coroutine[Any, Any, Any]) -> None:
    """Answer a click that was not admitted, at once and privately; its handler never runs,
    so nothing is written."""
    handling.close()
    try:
        await interaction.response.send_message(formats.BUSY, ephemeral=True)
    except discord.HTTPException:
        pass  # too late even for that: the summary line counts it among the refused
