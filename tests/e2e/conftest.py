"""End-to-end fixtures: the local Discord-compatible server, the real bot (in this process,
or as a `python -m cli bot` subprocess) pointed at it, and a test worker.

In-process bots run the same `HPSBot` that `hps bot` runs, in the test's event loop (fast,
and tests can look inside); the restart and shutdown tests use real processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from discord.gateway import DiscordWebSocket
from discord.http import Route

from bot.client import HPSBot
from bot.fake_discord import FakeDiscord, FakeGuild, FakeUser, buttons
from hps.settings import Settings, load_settings
from hps.store import LocalImageStore
from tests.e2e.worker import TestWorker

ROOT = Path(__file__).resolve().parents[2]

GUILD_ID = 810000000000000001
CHANNEL_ID = 810000000000000011  # where /dream is allowed
OTHER_CHANNEL_ID = 810000000000000012
LOG_CHANNEL_ID = 810000000000000013
MAINTAINER_ROLE = 810000000000000021

ALICE = FakeUser(710000000000000001, "alice")
BOB = FakeUser(710000000000000002, "bob")
MAINTAINER = FakeUser(710000000000000003, "maintainer", roles=[MAINTAINER_ROLE])


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    server = FakeDiscord(
        guilds=[
            FakeGuild(
                GUILD_ID,
                "HPS test guild",
                [CHANNEL_ID, OTHER_CHANNEL_ID, LOG_CHANNEL_ID],
                [MAINTAINER_ROLE],
            )
        ]
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def bot_settings(fake: FakeDiscord, database_url: str, data_dir: Path, **sections: Any) -> Settings:
    """Settings pointing the bot at `fake` and the test database (sections merged in)."""
    config: dict[str, Any] = {
        "database_url": database_url,
        "data_dir": data_dir,
        "discord": {
            "token": fake.token,
            "guild_ids": [GUILD_ID],
            "channel_ids": [CHANNEL_ID],
            "maintainer_role_ids": [MAINTAINER_ROLE],
            "log_channel_id": LOG_CHANNEL_ID,
            "api_base_url": fake.api_base_url,
            "gateway_url": fake.gateway_url,
        },
        "bot": {"guild_ready_timeout": 0.05},
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    return load_settings(**config)


def bot_env(settings: Settings) -> dict[str, str]:
    """The same settings as environment variables, for a `python -m cli bot` process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPS_")}
    assert settings.database_url is not None and settings.discord.token is not None
    d = settings.discord
    env.update(
        HPS_DATABASE_URL=settings.database_url.get_secret_value(),
        HPS_DATA_DIR=str(settings.data_dir),
        HPS_DISCORD__TOKEN=d.token.get_secret_value(),
        HPS_DISCORD__GUILD_IDS=str(d.guild_ids),
        HPS_DISCORD__CHANNEL_IDS=str(d.channel_ids),
        HPS_DISCORD__MAINTAINER_ROLE_IDS=str(d.maintainer_role_ids),
        HPS_DISCORD__LOG_CHANNEL_ID=str(d.log_channel_id),
        HPS_DISCORD__API_BASE_URL=d.api_base_url or "",
        HPS_DISCORD__GATEWAY_URL=d.gateway_url or "",
        HPS_BOT__GUILD_READY_TIMEOUT=str(settings.bot.guild_ready_timeout),
        HPS_LOG_FORMAT="json",
    )
    return env


@pytest.fixture(autouse=True)
def restore_discord_endpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bot points discord.py's class-level URLs at the fake server: undo it after."""
    monkeypatch.setattr(Route, "BASE", Route.BASE)
    monkeypatch.setattr(DiscordWebSocket, "DEFAULT_GATEWAY", DiscordWebSocket.DEFAULT_GATEWAY)


