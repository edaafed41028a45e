"""Who may do what, and which input is acceptable: pure functions and app-command checks."""

from __future__ import annotations

import unicodedata
from typing import TYPE_CHECKING

import discord
from discord import app_commands

from db.prompts import normalize

if TYPE_CHECKING:
    from hps.settings import DiscordSettings, LimitSettings


# Joins emoji sequences (a format character, but harmless); other format characters such
# as bidirectional overrides can disguise text and are refused with the control characters.
ZWJ = "\u200d"


class PromptRejected(Exception):
    """A prompt that may not be used; the message is for the user."""


def clean_prompt(text: str, limits: LimitSettings, *, what: str = "prompt") -> str:
    """The prompt with surrounding whitespace removed, or `PromptRejected` saying why not."""
    text = text.strip()
    if not text and what == "prompt":
        raise PromptRejected("Your prompt is empty: describe the image you want.")
    if len(text) > limits.prompt_max_length:
        raise PromptRejected(
            f"Your {what} is {len(text)} characters long; the limit is {limits.prompt_max_length}."
        )
    if any(unicodedata.category(ch) in ("Cc", "Cf") and ch != ZWJ for ch in text):
        raise PromptRejected(f"Your {what} contains control characters; please remove them.")
    # Matched without the joiner, which renders as nothing: `go\u200dre` is `gore`.
    folded = normalize(text.replace(ZWJ, ""))
    for term in limits.banned_terms:
        if term.strip() and normalize(term) in folded:
            raise PromptRejected(f"Your {what} contains a term that is not allowed here.")
    return text


def channel_allowed(channel_id: int | None, discord_settings: DiscordSettings) -> bool:
    """True where /dream may run: any channel when none are configured."""
    allowed = discord_settings.channel_ids
    return not allowed or channel_id in allowed


class NotMaintainer(app_commands.CheckFailure):
    def __init__(self) -> None:
        super().__init__("This command is for maintainers only. Nothing was changed.")


def is_maintainer(interaction: discord.Interaction) -> bool:
    """A member with one of the configured maintainer roles. With none configured nobody is
    a maintainer: Manage Server alone is not enough, since the bot may sit in servers whose
    admins must not promote models or ban users platform-wide. Role ids are unique across
    Discord, so a role also pins the server it belongs to."""
    user = interaction.user
    if not isinstance(user, discord.Member):
        return False
    role_ids = interaction.client.settings.discord.maintainer_role_ids  # type: ignore[attr-defined]
    return any(role.id in role_ids for role in user.roles)


def servers_only(command: app_commands.Command, allow_dms: bool) -> None:  # type: ignore[type-arg]
    """Register `command` for servers only, so that Discord offers it nowhere else (a DM
    with the bot is outside every server's moderation), unless `allow_dms`. Discord's
    contexts are a registration: the command's handler checks `in_server` too."""
    if not allow_dms:
        command.guild_only = True
        command.allowed_contexts = app_commands.AppCommandContext(guild=True)


def in_server(interaction: discord.Interaction, allow_dms: bool) -> bool:
    """Whether a server-only command may run here."""
    return allow_dms or interaction.guild_id is not None


SERVERS_ONLY = "This command works in servers only, not in direct messages."
