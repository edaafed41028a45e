"""Buttons. Every button is a persistent `DynamicItem`: its custom id carries what it acts on
(`hps:pick:<round>:<position>`), so a click counts whenever it arrives, also after the bot
restarted. The items only parse the id and hand the click to their cog.

Custom ids say nothing about model versions: in an A/B round the buttons and file names are
the same whichever model made which image.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import discord
from discord import ButtonStyle
from discord.ui import Button, DynamicItem, View

from bot import committed, formats
from db.connect import UNAVAILABLE

if TYPE_CHECKING:
    from bot.cogs.community import Community
    from bot.cogs.dream import Dream

log = logging.getLogger(__name__)

PER_ROW = 5  # Discord's limit of buttons in an action row
PICK = re.compile(r"hps:pick:(?P<round>\d+):(?P<pos>\d+)")


async def _unavailable(interaction: discord.Interaction) -> None:
    await interaction.response.send_message(
        "This feature is unavailable right now; please try again later.", ephemeral=True
    )


async def reply(interaction: discord.Interaction, content: str) -> None:
    """Answer privately, whether the interaction is unanswered, deferred or answered."""
    if not interaction.response.is_done():
        await interaction.response.send_message(content, ephemeral=True)
    elif interaction.response.type == discord.InteractionResponseType.deferred_channel_message:
        await interaction.edit_original_response(content=content)
    else:
        await interaction.followup.send(content, ephemeral=True)


async def _guarded(interaction: discord.Interaction, handling: Coroutine[Any, Any, Any]) -> None:
    """Run a button's handler; an error still gets the clicker an answer (discord.py would
    only log it, and Discord would show "This interaction failed"). Beyond the bound on
    clicks in flight, the click is answered "busy" at once and not handled (`bot.admission`)."""
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


# Discord's answer to a response after its 3 s deadline (or to an unknown interaction).
UNKNOWN_INTERACTION = 10062


def too_late(error: BaseException) -> bool:
    """Whether `error` says the interaction can no longer be answered."""
    return isinstance(error, discord.NotFound) and error.code == UNKNOWN_INTERACTION


def _dream(interaction: discord.Interaction) -> Dream | None:
    return interaction.client.get_cog("Dream")  # type: ignore[attr-defined, return-value]


def _community(interaction: discord.Interaction) -> Community | None:
    return interaction.client.get_cog("Community")  # type: ignore[attr-defined, return-value]


class PickButton(DynamicItem[Button], template=PICK.pattern):
    """Button `label` picks the image at `position` (labels count the shown images 1..n)."""

    def __init__(
        self,
        round_id: int,
        position: int,
        *,
        label: str | None = None,
        style: ButtonStyle = ButtonStyle.primary,
        row: int | None = None,
        disabled: bool = False,
    ) -> None:
        super().__init__(
            Button(
                label=label or str(position),
                style=style,
                custom_id=f"hps:pick:{round_id}:{position}",
                row=row,
                disabled=disabled,
            )
        )
        self.round_id = round_id
        self.position = position

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: Button, match: re.Match[str], /
    ) -> PickButton:
        return cls(int(match["round"]), int(match["pos"]), label=item.label, style=item.style)

    async def callback(self, interaction: discord.Interaction) -> Any:
        cog = _dream(interaction)
        if cog is None:
            return await _unavailable(interaction)
        await _guarded(
            interaction,
            cog.on_click(interaction, self.round_id, "pick", self.position, self.item.label),
        )


class VerdictButton(DynamicItem[Button], template=r"hps:(?P<verdict>tie|none):(?P<round>\d+)"):
    """ "Can't decide" (a tie) or "None of these"."""

    def __init__(
        self,
        round_id: int,
        verdict: str,
        *,
        style: ButtonStyle = ButtonStyle.secondary,
        row: int | None = None,
        disabled: bool = False,
    ) -> None:
        super().__init__(
            Button(
                label=formats.VERDICT_LABELS[verdict],
                style=style,
                custom_id=f"hps:{verdict}:{round_id}",
                row=row,
                disabled=disabled,
            )
        )
        self.round_id = round_id
        self.verdict = verdict

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: Button, match: re.Match[str], /
    ) -> VerdictButton:
        return cls(int(match["round"]), match["verdict"])

    async def callback(self, interaction: discord.Interaction) -> Any:
        cog = _dream(interaction)
        if cog is None:
            return await _unavailable(interaction)
        await _guarded(
            interaction, cog.on_click(interaction, self.round_id, self.verdict, None, None)
        )


class RetryButton(DynamicItem[Button], template=r"hps:retry:(?P<round>\d+)"):
    """Shown on a failed round: generate it again."""

    def __init__(self, round_id: int) -> None:
        super().__init__(
            Button(label="Retry", style=ButtonStyle.primary, custom_id=f"hps:retry:{round_id}")
        )
        self.round_id = round_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: Button, match: re.Match[str], /
    ) -> RetryButton:
        return cls(int(match["round"]))

    async def callback(self, interaction: discord.Interaction) -> Any:
        cog = _dream(interaction)
        if cog is None:
            return await _unavailable(interaction)
        await _guarded(interaction, cog.on_retry(interaction, self.round_id))


class ForgetButton(DynamicItem[Button], template=r"hps:forget:(?P<answer>yes|no):(?P<user>\d+)"):
    """The confirmation of /forget-me, valid only for the user who asked."""

    def __init__(self, user_id: int, answer: str) -> None:
        yes = answer == "yes"
        super().__init__(
            Button(
                label="Yes, delete my data" if yes else "No, keep it",
                style=ButtonStyle.danger if yes else ButtonStyle.secondary,
                custom_id=f"hps:forget:{answer}:{user_id}",
            )
        )
        self.user_id = user_id
        self.answer = answer

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: Button, match: re.Match[str], /
    ) -> ForgetButton:
        return cls(int(match["user"]), match["answer"])

    async def callback(self, interaction: discord.Interaction) -> Any:
        cog = _community(interaction)
        if cog is None:
            return await _unavailable(interaction)
        await _guarded(
            interaction, cog.on_forget_answer(interaction, self.user_id, self.answer == "yes")
        )


DYNAMIC_ITEMS = (PickButton, VerdictButton, RetryButton, ForgetButton)


def round_view(
    round_id: int,
    positions: list[int],
    *,
    chosen: tuple[str, int | None] | None = None,
    closed: bool = False,
) -> View:
    """Buttons 1..n for the shown `positions`, then "Can't decide" and "None of these";
    the requester's `chosen` verdict (and position) highlighted, everything disabled when
    `closed`."""
    view = View(timeout=None)
    for index, position in enumerate(positions):
        if chosen is None:
            style = ButtonStyle.primary
        else:
            style = ButtonStyle.success if chosen == ("pick", position) else ButtonStyle.secondary
        view.add_item(
            PickButton(
                round_id,
                position,
                label=str(index + 1),
                style=style,
                row=index // PER_ROW,
                disabled=closed,
            )
        )
    verdict_row = (len(positions) - 1) // PER_ROW + 1 if positions else 0
    for verdict in ("tie", "none"):
        picked = chosen is not None and chosen[0] == verdict
        view.add_item(
            VerdictButton(
                round_id,
                verdict,
                style=ButtonStyle.success if picked else ButtonStyle.secondary,
                row=verdict_row,
                disabled=closed,
            )
        )
    return view


def shown_positions(message: discord.Message | None, round_id: int) -> list[int] | None:
    """The image positions a round message offers, read from its pick buttons (None when
    the message is not at hand)."""
    if message is None:
        return None
    positions = []
    for row in message.components:
        for component in getattr(row, "children", []):
            match = PICK.fullmatch(getattr(component, "custom_id", None) or "")
            if match and int(match["round"]) == round_id:
                positions.append(int(match["pos"]))
    return positions or None


def retry_view(round_id: int) -> View:
    view = View(timeout=None)
    view.add_item(RetryButton(round_id))
    return view


def forget_view(user_id: int) -> View:
    view = View(timeout=None)
    view.add_item(ForgetButton(user_id, "yes"))
    view.add_item(ForgetButton(user_id, "no"))
    return view
