"""`hps bot`: run the Discord bot."""

from __future__ import annotations

import logging

from cli.common import fail, run, settings

log = logging.getLogger(__name__)


def bot() -> None:
    """Run the Discord bot until interrupted (SIGINT or SIGTERM stop it cleanly)."""
    config = settings()
    if config.discord.token is None:
        raise fail(
            "no Discord bot token: set HPS_DISCORD__TOKEN (in the environment or .env, or "
            "[discord] token in hps.toml); "
            "see README.md, section Configuration"
        )
    import discord

    from bot.client import run as run_bot

    try:
        run(run_bot(config))
    except discord.LoginFailure:
        raise fail("Discord refused the bot token (HPS_DISCORD__TOKEN)") from None
    except (
        discord.ConnectionClosed,
        discord.GatewayNotFound,
        discord.PrivilegedIntentsRequired,
    ) as exc:
        raise fail(f"the Discord gateway closed the connection: {exc}") from None
