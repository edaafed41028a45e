"""The cogs with buttons under other class names, as a renamed or subclassed cog would be:
their buttons must still reach them."""

from __future__ import annotations

from bot.client import HPSBot
from bot.cogs.community import Community
from bot.cogs.dream import Dream


class Dreaming(Dream):
    pass


class Everyone(Community):
    pass


async def setup(bot: HPSBot) -> None:
    await bot.add_cog(Dreaming(bot))
    await bot.add_cog(Everyone(bot))
