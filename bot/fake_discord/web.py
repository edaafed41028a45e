"""A web page onto the local Discord-compatible server, for `hps demo`: it shows a server's
channels as Discord would (the bot's messages, their images and buttons, the private
replies of the person acting), and lets that person run the slash commands the bot
registered and click the buttons, as one of the demo's users.

Everything goes through `FakeDiscord` exactly as the tests drive it (`slash`, `click`,
`upload`), so the bot on the other side is the unmodified one. The page is one HTML file
with its script inline; it polls `GET /api/state` and posts to `/api/command` and
`/api/click`. Files (the generated images) are served from the server's CDN store.
"""

from __future__ import annotations

import base64
import binascii
import logging
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from bot.fake_discord.server import EPHEMERAL, LOADING, FakeDiscord, FakeUser, buttons

log = logging.getLogger(__name__)

# Application command option types (Discord's numbers).
STRING, INTEGER, BOOLEAN, USER, NUMBER, ATTACHMENT = 3, 4, 5, 6, 10, 11


@dataclass(frozen=True)
class Channel:
    id: int
    name: str
    topic: str = ""


class DemoPage:
    """The page's web server. `await start(host, port)`; `url` is where it listens."""

    def __init__(
        self,
        server: FakeDiscord,
        users: list[FakeUser],
        channels: list[Channel],
        *,
        title: str,
        notice: str,
    ) -> None:
        self.server = server
        self.users = {u.id: u for u in users}
        self.channels = channels
        self.title = title
        self.notice = notice
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 8000) -> None:
        app = web.Application(client_max_size=32 * 2**20)
        app.router.add_get("/", self._page)
        app.router.add_get("/api/state", self._state)
        app.router.add_post("/api/command", self._command)
        app.router.add_post("/api/click", self._click)
        app.router.add_get("/files/{id}/{name}", self._file)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://{host}:{bound}/"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -- what the page shows ---------------------------------------------------------------

    async def _page(self, _request: web.Request) -> web.Response:
        html = PAGE.replace("__TITLE__", _escape(self.title))
        return web.Response(text=html, content_type="text/html")

    async def _state(self, _request: web.Request) -> web.Response:
        guild = self.server.guild
        registered = {
            **self.server.commands.get(None, {}),
            **self.server.commands.get(guild.id, {}),
        }
        state = {
            "title": self.title,
            "notice": self.notice,
            "users": [
                {"id": str(u.id), "name": u.name, "maintainer": bool(u.roles)}
                for u in self.users.values()
            ],
            "commands": [_command_form(c) for _, c in sorted(registered.items())],
            "channels": [
                {
                    "id": str(c.id),
                    "name": c.name,
                    "topic": c.topic,
                    "messages": self._messages(c.id),
                }
                for c in self.channels
            ],
            "names": {
                **{str(u.id): u.name for u in self.users.values()},
                **{str(c.id): c.name for c in self.channels},
            },
        }
        return web.json_response(state)

    def _messages(self, channel_id: int) -> list[dict[str, Any]]:
        shown = []
        for message_id, m in sorted(self.server.messages.items()):
            if m["channel_id"] != str(channel_id):
                continue
            private_to = None
            if m["flags"] & EPHEMERAL:
                private_to = (m.get("interaction_metadata") or {}).get("user", {}).get("id")
            shown.append(
                {
                    "id": str(message_id),
                    "content": m["content"],
                    "loading": bool(m["flags"] & LOADING),
                    "private_to": private_to,
                    "edited": m["edited_timestamp"] is not None,
                    "timestamp": m["timestamp"],
                    "attachments": [
                        {
                            "url": f"/files/{a['id']}/{a['filename']}",
                            "filename": a["filename"],
                            "image": str(a.get("content_type", "")).startswith("image/"),
                        }
                        for a in m["attachments"]
                    ],
                    "buttons": [
                        {
                            "custom_id": b.get("custom_id"),
                            "label": b.get("label", ""),
                            "style": b.get("style", 2),
                            "disabled": bool(b.get("disabled")),
                        }
                        for b in buttons(m)
                        if "custom_id" in b
                    ],
                }
            )
        return shown

    async def _file(self, request: web.Request) -> web.Response:
        found = self.server.cdn.get(int(request.match_info["id"]))
        if found is None:
            raise web.HTTPNotFound()
        _, content_type, data = found
        return web.Response(body=data, content_type=content_type)

    # -- acting ----------------------------------------------------------------------------

    def _user(self, body: dict[str, Any]) -> FakeUser:
        user = self.users.get(int(body.get("user") or 0))
        if user is None:
            raise web.HTTPBadRequest(text="unknown user")
        return user

    async def _command(self, request: web.Request) -> web.Response:
        body = await request.json()
        user = self._user(body)
        name = str(body.get("name", ""))
        guild = self.server.guild
        command = self.server.commands.get(guild.id, {}).get(name) or self.server.commands.get(
            None, {}
        ).get(name)
        if command is None:
            raise web.HTTPBadRequest(text=f"the bot registered no /{name}")
        options = {}
        given = body.get("options") or {}
        for option in command.get("options", []):
            value = given.get(option["name"])
            if value in (None, ""):
                continue
            options[option["name"]] = self._option(option, value)
        channel_id = int(body.get("channel") or self.channels[0].id)
        interaction = await self.server.slash(user, name, options, channel_id=channel_id)
        log.info("/%s by %s", name, user.name)
        return web.json_response({"interaction": str(interaction.id)})

    def _option(self, option: dict[str, Any], value: Any) -> Any:
        kind = option["type"]
        try:
            if kind == INTEGER:
                return int(value)
            if kind == NUMBER:
                return float(value)
            if kind == BOOLEAN:
                return bool(value)
            if kind == USER:
                return self.users[int(value)]
            if kind == ATTACHMENT:
                data = base64.b64decode(value["data"], validate=True)
                return self.server.upload(value["filename"], data, value.get("content_type"))
        except (KeyError, TypeError, ValueError, binascii.Error):
            raise web.HTTPBadRequest(text=f"bad value for {option['name']}") from None
        return str(value)

    async def _click(self, request: web.Request) -> web.Response:
        body = await request.json()
        user = self._user(body)
        message_id = int(body.get("message_id") or 0)
        custom_id = str(body.get("custom_id", ""))
        message = self.server.messages.get(message_id)
        if message is None or custom_id not in {b.get("custom_id") for b in buttons(message)}:
            raise web.HTTPBadRequest(text="no such button")
        interaction = await self.server.click(user, message_id, custom_id)
        return web.json_response({"interaction": str(interaction.id)})


