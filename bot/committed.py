"""What a command or a button has committed so far, so that its failure reply tells the truth.

A handler that changes state calls `record(interaction, text)` as soon as a change is
committed (`text` says what was done, for the user). Should it fail afterwards (a reply
that cannot be formatted or sent, a second step that fails, the database going away), the
generic error handlers answer with `failure_reply`: what was done, then that something
failed after it, instead of "Nothing was changed".
"""

from __future__ import annotations

import discord

from bot import formats

_KEY = "hps.committed"


def record(interaction: discord.Interaction, text: str) -> None:
    """Note that `text` (a sentence for the user) is done and stays done whatever follows."""
    interaction.extras.setdefault(_KEY, []).append(text)


def done(interaction: discord.Interaction) -> list[str]:
    """What `record` noted on this interaction, oldest first."""
    return list(interaction.extras.get(_KEY, ()))


def failure_reply(interaction: discord.Interaction, *, database_down: bool = False) -> str:
    """The answer to a command or click that failed on our side: "nothing was changed"
    only when nothing was recorded as committed."""
    committed = done(interaction)
    if not committed:
        return formats.DB_DOWN if database_down else formats.FAILED_COMMAND
    return formats.failed_after(committed, database_down=database_down)
