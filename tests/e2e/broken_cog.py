"""An extension whose set-up fails, to show that the bot's other features go on."""

from __future__ import annotations


async def setup(bot: object) -> None:
    raise RuntimeError("this cog is broken on purpose")
