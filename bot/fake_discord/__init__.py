"""A local Discord-compatible server (REST + gateway on loopback) that the unmodified bot
talks to: the end-to-end tests, the ingest benchmark and `hps demo` use it. See
`bot/fake_discord/server.py`. It imports no torch and nothing else of the bot."""

from bot.fake_discord.server import *  # noqa: F403
from bot.fake_discord.server import __all__  # noqa: F401
