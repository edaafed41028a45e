"""A local Discord-compatible server: the REST routes and the gateway the bot uses, on
loopback, for end-to-end tests, the ingest benchmark and `hps demo`.

The unmodified discord.py client is pointed at it by the bot's settings
(`discord.api_base_url` = `FakeDiscord.api_base_url`, `discord.gateway_url` =
`FakeDiscord.gateway_url`; `GET /gateway/bot` returns the gateway URL too). The wire format
follows discord.py 2.7 and Discord's API v10:

- REST: `GET /users/@me`, `GET /oauth2/applications/@me`, `GET /gateway/bot`, command sync
  (`PUT /applications/{app}/commands` and `.../guilds/{guild}/commands`), interaction
  callbacks (`POST /interactions/{id}/{token}/callback`, JSON or multipart with files; types
  4, 5, 6, 7; ephemeral flag 64), follow-ups (`POST /webhooks/{app}/{token}`: right after a
  deferred reply Discord edits the "thinking" message instead, and so does this server), the
  original response (`GET|PATCH|DELETE /webhooks/{app}/{token}/messages/@original` or by id),
  channel messages (`POST /channels/{id}/messages`, `GET|PATCH|DELETE .../messages/{id}`).
  As Discord, it refuses a first callback more than 3 s after the interaction was sent
  (10062 Unknown interaction): a reply that needs longer must defer first.
  Replies are JSON with `Content-Type: application/json` exactly (discord.py parses nothing
  else). Interaction tokens can be expired (`expire_tokens`): webhooks then answer 401.
- CDN: `GET /cdn/attachments/{id}/{name}` serves files tests upload and files the bot sent.
- Gateway (`/gateway`, plain-text JSON frames; the client's zlib-stream is optional): HELLO,
  heartbeats and ACKs, IDENTIFY → READY (`resume_gateway_url` on loopback, `shard`) and one
  GUILD_CREATE per guild, RESUME (missed events replayed, then RESUMED), RECONNECT on request,
  and dispatch.

Tests act as users with `slash` (an application command with options; attachments are
served by the CDN route and resolved in the payload) and `click` (a button on a message),
and read what the bot sent in `requests`, `messages` and each `FakeInteraction`.
"""

from __future__ import annotations

import asyncio
import json
import mimetypes
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import WSMsgType, web

DISCORD_EPOCH_MS = 1420070400000
EPHEMERAL = 1 << 6
LOADING = 1 << 7
MANAGE_GUILD = 1 << 5
# Interaction callback types.
CHANNEL_MESSAGE, DEFERRED_MESSAGE, DEFERRED_UPDATE, UPDATE_MESSAGE = 4, 5, 6, 7
# Discord's deadline for an interaction's first response.
RESPONSE_DEADLINE = 3.0


def _iso() -> str:
    return datetime.now(UTC).isoformat()


class Snowflakes:
    """Increasing Discord-style ids (milliseconds since Discord's epoch, shifted)."""

    def __init__(self) -> None:
        self._last = 0

    def __call__(self) -> int:
        now = (int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22
        self._last = max(self._last + 1, now)
        return self._last


@dataclass
class FakeUser:
    id: int
    name: str
    roles: list[int] = field(default_factory=list)
    permissions: int = 0  # in the channel, as Discord resolves them (interaction.permissions)
    bot: bool = False

    def user_payload(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "username": self.name,
            "global_name": self.name,
            "discriminator": "0",
            "avatar": None,
            "bot": self.bot,
        }

    def member_payload(self, *, with_user: bool = True) -> dict[str, Any]:
        member: dict[str, Any] = {
            "roles": [str(r) for r in self.roles],
            "joined_at": _iso(),
            "deaf": False,
            "mute": False,
            "flags": 0,
            "pending": False,
            "nick": None,
            "avatar": None,
            "permissions": str(self.permissions),
        }
        if with_user:
            member["user"] = self.user_payload()
        return member


@dataclass
class FakeAttachment:
    """A file a test user attaches to a command."""

    id: int
    filename: str
    content_type: str | None
    data: bytes
    url: str

    def payload(self) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "id": str(self.id),
            "filename": self.filename,
            "size": len(self.data),
            "url": self.url,
            "proxy_url": self.url,
        }
        if self.content_type is not None:
            payload["content_type"] = self.content_type
        return payload


