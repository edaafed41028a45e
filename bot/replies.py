"""Answering an interaction: privately in whatever state it is, and an answer for every
click whose handler failed. A leaf: the client, the cogs and the buttons use it; it uses
only the texts in `bot.formats` and what `bot.committed` recorded.
"""

from __future__ import annotations

import logging
from collections.abc import Coroutine
from typing import Any

import discord

from bot import committed
from db.connect import UNAVAILABLE

log = logging.getLogger(__name__)

# Discord's answer to a response after its 3 s deadline (or to an unknown interaction).
UNKNOWN_INTERACTION = 10062


def too_late(error: BaseException) -> bool:
    """Whether `error` says the interaction can no longer be answered."""
    return isinstance(error, discord.NotFound) and error.code == UNKNOWN_INTERACTION


async def reply(interaction: discord.Interaction, content: str) -> None:
    """Answer privately, whether the interaction is unanswered, deferred or answered."""
    if not interaction.response.is_done():
        await interaction.response.send_message(content, ephemeral=True)
    elif interaction.response.type == discord.InteractionResponseType.deferred_channel_message:
        await interaction.edit_original_response(content=content)
    else:
        await interaction.followup.send(content, ephemeral=True)


async def unavailable(interaction: discord.Interaction) -> None:
    """The answer to a click on a button that no loaded cog handles."""
    await interaction.response.send_message(
        "This feature is unavailable right now; please try again later.", ephemeral=True
    )


async def guarded(interaction: discord.Interaction, handling: Coroutine[Any, Any, Any]) -> None:
    """Run a button's handler; an error still gets the clicker an answer (discord.py would
    only log it, and Discord would show "This interaction failed"), saying what was
    committed before it (`bot.committed`). Beyond the bound on clicks in flight, the click
    is answered "busy" at once and not handled (`bot.admission`)."""
    gate = interaction.client.admission  # type: ignore[attr-defined]
    if not gate.admit():
        await gate.refuse(interaction, handling)
        return
    try:
        await handling
    except UNAVAILABLE as exc:
        log.warning("database unavailable handling a click: %s", exc)
        await reply(interaction, committed.failure_reply(interaction, database_down=True))
    except Exception as exc:
        if too_late(exc):
            # No answer can reach the user now (what was recorded stays recorded); an
            # overloaded bot must not spend its time on tracebacks either.
            log.warning("a click was answered too late (after Discord's 3 s deadline)")
            return
        custom_id = (interaction.data or {}).get("custom_id")
        log.exception("handling a click failed", extra={"custom_id": custom_id})
        await reply(interaction, committed.failure_reply(interaction))
    finally:
        gate.release()
