"""`hps demo` as a newcomer runs it: the real process, its page in headless Chromium driven
through the DevTools protocol. A /dream typed into the page comes back as images; a click
on a button is recorded in the demo's (embedded) database."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _popen(args: list[Any], **options: Any) -> subprocess.Popen[str]:
    """A process whose output (stdout, else stderr) the test reads as text."""
    options.setdefault("stdout", subprocess.PIPE)
    options.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen(args, text=True, **options)


class Lines:
    """A process's output lines, read in a thread, and waiting for one."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        regex = re.compile(pattern)

        def found() -> re.Match[str] | None:
            return next((m for m in map(regex.search, self.lines) if m), None)

        with self._changed:
            self._changed.wait_for(found, timeout)
            match = found()
        assert match, f"no line matching {pattern!r} in:\n" + "\n".join(self.lines[-40:])
        return match


class Page:
    """One Chromium tab over the DevTools protocol."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.next_id = 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            reply = await self.ws.receive_json(timeout=30)
            if reply.get("id") == self.next_id:
                assert "error" not in reply, reply
                return reply["result"]

    async def js(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    async def wait(self, expression: str, within: float = 60) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while not (value := await self.js(expression)):
            assert loop.time() < deadline, f"never true: {expression}"
            await asyncio.sleep(0.25)
        return value


@pytest.mark.skipif(
    _chromium() is None and not os.environ.get("REQUIRE_CHROMIUM"),
    reason="chromium is not installed (`.ci/run` installs it)",
)
async def test_the_demo_runs_the_whole_loop_in_a_browser(tmp_path: Path) -> None:
    assert _chromium() is not None, "REQUIRE_CHROMIUM is set but chromium is missing"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPS_")}
    demo = _popen(
        [sys.executable, "-m", "cli", "demo", "--port", "0", "--no-open",
         "--data-dir", str(tmp_path / "demo")],
        cwd=ROOT, env=env, stderr=subprocess.STDOUT,
    )  # fmt: skip
    browser = None
    try:
        output = Lines(demo.stdout)
        database = (await asyncio.to_thread(output.wait_for, r"database: (\S+)", 120))[1]
        url = (await asyncio.to_thread(output.wait_for, r"open (http://\S+)", 180))[1]
        browser = _popen(
            [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium'}", "--remote-debugging-port=0",
             "--window-size=1300,900", "about:blank"],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        devtools = await asyncio.to_thread(
            Lines(browser.stderr).wait_for, r"DevTools listening on ws://([\d.:]+)/", 60
        )
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://{devtools[1]}/json/list") as listed:
                tabs = [t for t in json.loads(await listed.text()) if t["type"] == "page"]
            async with http.ws_connect(tabs[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                page = Page(ws)
                await page.call("Page.navigate", url=url)
                await page.wait("document.body && document.body.dataset.ready === '1'")
                notice = await page.js("document.getElementById('notice').textContent")
                assert notice.startswith("Demo with tiny untrained models: the images are noise")
                # "you" is a maintainer: the maintainer commands are offered beside /dream,
                # and the log channel (where /retrain's outcomes go) is on the page.
                offered = await page.js(
                    "[...document.getElementById('name').options].map(o => o.textContent)"
                )
                assert {"/dream", "/status (maintainers)", "/retrain (maintainers)"} <= set(
                    offered
                ), offered
                assert "hps-log" in await page.js("document.getElementById('log').textContent")
                # /dream, typed into the page's form as a person would.
                await page.js(
                    "const name = document.getElementById('name'); name.value = 'dream';"
                    "name.dispatchEvent(new Event('change'));"
                    "document.getElementById('opt-prompt').value = 'a red cube';"
                    "document.getElementById('send').click(); true"
                )
                await page.wait(
                    "(() => { const shown = [...document.querySelectorAll('#dream .images img')];"
                    " return shown.length >= 4 && shown.every(i => i.complete && i.naturalWidth);"
                    " })()",
                    within=120,
                )
                labels = await page.js(
                    "[...document.querySelectorAll('#dream button[data-custom-id]')]"
                    ".map(b => b.textContent)"
                )
                assert labels == ["1", "2", "3", "4", "Can't decide", "None of these"]
                await page.js("document.querySelector('#dream button[data-custom-id]').click()")
                await page.wait(
                    "document.body.innerText.includes('Recorded: you chose image 1. Thank you!')"
                )
        conn = await asyncpg.connect(database)
        try:
            choices = await conn.fetch("SELECT verdict, chosen_position, is_requester FROM choices")
        finally:
            await conn.close()
        assert [tuple(c) for c in choices] == [("pick", 1, True)]
        demo.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(demo.wait, 60) == 0
        assert "hps demo: stopping" in output.lines
    finally:
        for process in (browser, demo):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


@pytest.mark.slow
def test_the_demo_deletes_its_temporary_folder_after_everything_stopped() -> None:
    """Without --data-dir the demo's folder is temporary: Ctrl-C stops the bot, scheduler and
    worker, then the embedded PostgreSQL, and only then deletes the folder (a server left
    running on deleted files would outlive the demo)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPS_")}
    demo = _popen(
        [sys.executable, "-m", "cli", "demo", "--port", "0", "--no-open"],
        cwd=ROOT, env=env, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        output = Lines(demo.stdout)
        root = Path(output.wait_for(r"data in (\S+);", 120)[1])
        output.wait_for(r"open (http://\S+)", 180)
        pid = int((root / "postgres" / "postmaster.pid").read_text().splitlines()[0])
        assert psutil.pid_exists(pid)
        demo.send_signal(signal.SIGINT)
        assert demo.wait(90) == 0
        assert not root.exists()
        assert not psutil.pid_exists(pid), "the embedded PostgreSQL outlived the demo"
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()


def test_the_demos_processes_read_no_env_file_or_toml_of_the_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real deployment's ./.env or ./hps.toml where `hps demo` runs (its bucket, say)
    never reaches the demo's bot, scheduler and worker."""
    from types import SimpleNamespace

    from cli.demo import _environment
    from hps.settings import load_settings

    (tmp_path / ".env").write_text("HPS_STORE__URL=s3://production/images\n")
    (tmp_path / "hps.toml").write_text("[limits]\nrounds_per_hour = 3\n")
    monkeypatch.setattr("hps.settings.DEFAULT_ENV_FILE", tmp_path / ".env")
    monkeypatch.setattr("hps.settings.DEFAULT_CONFIG_FILE", tmp_path / "hps.toml")
    assert load_settings().store.url == "s3://production/images"  # what the user has
    fake = SimpleNamespace(token="t", api_base_url="http://x/api", gateway_url="ws://x")
    env = _environment("postgresql://demo@h/db", tmp_path / "demo", fake, {})
    for key in [k for k in os.environ if k.startswith("HPS_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("HPS_"):
            monkeypatch.setenv(key, value)
    child = load_settings()
    assert child.store.url != "s3://production/images"
    assert child.limits.rounds_per_hour != 3
    assert child.data_dir == tmp_path / "demo"
