"""A local Discord-compatible server (REST + gateway on loopback) for end-to-end tests and
benchmarks: see `tests/discord_fake/server.py`."""

from tests.discord_fake.server import *  # noqa: F403
from tests.discord_fake.server import __all__  # noqa: F401