@dataclass
class SentFile:
    filename: str
    data: bytes


@dataclass
class Request:
    """One REST call the bot made."""

    method: str
    path: str  # below the API base, e.g. /channels/1/messages
    query: dict[str, str]
    json: Any
    files: list[SentFile]


@dataclass
class FakeInteraction:
    """An interaction a test started, and everything the bot answered to it."""

    id: int
    token: str
    type: int
    user: FakeUser
    channel_id: int
    payload: dict[str, Any]
    component_message_id: int | None = None
    dispatched_at: float = 0.0
    responded_at: float | None = None
    response: dict[str, Any] | None = None  # the callback body: {"type", "data"}
    original_message_id: int | None = None
    followup_ids: list[int] = field(default_factory=list)
    expired: bool = False
    late: bool = False  # a first response came after Discord's deadline, and was refused
    responded: asyncio.Event = field(default_factory=asyncio.Event)
    server: FakeDiscord | None = field(default=None, repr=False)

    @property
    def response_type(self) -> int | None:
        return self.response["type"] if self.response else None

    @property
    def response_data(self) -> dict[str, Any]:
        return (self.response or {}).get("data") or {}

    @property
    def ephemeral(self) -> bool:
        return bool(self.response_data.get("flags", 0) & EPHEMERAL)

    async def wait_response(self, within: float = 10.0) -> dict[str, Any]:
        await asyncio.wait_for(self.responded.wait(), within)
        assert self.response is not None
        return self.response

    async def followup(self, within: float = 10.0) -> dict[str, Any]:
        """The latest follow-up message the bot sent to this interaction (how a deferred
        button click answers privately)."""
        await self.wait_response(within)
        assert self.server is not None
        messages = self.server.messages
        return await self.server.wait_for(
            lambda: self.followup_ids and messages.get(self.followup_ids[-1]), within
        )

    async def answer(self, within: float = 10.0) -> dict[str, Any]:
        """The reply as the user finally sees it: the message the response made, once a
        deferred one ("… is thinking") has been replaced by its content."""
        await self.wait_response(within)
        assert self.server is not None
        messages = self.server.messages
        return await self.server.wait_for(
            lambda: (
                (m := messages.get(self.original_message_id or 0))
                and not m["flags"] & LOADING
                and m
            ),
            within,
        )


@dataclass
class GatewaySession:
    id: str
    shard: list[int]
    seq: int = 0
    sent: list[dict[str, Any]] = field(default_factory=list)  # dispatches, for RESUME
    ws: web.WebSocketResponse | None = None


@dataclass
class FakeGuild:
    id: int
    name: str
    channel_ids: list[int]
    role_ids: list[int] = field(default_factory=list)


