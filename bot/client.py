"""The bot: one `AutoShardedBot` subclass that everything hangs off (pool, settings, store).

Start-up (`setup_hook`, after login and before the gateway): log the invite URL (and warn
when the application is public: anyone could add the bot to their server), open the
database pool, load the cogs (one failing is logged and the rest go on; each registers its
own persistent buttons), start LISTENing for round, job, model-registry and message-deletion
notifications, start heartbeating (`services`: whether the gateway is connected, read by
`hps health bot`), and sync the slash commands.

Pointing the unmodified discord.py client elsewhere (an API proxy, or the tests' local
server): `discord.api_base_url` replaces `discord.http.Route.BASE`, through which every REST
call goes (webhooks and interaction callbacks included), and `discord.gateway_url` replaces
both the URL that `GET /gateway/bot` returns (what an `AutoShardedBot` without a shard count
connects to) and `DiscordWebSocket.DEFAULT_GATEWAY` (used with a fixed shard count and after
an invalidated session). A resumed session goes wherever READY's `resume_gateway_url` says.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from typing import Any

import aiohttp
import asyncpg
import discord
import yarl
from discord import app_commands
from discord.ext import commands
from discord.gateway import DiscordWebSocket
from discord.http import Route

from bot import buttons, committed, formats, replies
from bot.admission import Admission
from bot.invite import invite_url
from db import services
from db.connect import UNAVAILABLE, create_pool, database_url
from db.jobs import JOB_DONE_CHANNEL
from db.listen import NotificationListener
from db.messages import MESSAGES_CHANNEL
from db.models import MODELS_CHANNEL
from db.rounds import ROUNDS_CHANNEL
from hps.settings import DiscordSettings, Settings
from hps.storage import storage
from hps.store import ImageStore

log = logging.getLogger(__name__)

INITIAL_EXTENSIONS = ("bot.cogs.dream", "bot.cogs.maintainers", "bot.cogs.community")

_DISCORD_API = Route.BASE
_DISCORD_GATEWAY = DiscordWebSocket.DEFAULT_GATEWAY

# The bot has no voice features: no warnings at start about voice libraries it lacks.
discord.VoiceClient.warn_nacl = False
discord.VoiceClient.warn_dave = False


def configure_endpoints(config: DiscordSettings) -> None:
    """Point discord.py's REST and gateway URLs at the configured ones (or back at Discord)."""
    Route.BASE = (config.api_base_url or _DISCORD_API).rstrip("/")
    DiscordWebSocket.DEFAULT_GATEWAY = (
        yarl.URL(config.gateway_url) if config.gateway_url else _DISCORD_GATEWAY
    )