async def start_bot(fake: FakeDiscord, settings: Settings, **options: Any) -> HPSBot:
    """Start an `HPSBot` and wait until it is connected, ready and listening."""
    identified = fake.identifies
    bot = HPSBot(settings, **options)
    bot._test_task = asyncio.create_task(bot.start(fake.token))  # type: ignore[attr-defined]
    waiting = asyncio.ensure_future(fake.wait_for(lambda: fake.identifies > identified))
    done, _ = await asyncio.wait(
        {waiting, bot._test_task},  # type: ignore[attr-defined]
        timeout=20,
        return_when=asyncio.FIRST_COMPLETED,
    )
    if bot._test_task in done:  # type: ignore[attr-defined]
        waiting.cancel()
        bot._test_task.result()  # type: ignore[attr-defined]  # raises why it stopped
    assert waiting in done, "the bot did not identify"
    await asyncio.wait_for(bot.wait_until_ready(), 10)
    assert bot.listener is not None
    await asyncio.wait_for(bot.listener.listening.wait(), 10)
    return bot


async def stop_bot(bot: HPSBot) -> None:
    await bot.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(bot._test_task, 10)  # type: ignore[attr-defined]


BotFactory = Callable[..., Awaitable[HPSBot]]


@pytest.fixture
async def make_bot(
    fake: FakeDiscord, database_url: str, tmp_path: Path
) -> AsyncIterator[BotFactory]:
    """`await make_bot(limits={...}, ...)`: a running in-process bot with those settings."""
    started: list[HPSBot] = []

    async def make(**sections: Any) -> HPSBot:
        bot = await start_bot(fake, bot_settings(fake, database_url, tmp_path / "data", **sections))
        started.append(bot)
        return bot

    try:
        yield make
    finally:
        for bot in started:
            await stop_bot(bot)


@pytest.fixture
async def bot(make_bot: BotFactory) -> HPSBot:
    return await make_bot()


@pytest.fixture
def store(tmp_path: Path) -> LocalImageStore:
    return LocalImageStore(tmp_path / "data" / "images")


@pytest.fixture
def worker(pool: asyncpg.Pool, store: LocalImageStore) -> TestWorker:
    return TestWorker(pool, store)


class BotProcess:
    """`python -m cli bot` as a real process, its log lines collected."""

    def __init__(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cli", "bot"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def stop(self, timeout: float = 20) -> tuple[int, str]:
        """SIGTERM, then wait: (exit code, everything it logged)."""
        if self.process.poll() is None:
            self.process.terminate()
        return self.stop_when_exited(timeout)

    def stop_when_exited(self, timeout: float = 60) -> tuple[int, str]:
        """Wait for the process to exit by itself: (exit code, everything it logged)."""
        output, _ = self.process.communicate(timeout=timeout)
        return self.process.returncode, output


@pytest.fixture
def bot_processes() -> Iterator[list[BotProcess]]:
    """Bot processes a test starts are killed when it ends, whatever happened."""
    processes: list[BotProcess] = []
    yield processes
    for p in processes:
        if p.process.poll() is None:
            p.process.kill()
            p.process.wait()


async def dream(
    fake: FakeDiscord,
    user: FakeUser,
    prompt: str,
    **options: Any,
) -> tuple[Any, dict[str, Any]]:
    """`user` runs /dream; returns the interaction and its queued message once registered."""
    interaction = await fake.slash(
        user, "dream", {"prompt": prompt, **options}, channel_id=CHANNEL_ID
    )
    await interaction.wait_response()
    message = await fake.wait_for(
        lambda: (
            interaction.original_message_id
            and "Queued"
            in fake.messages.get(interaction.original_message_id, {}).get("content", "")
            and fake.messages[interaction.original_message_id]
        )
    )
    return interaction, message


async def wait_buttons(fake: FakeDiscord, message_id: int, count: int | None = None) -> list[dict]:
    """The message's buttons once it has some (or exactly `count`)."""
    return await fake.wait_for(
        lambda: (
            (found := buttons(fake.messages.get(message_id, {})))
            and (count is None or len(found) == count)
            and found
        )
    )


async def wait_db(
    pool: asyncpg.Pool, sql: str, expected: Any, *args: Any, within: float = 10
) -> None:
    """Poll until `sql` returns `expected` (the bot writes after it answers Discord)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while (value := await pool.fetchval(sql, *args)) != expected:
        assert loop.time() < deadline, f"{sql!r} returned {value!r}, not {expected!r}"
        await asyncio.sleep(0.02)


async def eventually(check: Callable[[], Any], within: float = 10) -> Any:
    """Poll `check()` until truthy (for effects the fake server does not see)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not (value := check()):
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)
    return value