def _command_form(command: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": command["name"],
        "description": command.get("description", ""),
        "maintainers": command.get("default_member_permissions") not in (None, "0", 0),
        "options": [
            {
                "name": o["name"],
                "description": o.get("description", ""),
                "type": o["type"],
                "required": bool(o.get("required")),
                "choices": [c["value"] for c in o.get("choices") or []],
            }
            for o in command.get("options", [])
        ],
    }


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
  body { margin: 0; font: 15px/1.4 system-ui, sans-serif; background: #313338; color: #dbdee1; }
  header { background: #1e1f22; padding: 10px 16px; }
  header h1 { font-size: 17px; margin: 0 0 4px; color: #fff; }
  #notice { color: #f0b232; font-size: 13px; }
  main { display: grid; grid-template-columns: 1fr 380px; gap: 0; height: calc(100vh - 64px); }
  section.channel { overflow-y: auto; padding: 8px 16px; border-right: 1px solid #1e1f22; }
  h2 { font-size: 14px; color: #949ba4; text-transform: uppercase; margin: 8px 0; }
  .message { padding: 6px 0; border-top: 1px solid #3f4147; }
  .message.private { background: #2b2d31; border-left: 3px solid #5865f2; padding-left: 8px; }
  .who { font-weight: 600; color: #fff; margin-right: 6px; }
  .tag { font-size: 11px; color: #949ba4; }
  .content { white-space: pre-wrap; }
  .small { font-size: 12px; color: #949ba4; }
  .mention { background: #3c4270; color: #c9cdfb; border-radius: 3px; padding: 0 2px; }
  code { background: #1e1f22; padding: 0 3px; border-radius: 3px; }
  .images { display: flex; flex-wrap: wrap; gap: 6px; margin: 6px 0; }
  .images img { width: 160px; height: 160px; object-fit: cover; border-radius: 4px;
                image-rendering: pixelated; background: #000; }
  .buttons button { margin: 2px 4px 2px 0; border: 0; border-radius: 3px; padding: 5px 12px;
                    color: #fff; cursor: pointer; }
  .style-1 { background: #5865f2; } .style-2 { background: #4e5058; }
  .style-3 { background: #248046; } .style-4 { background: #da373c; }
  button:disabled { opacity: .5; cursor: default; }
  aside { overflow-y: auto; padding: 8px 16px; background: #2b2d31; }
  form { background: #383a40; padding: 8px; border-radius: 6px; }
  label { display: block; margin: 6px 0 2px; font-size: 13px; }
  input[type=text], input[type=number], select { width: 100%; box-sizing: border-box;
         background: #1e1f22; color: #dbdee1; border: 0; padding: 6px; border-radius: 4px; }
  #send { margin-top: 8px; background: #5865f2; color: #fff; border: 0; padding: 7px 16px;
          border-radius: 4px; cursor: pointer; }
  #log .message { font-size: 13px; }
</style></head>
<body>
<header><h1 id="title">__TITLE__</h1><div id="notice"></div></header>
<main>
  <section class="channel" id="dream"></section>
  <aside>
    <form id="command" onsubmit="return false">
      <label for="user">Act as</label><select id="user"></select>
      <label for="name">Command</label><select id="name"></select>
      <div id="description" class="small"></div>
      <div id="options"></div>
      <button id="send" type="button">Send</button>
      <div id="error" class="small"></div>
    </form>
    <div id="log"></div>
  </aside>
</main>
<script>
"use strict";
let state = null;
const $ = (id) => document.getElementById(id);

function escapeHtml(text) {
  return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
}

function render(text) {
  const names = state.names;
  let html = escapeHtml(text).replace(/\\\\([*_`~|>#-])/g, "$1");
  html = html.replace(/&lt;@!?(\\d+)&gt;/g, (_, id) =>
    `<span class="mention">@${escapeHtml(names[id] || "user")}</span>`);
  html = html.replace(/&lt;#(\\d+)&gt;/g, (_, id) =>
    `<span class="mention">#${escapeHtml(names[id] || "channel")}</span>`);
  html = html.replace(/\\*\\*(.+?)\\*\\*/g, "<b>$1</b>");
  html = html.replace(/`([^`]+)`/g, "<code>$1</code>");
  html = html.replace(/^-# (.*)$/gm, '<span class="small">$1</span>');
  return html;
}

function messageHtml(m, channelId) {
  const me = $("user").value;
  if (m.private_to && m.private_to !== me) return "";
  const who = m.private_to ? "HPS bot (only you can see this)" : "HPS bot";
  const images = m.attachments.filter((a) => a.image)
    .map((a) => `<img src="${a.url}" alt="${escapeHtml(a.filename)}" ` +
                `title="${escapeHtml(a.filename)}">`).join("");
  const buttons = m.buttons.map((b) =>
    `<button class="style-${b.style}" ${b.disabled ? "disabled" : ""} ` +
    `data-message="${m.id}" data-custom-id="${escapeHtml(b.custom_id)}">` +
    `${escapeHtml(b.label)}</button>`).join("");
  const text = m.loading ? "<i>HPS bot is thinking…</i>" : render(m.content);
  return `<div class="message${m.private_to ? " private" : ""}" data-id="${m.id}">` +
    `<span class="who">${who}</span><span class="tag">${m.edited ? "(edited)" : ""}</span>` +
    `<div class="content">${text}</div>` +
    (images ? `<div class="images">${images}</div>` : "") +
    (buttons ? `<div class="buttons">${buttons}</div>` : "") + "</div>";
}

function heading(channel) {
  return `<h2>#${escapeHtml(channel.name)}</h2>` +
    `<div class="small">${escapeHtml(channel.topic)}</div>`;
}

function drawChannels() {
  const [dream, log] = state.channels;
  const box = $("dream");
  const atBottom = box.scrollTop + box.clientHeight >= box.scrollHeight - 20;
  box.innerHTML = heading(dream) + dream.messages.map((m) => messageHtml(m, dream.id)).join("");
  if (atBottom) box.scrollTop = box.scrollHeight;
  if (log) {
    const logged = log.messages.map((m) => messageHtml(m, log.id)).join("");
    $("log").innerHTML = heading(log) + (logged || '<div class="small">Nothing yet.</div>');
  }
  document.body.dataset.messages = String(dream.messages.length);
}

function drawForm() {
  const users = $("user");
  if (!users.options.length) {
    users.innerHTML = state.users.map((u) =>
      `<option value="${u.id}">${escapeHtml(u.name)}` +
      `${u.maintainer ? " (maintainer)" : ""}</option>`).join("");
  }
  const names = $("name");
  const known = Array.from(names.options).map((o) => o.value).join(",");
  const now = state.commands.map((c) => c.name).join(",");
  if (known !== now) {
    const chosen = names.value || "dream";
    names.innerHTML = state.commands.map((c) =>
      `<option value="${c.name}">/${c.name}` +
      `${c.maintainers ? " (maintainers)" : ""}</option>`).join("");
    if (state.commands.some((c) => c.name === chosen)) names.value = chosen;
    drawOptions();
  }
}

function drawOptions() {
  const command = state.commands.find((c) => c.name === $("name").value);
  if (!command) { $("options").innerHTML = ""; return; }
  $("description").textContent = command.description;
  $("options").innerHTML = command.options.map((o) => {
    const id = `opt-${o.name}`;
    const label = `<label for="${id}">${escapeHtml(o.name)}${o.required ? " *" : ""} ` +
      `<span class="small">${escapeHtml(o.description)}</span></label>`;
    let input;
    if (o.choices.length) {
      input = `<select id="${id}">${o.required ? "" : '<option value=""></option>'}` +
        o.choices.map((c) => `<option>${escapeHtml(String(c))}</option>`).join("") + "</select>";
    } else if (o.type === 5) {
      input = `<select id="${id}"><option value=""></option><option value="1">true</option>` +
        `<option value="0">false</option></select>`;
    } else if (o.type === 6) {
      input = `<select id="${id}">` + state.users.map((u) =>
        `<option value="${u.id}">${escapeHtml(u.name)}</option>`).join("") + "</select>";
    } else if (o.type === 11) {
      input = `<input type="file" id="${id}" accept="image/*">`;
    } else {
      input = `<input type="${o.type === 4 || o.type === 10 ? "number" : "text"}" id="${id}">`;
    }
    return label + input;
  }).join("");
}

async function readFile(file) {
  const buffer = await file.arrayBuffer();
  let binary = "";
  new Uint8Array(buffer).forEach((b) => { binary += String.fromCharCode(b); });
  return { filename: file.name, content_type: file.type || null, data: btoa(binary) };
}

async function send() {
  const command = state.commands.find((c) => c.name === $("name").value);
  const options = {};
  for (const o of command.options) {
    const input = $(`opt-${o.name}`);
    if (o.type === 11) {
      if (input.files.length) options[o.name] = await readFile(input.files[0]);
    } else if (o.type === 5) {
      if (input.value !== "") options[o.name] = input.value === "1";
    } else if (input.value !== "") {
      options[o.name] = input.value;
    }
  }
  const reply = await fetch("/api/command", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ user: $("user").value, name: command.name, options }),
  });
  $("error").textContent = reply.ok ? "" : await reply.text();
  await refresh();
}

async function click(button) {
  const reply = await fetch("/api/click", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ user: $("user").value, message_id: button.dataset.message,
                           custom_id: button.dataset.customId }),
  });
  $("error").textContent = reply.ok ? "" : await reply.text();
  await refresh();
}

async function refresh() {
  const reply = await fetch("/api/state");
  state = await reply.json();
  $("notice").textContent = state.notice;
  drawForm();
  drawChannels();
  document.body.dataset.ready = state.commands.length ? "1" : "0";
}

$("name").addEventListener("change", drawOptions);
$("user").addEventListener("change", drawChannels);
$("send").addEventListener("click", send);
document.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-custom-id]");
  if (button && !button.disabled) click(button);
});
refresh();
setInterval(refresh, 800);
</script>
</body></html>
"""
