"""`hps bot` as users run it: configuration errors are clear, the bot package stays light."""

from __future__ import annotations

import ast
import asyncio
import os
import subprocess
import sys
from pathlib import Path

from bot.fake_discord import FakeDiscord
from tests.e2e.conftest import ROOT, BotProcess, bot_env, bot_settings


def test_without_a_token_the_bot_says_how_to_set_one(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPS_")}
    env["HPS_DATA_DIR"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "cli", "bot"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "no Discord bot token: set HPS_DISCORD__TOKEN" in result.stderr


async def test_a_refused_token_stops_the_bot_with_a_clear_message(
    fake: FakeDiscord, database_url: str, tmp_path: Path, bot_processes: list[BotProcess]
) -> None:
    env = bot_env(bot_settings(fake, database_url, tmp_path / "data"))
    env["HPS_DISCORD__TOKEN"] = "wrong-token-SECRET"
    process = BotProcess(env)
    bot_processes.append(process)
    code, output = await asyncio.to_thread(process.stop_when_exited)
    assert code == 1
    assert "error: Discord refused the bot token (HPS_DISCORD__TOKEN)" in output
    assert "SECRET" not in output
    assert [r.path for r in fake.requests] == ["/users/@me"]


def test_the_bot_package_never_imports_torch_or_pipeline() -> None:
    for path in (ROOT / "bot").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in {"torch", "pipeline", "diffusers", "open_clip"}, (
                    f"{path.relative_to(ROOT)} imports {name}"
                )
    code = (
        "import sys, cli.bot, bot.client, bot.cogs.dream, bot.cogs.maintainers, "
        "bot.cogs.community; print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'pipeline', 'diffusers', 'open_clip')))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.stdout.strip() == "[]", result.stderr
