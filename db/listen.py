"""LISTEN on NOTIFY channels over one dedicated connection that comes back by itself.

A pooled connection cannot LISTEN (it goes back to the pool), so a long-running process
keeps one connection of its own. When the database restarts that connection dies; the
listener reconnects with backoff and calls `on_connect` each time it is listening again,
so the owner can catch up on what it missed meanwhile (notifications are not queued for
absent listeners).

Notifications are wake-ups, never facts: any role that can connect may NOTIFY any channel
(PostgreSQL has no privilege to refuse it, e.g. to the analysts' role), so a handler reads
what happened from the tables and treats the payload as a hint of where to look.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import asyncpg

from db.connect import UNAVAILABLE, connect

log = logging.getLogger(__name__)

Handler = Callable[[str, str], None]  # (channel, payload)

PING_SQL = """
SELECT 1
"""

# Connecting can also fail with a server-side error (say, a database not created yet):
# keep trying whatever the reason, as a restart may fix it.
CONNECT_ERRORS = (*UNAVAILABLE, asyncpg.PostgresError)


class NotificationListener:
    """Listens on `channels`, calling `handler(channel, payload)` for each notification."""

    def __init__(
        self,
        url: str,
        channels: list[str],
        handler: Handler,
        *,
        on_connect: Callable[[], Awaitable[None]] | None = None,
        ping_seconds: float = 15.0,
        max_backoff: float = 30.0,
    ) -> None:
        self.url = url
        self.channels = channels
        self.handler = handler
        self.on_connect = on_connect
        self.ping_seconds = ping_seconds
        self.max_backoff = max_backoff
        self.connections = 0  # how many times it started listening (1 + reconnects)
        self.listening = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="hps-listener")

    async def stop(self) -> None:
        for task in list(self._background):
            task.cancel()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def _notify(self, _conn: object, _pid: int, channel: str, payload: str) -> None:
        try:
            self.handler(channel, payload)
        except (ValueError, KeyError, TypeError) as exc:
            # Any role may NOTIFY any channel (PostgreSQL has no privilege for it): a payload
            # that is not ours is one line in the log, not a traceback per notification.
            log.warning(
                "ignored a notification the handler could not read: %r",
                exc,
                extra={"channel": channel},
            )
        except Exception:
            log.exception("notification handler failed", extra={"channel": channel})

    async def _run(self) -> None:
        backoff = 0.2
        while True:
            try:
                conn = await connect(self.url)
            except CONNECT_ERRORS as exc:
                log.warning("LISTEN connection failed (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            try:
                await self._listen(conn)
                backoff = 0.2
            except UNAVAILABLE as exc:
                log.warning("LISTEN connection lost (%s); reconnecting", exc)
            except Exception:  # never stop listening for good: log, wait, try again
                log.exception("LISTEN failed; retrying in %.1fs", backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)
            finally:
                self.listening.clear()
                if not conn.is_closed():
                    conn.terminate()

    async def _listen(self, conn: asyncpg.Connection) -> None:
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        for channel in self.channels:
            await conn.add_listener(channel, self._notify)
        self.connections += 1
        self.listening.set()
        log.info("listening on %s", ", ".join(self.channels))
        if self.on_connect is not None:
            # Catch up in the background: the connection keeps listening meanwhile.
            task = asyncio.create_task(self._catch_up(), name="hps-listener-catch-up")
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        while not lost.is_set():
            try:
                await asyncio.wait_for(lost.wait(), timeout=self.ping_seconds)
            except TimeoutError:
                # A server that vanished without closing the socket is only noticed by use.
                await asyncio.wait_for(conn.fetchval(PING_SQL), timeout=self.ping_seconds)
        log.warning("LISTEN connection closed by the server; reconnecting")

    async def _catch_up(self) -> None:
        assert self.on_connect is not None
        try:
            await self.on_connect()
        except Exception:
            log.exception("catching up after (re)connecting failed")
