"""Persistent buttons, each handled by the cog it belongs to.

Every button is a `DynamicItem`: its custom id carries what it acts on
(`hps:pick:<round>:<position>`), so a click counts whenever it arrives, also after the bot
restarted. A button class gives its id's template and its cog's handler (`handle`); this
module does the rest once for all of them: parsing the id, finding the cog, the answer when
none handles the click, and the guard that answers a click whose handler failed
(`replies.guarded`).

A cog with buttons is a `ButtonCog` listing them in `buttons`: loading it registers them with
its bot and binds them to that cog instance (per bot, so bots sharing a process keep theirs
apart), unloading it removes them. Nothing looks a cog up by name.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Coroutine
from typing import Any, ClassVar, Generic, Self, TypeVar

import discord
from discord import ButtonStyle
from discord.ext import commands
from discord.ui import Button, DynamicItem

from bot import replies

PREFIX = "hps:"  # every button's custom id starts with it

CogT = TypeVar("CogT", bound=commands.Cog)

# Per bot, the cog instance that handles each button class while it is loaded.
_bound: weakref.WeakKeyDictionary[discord.Client, dict[type[CogButton[Any]], commands.Cog]] = (
    weakref.WeakKeyDictionary()
)


def unhandled(client: discord.Client, custom_id: str) -> bool:
    """Whether `custom_id` is one of our buttons and no cog loaded in `client` handles it
    (its cog failed to load)."""
    bound = _bound.get(client, {})
    return custom_id.startswith(PREFIX) and not any(
        button.__discord_ui_compiled_template__.fullmatch(custom_id) for button in bound
    )


# DynamicItem wants a template on every class: this one matches no custom id.
class CogButton(DynamicItem[Button], Generic[CogT], template=r"(?!)"):
    """A button that a cog of type `CogT` handles. A subclass gives its `template`, whose
    named groups are its constructor's arguments (digits read as numbers), and `handle`."""

    def __init__(
        self,
        custom_id: str,
        label: str,
        style: ButtonStyle,
        *,
        row: int | None = None,
        disabled: bool = False,
    ) -> None:
        super().__init__(
            Button(label=label, style=style, custom_id=custom_id, row=row, disabled=disabled)
        )

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: Button, match: re.Match[str], /
    ) -> Self:
        """The clicked button: what it acts on from its custom id, its looks as shown."""
        fields = {k: int(v) if v.isdecimal() else v for k, v in match.groupdict().items()}
        button = cls(**fields)
        button.item.label, button.item.style = item.label, item.style
        return button

    async def callback(self, interaction: discord.Interaction) -> None:
        cog = _bound.get(interaction.client, {}).get(type(self))
        if cog is None:  # unloaded since the click came in
            await replies.unavailable(interaction)
            return
        await replies.guarded(interaction, self.handle(cog, interaction))  # type: ignore[arg-type]

    def handle(self, cog: CogT, interaction: discord.Interaction) -> Coroutine[Any, Any, None]:
        """The cog's handling of this click."""
        raise NotImplementedError


class ButtonCog(commands.Cog):
    """A cog with buttons: while it is loaded, its bot hands it the clicks on `buttons`."""

    bot: commands.Bot
    buttons: ClassVar[tuple[type[CogButton[Any]], ...]] = ()

    async def cog_load(self) -> None:
        _bound.setdefault(self.bot, {}).update(dict.fromkeys(self.buttons, self))
        self.bot.add_dynamic_items(*self.buttons)

    async def cog_unload(self) -> None:
        self.bot.remove_dynamic_items(*self.buttons)
        bound = _bound.get(self.bot, {})
        for button in self.buttons:
            bound.pop(button, None)