class HPSBot(commands.AutoShardedBot):
    pool: asyncpg.Pool
    settings: Settings
    store: ImageStore
    listener: NotificationListener | None
    failed_extensions: list[str]
    heartbeat_task: asyncio.Task[None] | None
    admission: Admission  # the bound on clicks in flight (the click guard, bot.replies)

    def __init__(
        self, settings: Settings, *, extensions: tuple[str, ...] = INITIAL_EXTENSIONS
    ) -> None:
        configure_endpoints(settings.discord)
        intents = discord.Intents.none()
        intents.guilds = True  # channels and roles (the maintainer check); no message content
        super().__init__(
            command_prefix=commands.when_mentioned,
            help_command=None,
            intents=intents,
            shard_count=settings.discord.shard_count,
            chunk_guilds_at_startup=False,
            member_cache_flags=discord.MemberCacheFlags.none(),
            max_messages=None,  # nothing reads the message cache
            guild_ready_timeout=settings.bot.guild_ready_timeout,
            allowed_mentions=discord.AllowedMentions(everyone=False, roles=False, users=True),
            # Bounded: a burst of clicks queues its answers on these connections instead of
            # opening (and handshaking) one per answer (discord.py's default is unbounded).
            connector=aiohttp.TCPConnector(limit=settings.bot.http_connections),
        )
        self.settings = settings
        self.store = storage(settings).images
        self.listener = None
        self.heartbeat_task = None
        self.failed_extensions = []
        self.admission = Admission(settings.bot.clicks_in_flight)
        self._extensions_to_load = extensions
        self.tree.on_error = self.on_app_command_error
        if settings.discord.gateway_url:
            self._override_bot_gateway(settings.discord.gateway_url)

    def _override_bot_gateway(self, url: str) -> None:
        original = self.http.get_bot_gateway

        async def get_bot_gateway() -> tuple[int, str, Any]:
            shards, _, limits = await original()
            return shards, url, limits

        self.http.get_bot_gateway = get_bot_gateway  # type: ignore[method-assign]

    async def setup_hook(self) -> None:
        # An object store with bad credentials or no bucket: one line at start, not a
        # failure at the first round.
        await storage(self.settings).check_async()
        self._log_invite()
        # The embedded server (no database_url) is started by a blocking call.
        url = await asyncio.to_thread(database_url, self.settings)
        # Every bot query is a plain statement or a transaction: no session state to reset.
        self.pool = await create_pool(
            url, min_size=2, max_size=self.settings.bot.pool_size, reset_session=False
        )
        for extension in self._extensions_to_load:
            try:
                await self.load_extension(extension)
            except Exception:
                log.exception("failed to load %s; the other features go on", extension)
                self.failed_extensions.append(extension)
        if not self.settings.discord.maintainer_role_ids:
            log.warning(
                "no maintainer roles configured (discord.maintainer_role_ids): "
                "maintainer commands refuse everyone"
            )
        self.listener = NotificationListener(
            url,
            [ROUNDS_CHANNEL, JOB_DONE_CHANNEL, MODELS_CHANNEL, MESSAGES_CHANNEL],
            self._on_notification,
            on_connect=self._on_listening,
        )
        self.listener.start()
        self.heartbeat_task = asyncio.create_task(self._heartbeat())
        if self.settings.bot.sync_commands:
            await self.sync_commands()

    def _log_invite(self) -> None:
        """The URL that adds this bot to a server, with the permissions it needs."""
        if self.application_id is None:
            return
        log.info("invite the bot to a server: %s", invite_url(self.application_id))
        # Login read the application's settings just before this hook.
        if self.application is not None and self.application.bot_public:
            log.warning(
                "the application is public: anyone can add this bot to their server; turn "
                "Public Bot off under Bot in the Discord Developer Portal"
            )

    def gateway_connected(self) -> bool:
        """Whether every shard of this process is connected to the gateway."""
        shards = self.shards
        return (
            bool(shards)
            and not self.is_closed()
            and all(not s.is_closed() for s in shards.values())
        )

    async def _heartbeat(self) -> None:
        """Write this process's liveness row every `health.heartbeat_seconds`."""
        while True:
            state = {
                "gateway": self.gateway_connected(),
                "guilds": len(self.guilds),
                "shards": sorted(self.shards),
            }
            try:
                await services.heartbeat(self.pool, "bot", state)
            except Exception as exc:  # the next beat tries again; `hps health` sees the gap
                log.warning("bot heartbeat failed: %s", exc)
            await asyncio.sleep(self.settings.health.heartbeat_seconds)

    async def sync_commands(self) -> None:
        """Register the slash commands: per configured guild (at once), else globally (Discord
        takes up to an hour to show global changes)."""
        try:
            if self.settings.discord.guild_ids:
                for guild_id in self.settings.discord.guild_ids:
                    guild = discord.Object(guild_id)
                    self.tree.copy_global_to(guild=guild)
                    synced = await self.tree.sync(guild=guild)
                    log.info("synced %d commands to guild %s", len(synced), guild_id)
            else:
                synced = await self.tree.sync()
                log.info("synced %d global commands", len(synced))
        except discord.HTTPException:
            log.exception("syncing the commands failed; the known ones keep working")

    async def on_ready(self) -> None:
        log.info("ready: %d guild(s)", len(self.guilds))

    def _on_notification(self, channel: str, payload: str) -> None:
        data = json.loads(payload) if payload else {}
        if channel == ROUNDS_CHANNEL:
            self.dispatch("hps_round", int(data["round_id"]), data["status"])
        elif channel == JOB_DONE_CHANNEL:
            self.dispatch("hps_job_done", int(data["id"]), data["kind"], data["state"])
        elif channel == MODELS_CHANNEL:
            self.dispatch("hps_model_event", data)
        elif channel == MESSAGES_CHANNEL:
            self.dispatch("hps_messages")

    async def _on_listening(self) -> None:
        # Notifications sent while nobody listened are gone: cogs look at the tables instead.
        self.dispatch("hps_listening")

    async def on_interaction(self, interaction: discord.Interaction) -> None:
        # A click on a button whose cog did not load gets an answer, not "interaction failed".
        custom_id = (interaction.data or {}).get("custom_id", "")
        if interaction.type is discord.InteractionType.component and buttons.unhandled(
            self, custom_id
        ):
            await replies.unavailable(interaction)

    def handles_guild(self, guild_id: int | None) -> bool:
        """Whether this process runs the shard of `guild_id` (several processes may split
        the shards; each shows only its own guilds' rounds)."""
        if guild_id is None or self.shard_ids is None or not self.shard_count:
            return True
        return (guild_id >> 22) % self.shard_count in self.shard_ids

    async def on_app_command_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        if isinstance(error, app_commands.CommandInvokeError) and replies.too_late(error.original):
            log.warning("/%s was answered too late (after Discord's 3 s)", _name(interaction))
            return
        if isinstance(error, app_commands.CommandOnCooldown):
            message = f"Slow down: try again in {formats.duration(error.retry_after)}."
        elif isinstance(error, app_commands.CheckFailure):
            message = str(error) or "You may not use this command here."
        elif isinstance(error, app_commands.CommandInvokeError) and isinstance(
            error.original, UNAVAILABLE
        ):
            log.warning("database unavailable during /%s: %s", _name(interaction), error.original)
            message = committed.failure_reply(interaction, database_down=True)
        else:
            log.error("/%s failed", _name(interaction), exc_info=error)
            message = committed.failure_reply(interaction)
        if isinstance(error, app_commands.CheckFailure):
            log.info(
                "refused /%s: %s",
                _name(interaction),
                message,
                extra={"user_id": interaction.user.id},
            )
        await replies.reply(interaction, message)

    async def close(self) -> None:
        if self.listener is not None:
            await self.listener.stop()
            self.listener = None
        if self.heartbeat_task is not None:
            self.heartbeat_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.heartbeat_task
            self.heartbeat_task = None
            with contextlib.suppress(*UNAVAILABLE, asyncpg.InterfaceError):
                await services.stopped(self.pool, "bot")
        await super().close()
        await self.admission.close()
        if hasattr(self, "pool"):
            await self.pool.close()


def _name(interaction: discord.Interaction) -> str:
    return interaction.command.qualified_name if interaction.command else "?"


async def run(settings: Settings) -> None:
    """Run the bot until SIGINT or SIGTERM, then shut down cleanly."""
    assert settings.discord.token is not None
    bot = HPSBot(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with bot:
        running = asyncio.create_task(bot.start(settings.discord.token.get_secret_value()))
        stopping = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if stopping in done:
            log.info("stopping the bot")
            await bot.close()
        else:
            stopping.cancel()
        await running  # re-raises what stopped the bot, if it stopped by itself
    log.info("bot stopped")
