"""Admission control of clicks: a bound on the clicks in flight, so that an overloaded bot
answers the excess at once instead of making every click wait.

Without a bound, clicks arriving faster than the bot records them pile up (waiting for a
database connection, for the event loop); every click then waits longer than the last, past
Discord's 3 s deadline, and the bot spends its time on clicks nobody will hear about: its
throughput collapses. With at most `bot.clicks_in_flight` clicks admitted, a click beyond
the bound is answered at once, privately, "busy, please click again", and its handler never
runs, so nothing is written; the admitted ones are recorded and answered in time.

A refusal is the cheapest answer the bot can give (an overloaded bot spends most of its time
refusing): one POST of a fixed body to the interaction's callback URL on a session of its
own, without discord.py's response bookkeeping, since nothing else answers that interaction.

The one click guard (`bot.replies.guarded`) asks `Admission.admit()` first, and `release()`s
when the click is answered, or calls `refuse()`. Refusals are logged as one summary line at
most every `LOG_EVERY` seconds: an overloaded bot must not spend its time logging either.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Coroutine
from typing import Any

import aiohttp
import discord
from discord.http import Route

from bot import formats

log = logging.getLogger(__name__)

LOG_EVERY = 10.0  # seconds between two summaries of refused clicks
# The callback body of a private message (type 4, flags 64 = ephemeral).
BUSY_BODY = json.dumps({"type": 4, "data": {"content": formats.BUSY, "flags": 64}}).encode()


class Admission:
    """At most `limit` clicks in flight in this bot process."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the bound on clicks in flight must be at least 1, not {limit}")
        self.limit = limit
        self.in_flight = 0
        self.admitted = 0  # since start, for the log and the tests
        self.refused = 0
        self._session: aiohttp.ClientSession | None = None
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

    async def refuse(
        self, interaction: discord.Interaction, handling: Coroutine[Any, Any, Any]
    ) -> None:
        """Answer a click that was not admitted, at once and privately; its handler never
        runs, so nothing is written."""
        handling.close()
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=32),
                headers={"Content-Type": "application/json"},
            )
        url = f"{Route.BASE}/interactions/{interaction.id}/{interaction.token}/callback"
        try:
            async with self._session.post(url, data=BUSY_BODY) as response:
                await response.read()
        except aiohttp.ClientError:
            pass  # Discord unreachable or the answer too late: counted among the refused

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _note_refusal(self) -> None:
        now = time.monotonic()
        since, count = self._window or (now, 0)
        self._window = (since, count + 1)
        if now - self._last_log < LOG_EVERY:
            return
        log.warning(
            "busy: %d click(s) refused in %.1f s (%d in flight at most)",
            count + 1,
            now - since,
            self.limit,
            extra={"refused": count + 1, "clicks_in_flight": self.limit},
        )
        self._window = None
        self._last_log = now
