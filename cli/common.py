"""What every command shares: settings with a readable failure, logging, async entry."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from hps.logs import configure_logging
from hps.settings import ConfigError, Settings, get_settings

if TYPE_CHECKING:
    import asyncpg

T = TypeVar("T")
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def settings() -> Settings:
    """The settings, or exit 2 with the config error (naming the setting)."""
    try:
        loaded = get_settings()
    except ConfigError as exc:
        err_console.print(f"[red]{escape(str(exc))}[/red]", highlight=False)
        raise typer.Exit(2) from None
    configure_logging(loaded.log_level, loaded.log_format, loaded.secret_values())
    return loaded


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print an error a user caused and return the Exit to raise."""
    err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    return typer.Exit(code)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def run_service(service: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> None:
    """Run a long-lived service, passing it an event that SIGTERM or SIGINT sets."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await service(stop)

    asyncio.run(main())


@asynccontextmanager
async def database(config: Settings) -> AsyncIterator[asyncpg.Pool]:
    """A small pool on the configured database (the embedded one by default)."""
    from db.connect import create_pool, database_url

    pool = await create_pool(database_url(config), min_size=1, max_size=4)
    try:
        yield pool
    finally:
        await pool.close()
