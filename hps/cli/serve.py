"""`hps serve`: everything on one machine."""

from __future__ import annotations

from hps.cli.common import console, fail, settings


def serve() -> None:
    """Run the platform on this machine (the database is migrated first)."""
    from db import migrate
    from db.connect import database_url

    config = settings()
    migrate.upgrade(database_url(config))
    console.print("database is up to date")
    if config.discord.token is None:
        raise fail(
            "no Discord bot token: set HPS_DISCORD__TOKEN (or [discord] token in hps.toml); "
            "see README.md, section Configuration"
        )
    raise fail("the Discord bot is not part of this build yet")