class FakeDiscord:
    """The server. `await start()`, point the bot at `api_base_url` / `gateway_url`."""

    def __init__(
        self,
        *,
        token: str = "test-token",
        guilds: list[FakeGuild] | None = None,
        heartbeat_interval_ms: int = 41250,
    ) -> None:
        self.token = token
        self.snowflake = Snowflakes()
        self.application_id = self.snowflake()
        self.bot_user = FakeUser(self.application_id, "hps-bot", bot=True)
        self.guilds = guilds or [
            FakeGuild(self.snowflake(), "HPS test guild", [self.snowflake(), self.snowflake()])
        ]
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.bot_public = False  # the Developer Portal's Public Bot switch
        # Channels whose messages' requests fail: channel id -> (status, Discord's error code,
        # message), e.g. (403, 50001, "Missing Access") once the bot lost access to it, or
        # (503, 0, "Service Unavailable") for an outage.
        self.refusing: dict[int, tuple[int, int, str]] = {}

        self.requests: list[Request] = []
        self.unhandled: list[str] = []
        self.messages: dict[int, dict[str, Any]] = {}
        self.interactions: dict[int, FakeInteraction] = {}
        self._by_token: dict[str, FakeInteraction] = {}
        self.commands: dict[int | None, dict[str, dict[str, Any]]] = {}
        self.cdn: dict[int, tuple[str, str, bytes]] = {}  # attachment id → (name, type, data)
        self._dm_channels: dict[int, int] = {}  # user id → their DM channel with the bot
        self.sessions: dict[str, GatewaySession] = {}
        self.session: GatewaySession | None = None  # the one dispatches go to
        self.identifies = 0
        self.resumes = 0
        self.heartbeats = 0
        self.callbacks = 0  # interaction callbacks answered so far
        self.response_deadline = RESPONSE_DEADLINE  # seconds: a test may shorten it

        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_route("*", "/api/v10/{path:.*}", self._rest)
        app.router.add_get("/gateway", self._gateway)
        app.router.add_get("/cdn/attachments/{id}/{name}", self._cdn)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        for session in self.sessions.values():
            if session.ws is not None and not session.ws.closed:
                await session.ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def api_base_url(self) -> str:
        return f"{self.base_url}/api/v10"

    @property
    def gateway_url(self) -> str:
        return self.base_url.replace("http://", "ws://") + "/gateway"

    @property
    def guild(self) -> FakeGuild:
        return self.guilds[0]

    @property
    def channel_id(self) -> int:
        return self.guild.channel_ids[0]

    # -- waiting ---------------------------------------------------------------------------

    async def _touch(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[], Any], within: float = 10.0) -> Any:
        """Wait until `predicate()` is truthy (re-checked whenever the bot did something)."""

        async def waiting() -> Any:
            async with self._changed:
                while not (value := predicate()):
                    await self._changed.wait()
                return value

        return await asyncio.wait_for(waiting(), within)

    async def wait_connected(self, within: float = 10.0) -> None:
        await self.wait_for(
            lambda: self.session is not None and self.session.ws is not None, within
        )

    # -- what the bot sent -----------------------------------------------------------------

    def calls(self, method: str, path_prefix: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and r.path.startswith(path_prefix)]

    def channel_messages(self, channel_id: int | None = None) -> list[dict[str, Any]]:
        """Messages everyone sees in a channel (not ephemeral, not deleted), oldest first."""
        channel = str(channel_id or self.channel_id)
        return [
            m
            for _, m in sorted(self.messages.items())
            if m["channel_id"] == channel and not m["flags"] & EPHEMERAL
        ]

    def attachment_data(self, attachment: dict[str, Any]) -> bytes:
        return self.cdn[int(attachment["id"])][2]

    # -- acting as users -------------------------------------------------------------------

    def upload(self, filename: str, data: bytes, content_type: str | None) -> FakeAttachment:
        """A file a user attaches to a command, served by the CDN route."""
        attachment_id = self.snowflake()
        self.cdn[attachment_id] = (filename, content_type or "application/octet-stream", data)
        url = f"{self.base_url}/cdn/attachments/{attachment_id}/{filename}"
        return FakeAttachment(attachment_id, filename, content_type, data, url)

    async def slash(
        self,
        user: FakeUser,
        name: str,
        options: dict[str, Any] | None = None,
        *,
        channel_id: int | None = None,
        dm: bool = False,
    ) -> FakeInteraction:
        """`user` runs `/name` with `options` (str, int, float, bool, FakeUser, FakeAttachment),
        in a server's channel, or with `dm` in their direct messages with the bot."""
        resolved: dict[str, dict[str, Any]] = {}
        opts = []
        for key, value in (options or {}).items():
            if isinstance(value, bool):
                opts.append({"name": key, "type": 5, "value": value})
            elif isinstance(value, int):
                opts.append({"name": key, "type": 4, "value": value})
            elif isinstance(value, float):
                opts.append({"name": key, "type": 10, "value": value})
            elif isinstance(value, str):
                opts.append({"name": key, "type": 3, "value": value})
            elif isinstance(value, FakeUser):
                opts.append({"name": key, "type": 6, "value": str(value.id)})
                resolved.setdefault("users", {})[str(value.id)] = value.user_payload()
                members = resolved.setdefault("members", {})
                members[str(value.id)] = value.member_payload(with_user=False)
            elif isinstance(value, FakeAttachment):
                opts.append({"name": key, "type": 11, "value": str(value.id)})
                resolved.setdefault("attachments", {})[str(value.id)] = value.payload()
            else:
                raise TypeError(f"option {key}: unsupported value {value!r}")
        guild_id = self.guild.id
        command = self.commands.get(guild_id, {}).get(name) or self.commands.get(None, {}).get(name)
        data: dict[str, Any] = {
            "id": command["id"] if command else str(self.snowflake()),
            "name": name,
            "type": 1,
            "options": opts,
        }
        if resolved:
            data["resolved"] = resolved
        if name in self.commands.get(guild_id, {}) and not dm:
            data["guild_id"] = str(guild_id)
        if dm:
            return await self._interact(2, user, self.dm_channel(user), data, dm=True)
        return await self._interact(2, user, channel_id or self.channel_id, data)

    def dm_channel(self, user: FakeUser) -> int:
        """The id of `user`'s direct-message channel with the bot."""
        return self._dm_channels.setdefault(user.id, self.snowflake())

    async def click(self, user: FakeUser, message_id: int, custom_id: str) -> FakeInteraction:
        """`user` clicks the button `custom_id` on a message."""
        message = self.messages[message_id]
        buttons = [c for row in message["components"] for c in row.get("components", [])]
        assert any(b.get("custom_id") == custom_id for b in buttons), f"no button {custom_id}"
        data = {"custom_id": custom_id, "component_type": 2}
        return await self._interact(3, user, int(message["channel_id"]), data, message=message)

    async def _interact(
        self,
        type_: int,
        user: FakeUser,
        channel_id: int,
        data: dict[str, Any],
        *,
        message: dict[str, Any] | None = None,
        dm: bool = False,
    ) -> FakeInteraction:
        interaction_id = self.snowflake()
        token = "aW50ZXJhY3Rpb24" + secrets.token_urlsafe(24)
        guild = self.guild
        payload: dict[str, Any] = {
            "id": str(interaction_id),
            "application_id": str(self.application_id),
            "type": type_,
            "data": data,
            "guild_id": str(guild.id),
            "channel_id": str(channel_id),
            "channel": {"id": str(channel_id), "type": 0, "guild_id": str(guild.id)},
            "member": user.member_payload(),
            "token": token,
            "version": 1,
            "locale": "en-US",
            "guild_locale": "en-US",
            "app_permissions": str((1 << 53) - 1),
            "entitlements": [],
            "authorizing_integration_owners": {"0": str(guild.id)},
            "context": 0,
            "attachment_size_limit": 25 * 2**20,
        }
        if dm:  # no server: the user as such, the DM channel, the bot-DM context
            for key in ("guild_id", "member", "guild_locale"):
                del payload[key]
            payload["user"] = user.user_payload()
            payload["channel"] = {"id": str(channel_id), "type": 1}
            payload["context"] = 1
            payload["authorizing_integration_owners"] = {"0": str(user.id)}
        if message is not None:
            payload["message"] = message
        interaction = FakeInteraction(
            interaction_id,
            token,
            type_,
            user,
            channel_id,
            payload,
            component_message_id=int(message["id"]) if message else None,
            server=self,
        )
        self.interactions[interaction_id] = interaction
        self._by_token[token] = interaction
        interaction.dispatched_at = time.perf_counter()
        await self.dispatch("INTERACTION_CREATE", payload)
        return interaction

    def expire_tokens(self) -> None:
        """Every interaction so far is older than 15 minutes: its token no longer works."""
        for interaction in self.interactions.values():
            interaction.expired = True

    # -- gateway ---------------------------------------------------------------------------

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        """Send an event to the current session (kept for RESUME if it is disconnected)."""
        session = self.session
        assert session is not None, "no bot has identified"
        await self._send_dispatch(session, event, data)

    async def _send_dispatch(self, session: GatewaySession, event: str, data: Any) -> None:
        session.seq += 1
        frame = {"op": 0, "t": event, "s": session.seq, "d": data}
        session.sent.append(frame)
        if session.ws is not None and not session.ws.closed:
            await session.ws.send_str(json.dumps(frame))

    async def request_reconnect(self) -> None:
        """Op 7: the client closes and RESUMEs on `resume_gateway_url`."""
        assert self.session is not None and self.session.ws is not None
        await self.session.ws.send_str(json.dumps({"op": 7, "d": None}))

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        hello = {"op": 10, "d": {"heartbeat_interval": self.heartbeat_interval_ms}}
        await ws.send_str(json.dumps(hello))
        session: GatewaySession | None = None
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            frame = json.loads(msg.data)
            op, d = frame.get("op"), frame.get("d")
            if op == 1:  # heartbeat
                self.heartbeats += 1
                await ws.send_str(json.dumps({"op": 11}))
            elif op == 2:  # identify
                if d.get("token") != self.token:
                    await ws.close(code=4004, message=b"Authentication failed.")
                    break
                session = GatewaySession(secrets.token_hex(16), d.get("shard") or [0, 1])
                session.ws = ws
                self.sessions[session.id] = session
                self.session = session
                self.identifies += 1
                await self._ready(session)
            elif op == 6:  # resume
                session = self.sessions.get(d.get("session_id"))
                if session is None or d.get("token") != self.token:
                    await ws.send_str(json.dumps({"op": 9, "d": False}))
                    continue
                session.ws = ws
                self.session = session
                self.resumes += 1
                for frame in session.sent:
                    if frame["s"] > (d.get("seq") or 0):
                        await ws.send_str(json.dumps(frame))
                await self._send_dispatch(session, "RESUMED", {})
            await self._touch()
        if session is not None and session.ws is ws:
            session.ws = None
        await self._touch()
        return ws

    async def _ready(self, session: GatewaySession) -> None:
        ready = {
            "v": 10,
            "user": {**self.bot_user.user_payload(), "verified": True, "mfa_enabled": False},
            "guilds": [{"id": str(g.id), "unavailable": True} for g in self.guilds],
            "session_id": session.id,
            "resume_gateway_url": self.gateway_url,
            "shard": session.shard,
            "application": {"id": str(self.application_id), "flags": 0},
            "private_channels": [],
            "relationships": [],
            "user_settings": {},
        }
        await self._send_dispatch(session, "READY", ready)
        for guild in self.guilds:
            await self._send_dispatch(session, "GUILD_CREATE", self._guild_payload(guild))

    def _guild_payload(self, guild: FakeGuild) -> dict[str, Any]:
        everyone = {"id": str(guild.id), "name": "@everyone", "permissions": "0", "position": 0}
        roles = [everyone] + [
            {"id": str(r), "name": f"role-{r}", "permissions": "0", "position": i + 1}
            for i, r in enumerate(guild.role_ids)
        ]
        for role in roles:
            role.update(color=0, hoist=False, managed=False, mentionable=False, flags=0)
        channels = [
            {
                "id": str(c),
                "type": 0,
                "name": f"channel-{i}",
                "position": i,
                "guild_id": str(guild.id),
                "permission_overwrites": [],
                "nsfw": False,
            }
            for i, c in enumerate(guild.channel_ids)
        ]
        return {
            "id": str(guild.id),
            "name": guild.name,
            "icon": None,
            "owner_id": str(self.snowflake()),
            "roles": roles,
            "channels": channels,
            "threads": [],
            "members": [self.bot_user.member_payload()],
            "member_count": 2,
            "large": False,
            "unavailable": False,
            "joined_at": _iso(),
            "features": [],
            "emojis": [],
            "stickers": [],
            "presences": [],
            "voice_states": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
            "premium_tier": 0,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "nsfw_level": 0,
            "system_channel_flags": 0,
            "preferred_locale": "en-US",
            "afk_timeout": 300,
        }

    # -- REST ------------------------------------------------------------------------------

    async def _cdn(self, request: web.Request) -> web.Response:
        found = self.cdn.get(int(request.match_info["id"]))
        if found is None:
            return web.Response(status=404)
        _, content_type, data = found
        return web.Response(body=data, headers={"Content-Type": content_type})

    async def _rest(self, request: web.Request) -> web.Response:
        path = "/" + request.match_info["path"]
        payload, files = await self._body(request)
        self.requests.append(Request(request.method, path, dict(request.query), payload, files))
        try:
            return await self._route(request, path, payload, files)
        finally:
            await self._touch()

    async def _body(self, request: web.Request) -> tuple[Any, list[SentFile]]:
        if request.content_type.startswith("multipart/"):
            payload, files = None, []
            reader = await request.multipart()
            async for part in reader:
                if part.name == "payload_json":
                    payload = json.loads(await part.text())
                else:
                    files.append(SentFile(part.filename or "file", bytes(await part.read())))
            return payload, files
        if request.can_read_body:
            text = await request.text()
            return (json.loads(text) if text else None), []
        return None, []

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bot {self.token}"

    async def _route(
        self, request: web.Request, path: str, payload: Any, files: list[SentFile]
    ) -> web.Response:
        method = request.method
        parts = path.strip("/").split("/")
        if parts[0] == "interactions" and method == "POST":
            return self._callback(int(parts[1]), parts[2], payload, files)
        if parts[0] == "webhooks":
            return self._webhook(method, parts[1:], payload, files)
        if not self._authorized(request):
            return _json({"message": "401: Unauthorized", "code": 0}, 401)
        if path == "/users/@me":
            return _json({**self.bot_user.user_payload(), "verified": True, "flags": 0})
        if path == "/oauth2/applications/@me":
            return _json(self._application())
        if path == "/gateway/bot":
            limit = {"total": 1000, "remaining": 999, "reset_after": 0, "max_concurrency": 1}
            return _json({"url": self.gateway_url, "shards": 1, "session_start_limit": limit})
        if parts[0] == "applications" and parts[-1] == "commands" and method == "PUT":
            guild_id = int(parts[3]) if len(parts) == 5 else None
            return self._sync(guild_id, payload)
        if parts[0] == "channels" and len(parts) >= 3 and parts[2] == "messages":
            return self._channel_message(method, int(parts[1]), parts[3:], payload, files)
        self.unhandled.append(f"{method} {path}")
        return _json({"message": "404: Not Found", "code": 0}, 404)

    def _application(self) -> dict[str, Any]:
        return {
            "id": str(self.application_id),
            "name": "HPS",
            "description": "",
            "icon": None,
            "bot_public": self.bot_public,
            "bot_require_code_grant": False,
            "owner": FakeUser(self.snowflake(), "owner").user_payload(),
            "verify_key": "0" * 64,
            "flags": 0,
        }

    def _sync(self, guild_id: int | None, payload: list[dict[str, Any]]) -> web.Response:
        synced = {}
        for command in payload:
            registered = {
                **command,
                "id": str(self.snowflake()),
                "application_id": str(self.application_id),
                "version": str(self.snowflake()),
            }
            if guild_id is not None:
                registered["guild_id"] = str(guild_id)
            synced[command["name"]] = registered
        self.commands[guild_id] = synced
        return _json(list(synced.values()))

    # -- interactions and webhooks ---------------------------------------------------------

    def _callback(
        self, interaction_id: int, token: str, body: dict[str, Any], files: list[SentFile]
    ) -> web.Response:
        interaction = self.interactions.get(interaction_id)
        if interaction is None or interaction.token != token or interaction.expired:
            return _json({"message": "Unknown interaction", "code": 10062}, 404)
        if interaction.response is not None:
            acknowledged = {"message": "Interaction has already been acknowledged.", "code": 40060}
            return _json(acknowledged, 400)
        if time.perf_counter() - interaction.dispatched_at > self.response_deadline:
            interaction.late = True
            return _json({"message": "Unknown interaction", "code": 10062}, 404)
        kind, data = body["type"], body.get("data") or {}
        flags = int(data.get("flags") or 0)
        if kind == CHANNEL_MESSAGE:
            message = self._create(interaction.channel_id, data, files, interaction)
        elif kind == DEFERRED_MESSAGE:
            loading = {"content": "", "flags": flags | LOADING}
            message = self._create(interaction.channel_id, loading, [], interaction)
        elif kind in (DEFERRED_UPDATE, UPDATE_MESSAGE) and interaction.component_message_id:
            message = self.messages[interaction.component_message_id]
            if kind == UPDATE_MESSAGE:
                message = self._edit(message, data, files)
        else:
            return _json({"message": f"Invalid callback type {kind}", "code": 50035}, 400)
        interaction.response = body
        interaction.original_message_id = int(message["id"])
        interaction.responded_at = time.perf_counter()
        interaction.responded.set()
        self.callbacks += 1
        reply = {
            "interaction": {
                "id": str(interaction.id),
                "type": interaction.type,
                "response_message_id": message["id"],
                "response_message_loading": kind == DEFERRED_MESSAGE,
                "response_message_ephemeral": bool(message["flags"] & EPHEMERAL),
            },
            "resource": {"type": kind, "message": message},
        }
        return _json(reply)

    def _webhook(
        self, method: str, parts: list[str], payload: Any, files: list[SentFile]
    ) -> web.Response:
        # parts: [app_id, token] or [app_id, token, "messages", "@original" | id]
        interaction = self._by_token.get(parts[1])
        if interaction is None or interaction.expired or parts[0] != str(self.application_id):
            return _json({"message": "Invalid Webhook Token", "code": 50027}, 401)
        if len(parts) == 2 and method == "POST":
            original = self.messages.get(interaction.original_message_id or 0)
            loading = original is not None and original["flags"] & LOADING
            if loading and not interaction.followup_ids:
                # Discord: the first follow-up after a deferred reply edits the "thinking"
                # message (keeping its ephemeral state) instead of creating one.
                assert original is not None
                data = {**(payload or {}), "flags": original["flags"] & ~LOADING}
                return _json(self._edit(original, data, files))
            message = self._create(interaction.channel_id, payload or {}, files, interaction)
            interaction.followup_ids.append(int(message["id"]))
            return _json(message)
        if len(parts) == 4 and parts[2] == "messages":
            ref = parts[3]
            message_id = interaction.original_message_id if ref == "@original" else int(ref)
            message = self.messages.get(message_id or 0)
            if message is None:
                return _json({"message": "Unknown Message", "code": 10008}, 404)
            if method == "GET":
                return _json(message)
            if method == "PATCH":
                data = dict(payload or {})
                data["flags"] = message["flags"] & ~LOADING
                return _json(self._edit(message, data, files))
            if method == "DELETE":
                del self.messages[int(message["id"])]
                return web.Response(status=204)
        return _json({"message": "405: Method Not Allowed", "code": 0}, 405)

    def _channel_message(
        self, method: str, channel_id: int, rest: list[str], payload: Any, files: list[SentFile]
    ) -> web.Response:
        if not any(channel_id in g.channel_ids for g in self.guilds):
            return _json({"message": "Unknown Channel", "code": 10003}, 404)
        if channel_id in self.refusing:
            status, code, message = self.refusing[channel_id]
            return _json({"message": message, "code": code}, status)
        if not rest and method == "POST":
            return _json(self._create(channel_id, payload or {}, files, None))
        message = self.messages.get(int(rest[0])) if rest else None
        if (
            message is None
            or message["channel_id"] != str(channel_id)
            or message["flags"] & EPHEMERAL  # ephemeral messages are not in the channel
        ):
            return _json({"message": "Unknown Message", "code": 10008}, 404)
        if method == "GET":
            return _json(message)
        if method == "PATCH":
            return _json(self._edit(message, payload or {}, files))
        if method == "DELETE":
            del self.messages[int(message["id"])]
            return web.Response(status=204)
        return _json({"message": "405: Method Not Allowed", "code": 0}, 405)

    # -- messages --------------------------------------------------------------------------

    def _store_file(self, file: SentFile) -> dict[str, Any]:
        attachment_id = self.snowflake()
        content_type = mimetypes.guess_type(file.filename)[0] or "application/octet-stream"
        self.cdn[attachment_id] = (file.filename, content_type, file.data)
        url = f"{self.base_url}/cdn/attachments/{attachment_id}/{file.filename}"
        return {
            "id": str(attachment_id),
            "filename": file.filename,
            "size": len(file.data),
            "url": url,
            "proxy_url": url,
            "content_type": content_type,
        }

    def _attachments(
        self, data: dict[str, Any], files: list[SentFile], existing: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        if "attachments" not in data:
            return existing + [self._store_file(f) for f in files]
        kept = {a["id"]: a for a in existing}
        result = []
        for entry in data["attachments"] or []:
            ref = int(entry["id"])
            if ref < len(files):  # a new file's index in this request
                result.append(self._store_file(files[ref]))
            elif str(ref) in kept:
                result.append(kept[str(ref)])
        return result

    def _create(
        self,
        channel_id: int,
        data: dict[str, Any],
        files: list[SentFile],
        interaction: FakeInteraction | None,
    ) -> dict[str, Any]:
        message_id = self.snowflake()
        guild = next((g for g in self.guilds if channel_id in g.channel_ids), None)
        message: dict[str, Any] = {
            "id": str(message_id),
            "channel_id": str(channel_id),
            "author": self.bot_user.user_payload(),
            "content": data.get("content") or "",
            "timestamp": _iso(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": self._attachments({}, files, []),
            "embeds": data.get("embeds") or [],
            "components": data.get("components") or [],
            "pinned": False,
            "type": 0,
            "flags": int(data.get("flags") or 0),
            "application_id": str(self.application_id),
        }
        if guild is not None:  # else a direct message
            message["guild_id"] = str(guild.id)
        if interaction is not None:
            message["type"] = 20 if interaction.type == 2 else 0
            message["webhook_id"] = str(self.application_id)
            message["interaction_metadata"] = {
                "id": str(interaction.id),
                "type": interaction.type,
                "user": interaction.user.user_payload(),
                "authorizing_integration_owners": {
                    "0": str(guild.id if guild else interaction.user.id)
                },
            }
        self.messages[message_id] = message
        return message

    def _edit(
        self, message: dict[str, Any], data: dict[str, Any], files: list[SentFile]
    ) -> dict[str, Any]:
        if "content" in data:
            message["content"] = data["content"] or ""
        for key in ("embeds", "components"):
            if key in data:
                message[key] = data[key] or []
        if "flags" in data:
            message["flags"] = int(data["flags"] or 0)
        message["attachments"] = self._attachments(data, files, message["attachments"])
        message["edited_timestamp"] = _iso()
        return message


def _json(data: Any, status: int = 200) -> web.Response:
    # Exactly `application/json`: discord.py treats anything else (even with a charset) as text.
    return web.Response(
        body=json.dumps(data).encode(), status=status, headers={"Content-Type": "application/json"}
    )


def button_ids(message: dict[str, Any]) -> list[str]:
    """The custom ids of a message's buttons, in order."""
    return [
        c["custom_id"]
        for row in message.get("components", [])
        for c in row.get("components", [])
        if "custom_id" in c
    ]


def buttons(message: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for row in message.get("components", []) for c in row.get("components", [])]


__all__ = [
    "EPHEMERAL",
    "MANAGE_GUILD",
    "FakeAttachment",
    "FakeDiscord",
    "FakeGuild",
    "FakeInteraction",
    "FakeUser",
    "Request",
    "SentFile",
    "button_ids",
    "buttons",
]
