"""/dream and its buttons: the choice workflow of the channel the paper's data came from.

1. `/dream` validates the prompt and the channel, checks the user's limits, defers, creates
   the round (which enqueues its generate job) and says the place in the queue.
2. When the round's NOTIFY says ready (or failed, or closed), the round's message is edited:
   through the /dream interaction while its token is valid (15 minutes), else by message id
   in the channel, else as a new message. `rounds.shown_status` records what the message
   shows, so rounds that changed while the bot was away are shown when it LISTENs again.
3. A click records a choice (`db.choices.record_choice`: one transaction, idempotent) and
   answers privately. The requester's pick is highlighted on the message and the chosen
   image posted on its own, as the original workflow's "upscale".

The round's buttons live here too (`bot.buttons` for how they reach this cog). Their custom
ids say nothing about model versions: in an A/B round the buttons and file names are the same
whichever model made which image.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import time
import weakref
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any, Literal

import aiohttp
import discord
from discord import ButtonStyle, app_commands
from discord.ext import commands
from discord.ui import View

from bot import checks, committed, formats, imaging
from bot.buttons import ButtonCog, CogButton
from bot.client import HPSBot
from bot.replies import reply
from db import jobs, messages, rounds
from db.choices import ChoiceRefused, record_choice, requester_choice
from db.connect import UNAVAILABLE
from db.images import images_of_round
from hps.store import StoreUnavailable

if TYPE_CHECKING:
    from hps.settings import GenerationSettings, LimitSettings

log = logging.getLogger(__name__)

# Interaction tokens work for 15 minutes; stop using one a little before.
ORIGINAL_TTL = 14 * 60.0
# Rounds that changed while nobody listened are caught up if they are this young.
CATCH_UP_WINDOW = timedelta(days=7)
# A round with no message yet is being registered by the /dream that created it (which
# shows it afterwards); after this long, the command is presumed dead and a new message is
# posted instead.
REGISTRATION_GRACE = timedelta(minutes=2)
SHOWN_STATUSES = ("ready", "failed", "closed")
# In flight again: shown only over a message that still shows the round failed (a retry by
# `hps jobs retry`; the Retry button shows its own).
RETRIED_STATUSES = ("queued", "generating")
# A round that could not be shown for a passing reason (the store unreachable for a moment,
# Discord answering 5xx after discord.py's own retries, the connection to it failing) is
# shown again after these many seconds, one after the other; then at the next catch-up.
SHOW_RETRY_SECONDS = (1, 2, 5, 10, 30, 60, 120)
TRANSIENT = (StoreUnavailable, discord.DiscordServerError, aiohttp.ClientError, TimeoutError)
PER_ROW = 5  # Discord's limit of buttons in an action row
PICK = re.compile(r"hps:pick:(?P<round_id>\d+):(?P<position>\d+)")

Aspect = Literal["square", "portrait", "landscape"]


def dimensions(aspect: Aspect, generation: GenerationSettings) -> tuple[int, int]:
    """Width and height for an aspect: the configured size, one side 1.5× for portrait or
    landscape (SD's usual 512×768), in multiples of 8."""
    width, height = generation.width, generation.height
    if aspect == "portrait":
        height = int(height * 1.5) // 8 * 8
    elif aspect == "landscape":
        width = int(width * 1.5) // 8 * 8
    return width, height


def round_limits(limits: LimitSettings) -> rounds.Limits:
    return rounds.Limits(
        per_hour=limits.rounds_per_hour,
        in_flight=limits.rounds_in_flight,
        per_week=limits.rounds_per_week,
    )


@dataclass
class _Original:
    """The /dream (or retry click) interaction whose response shows a round."""

    interaction: discord.Interaction
    since: float

    def usable(self) -> bool:
        return time.monotonic() - self.since < ORIGINAL_TTL


class PickButton(CogButton["Dream"], template=PICK.pattern):
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
        custom_id = f"hps:pick:{round_id}:{position}"
        super().__init__(custom_id, label or str(position), style, row=row, disabled=disabled)
        self.round_id = round_id
        self.position = position

    def handle(self, cog: Dream, interaction: discord.Interaction) -> Awaitable[None]:
        return cog.on_click(interaction, self.round_id, "pick", self.position, self.item.label)


class VerdictButton(CogButton["Dream"], template=r"hps:(?P<verdict>tie|none):(?P<round_id>\d+)"):
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
        label = formats.VERDICT_LABELS[verdict]
        super().__init__(f"hps:{verdict}:{round_id}", label, style, row=row, disabled=disabled)
        self.round_id = round_id
        self.verdict = verdict

    def handle(self, cog: Dream, interaction: discord.Interaction) -> Awaitable[None]:
        return cog.on_click(interaction, self.round_id, self.verdict, None, None)


class RetryButton(CogButton["Dream"], template=r"hps:retry:(?P<round_id>\d+)"):
    """Shown on a failed round: generate it again."""

    def __init__(self, round_id: int) -> None:
        super().__init__(f"hps:retry:{round_id}", "Retry", ButtonStyle.primary)
        self.round_id = round_id

    def handle(self, cog: Dream, interaction: discord.Interaction) -> Awaitable[None]:
        return cog.on_retry(interaction, self.round_id)


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
            if match and int(match["round_id"]) == round_id:
                positions.append(int(match["position"]))
    return positions or None


def retry_view(round_id: int) -> View:
    view = View(timeout=None)
    view.add_item(RetryButton(round_id))
    return view


class Dream(ButtonCog):
    buttons = (PickButton, VerdictButton, RetryButton)

    def __init__(self, bot: HPSBot) -> None:
        self.bot: HPSBot = bot
        checks.servers_only(self.dream, bot.settings.discord.dream_in_dms)
        self._originals: dict[int, _Original] = {}
        # One lock per round serialises the edits of its message.
        self._locks: weakref.WeakValueDictionary[int, asyncio.Lock] = weakref.WeakValueDictionary()
        self._retries: set[asyncio.Task[None]] = set()

    async def cog_unload(self) -> None:
        for task in self._retries:
            task.cancel()
        await super().cog_unload()

    def _remember(self, round_id: int, interaction: discord.Interaction) -> None:
        """Keep the interaction that shows a round (forgetting those whose token expired:
        rounds that never got ready must not pile up)."""
        for stale in [r for r, o in self._originals.items() if not o.usable()]:
            del self._originals[stale]
        self._originals[round_id] = _Original(interaction, time.monotonic())

    def _lock(self, round_id: int) -> asyncio.Lock:
        lock = self._locks.get(round_id)
        if lock is None:
            lock = self._locks[round_id] = asyncio.Lock()
        return lock

    # -- /dream ----------------------------------------------------------------------------

    @app_commands.command(
        description="Generate images for a prompt, then pick the one you like best."
    )
    @app_commands.describe(
        prompt="What the image should show",
        negative_prompt="What to keep out of the image",
        seed="Fix the randomness to repeat a result",
        aspect="The shape of the images",
    )
    async def dream(
        self,
        interaction: discord.Interaction,
        prompt: str,
        negative_prompt: str | None = None,
        seed: app_commands.Range[int, 0, 2**32 - 1] | None = None,
        aspect: Aspect = "square",
    ) -> None:
        settings = self.bot.settings
        user_id = interaction.user.id
        if not checks.in_server(interaction, settings.discord.dream_in_dms):
            await interaction.response.send_message(checks.SERVERS_ONLY, ephemeral=True)
            return
        if not checks.channel_allowed(interaction.channel_id, settings.discord):
            channels = ", ".join(f"<#{c}>" for c in settings.discord.channel_ids)
            await interaction.response.send_message(
                f"/dream works in {channels} only.", ephemeral=True
            )
            return
        limits = round_limits(settings.limits)
        try:
            prompt = checks.clean_prompt(prompt, settings.limits)
            negative = checks.clean_prompt(
                negative_prompt or "", settings.limits, what="negative prompt"
            )
            # Checked before deferring, so that a refusal stays private; bounded, so that
            # a slow database still leaves time to answer within Discord's 3 s.
            async with asyncio.timeout(settings.bot.click_timeout_seconds):
                await rounds.check_may_dream(self.bot.pool, user_id, limits)
        except (checks.PromptRejected, rounds.RoundRefused) as exc:
            text = formats.round_refused(exc) if isinstance(exc, rounds.RoundRefused) else str(exc)
            log.info("refused /dream: %s", exc, extra={"user_id": user_id})
            await interaction.response.send_message(text, ephemeral=True)
            return
        except TimeoutError:
            log.warning(
                "/dream: the database is too slow to check limits", extra={"user_id": user_id}
            )
            await interaction.response.send_message(formats.DB_DOWN, ephemeral=True)
            return

        await interaction.response.defer(thinking=True)
        width, height = dimensions(aspect, settings.generation)
        try:
            created = await rounds.create_round(
                self.bot.pool,
                requester_discord_id=user_id,
                prompt=prompt,
                negative_prompt=negative,
                k=settings.generation.images_per_round,
                params={"seed": seed, "aspect": aspect, "width": width, "height": height},
                guild_id=interaction.guild_id,
                channel_id=interaction.channel_id,
                limits=limits,
            )
        except rounds.RoundRefused as exc:
            # Lost a race with the user's other requests since the check above.
            log.info("refused /dream: %s", exc, extra={"user_id": user_id})
            await interaction.edit_original_response(content=formats.round_refused(exc))
            return
        round_id = created.round.id
        committed.record(interaction, formats.ROUND_QUEUED)
        try:
            async with self._lock(round_id):
                self._remember(round_id, interaction)
                message = await interaction.edit_original_response(
                    content=formats.queued(prompt, negative, created.queue_position)
                )
                await self._record_or_delete(
                    message,
                    messages.record_message(
                        self.bot.pool,
                        round_id,
                        interaction.guild_id,
                        message.channel.id,
                        message.id,
                    ),
                    round_id,
                )
        except (discord.HTTPException, *UNAVAILABLE) as exc:
            # The round exists and its job is queued: no "nothing was changed" here. Without
            # a registered message, the round is posted anew when it is ready.
            log.warning(
                "round created, but its message was not registered (%s)",
                exc,
                extra={"round_id": round_id, "job_id": created.job.id},
            )
            return
        log.info(
            "round created",
            extra={
                "round_id": round_id,
                "job_id": created.job.id,
                "user_id": user_id,
                "queue_position": created.queue_position,
            },
        )
        # A fast worker may have finished while the message was being registered.
        await self._show_safely(round_id)

    # -- showing rounds --------------------------------------------------------------------

    @commands.Cog.listener()
    async def on_hps_round(self, round_id: int, status: str) -> None:
        if status in SHOWN_STATUSES or status in RETRIED_STATUSES:
            await self._show_safely(round_id)

    @commands.Cog.listener()
    async def on_hps_listening(self) -> None:
        pending = await rounds.rounds_to_show(self.bot.pool, CATCH_UP_WINDOW)
        if pending:
            log.info("catching up on %d round(s) changed while not listening", len(pending))
        for round_id in pending:
            await self._show_safely(round_id)

    async def _show_safely(self, round_id: int, attempt: int = 0) -> None:
        try:
            await self.show_round(round_id)
        except TRANSIENT as exc:
            if attempt >= len(SHOW_RETRY_SECONDS):
                log.error("could not show the round: %s", exc, extra={"round_id": round_id})
                return
            delay = SHOW_RETRY_SECONDS[attempt]
            log.warning(
                "could not show the round: %s; trying again in %d s",
                exc,
                delay,
                extra={"round_id": round_id},
            )
            task = asyncio.create_task(self._show_later(round_id, attempt + 1, delay))
            self._retries.add(task)
            task.add_done_callback(self._retries.discard)
        except UNAVAILABLE as exc:
            log.warning("could not show the round: %s", exc, extra={"round_id": round_id})
        except Exception:
            log.exception("could not show the round", extra={"round_id": round_id})

    async def _show_later(self, round_id: int, attempt: int, delay: float) -> None:
        await asyncio.sleep(delay)
        await self._show_safely(round_id, attempt)

    async def show_round(self, round_id: int) -> None:
        """Bring the round's message up to date with its status (ready, failed or closed;
        queued or generating over a message that still shows it failed)."""
        pool = self.bot.pool
        async with self._lock(round_id):
            view = await rounds.get_round_view(pool, round_id)
            if view is None:
                return
            r = view.round
            retried = r.status in RETRIED_STATUSES and r.shown_status == "failed"
            if (r.status not in SHOWN_STATUSES and not retried) or r.shown_status == r.status:
                return
            if r.channel_id is None or not self.bot.handles_guild(r.guild_id):
                return
            registering = datetime.now(UTC) - r.created_at < REGISTRATION_GRACE
            if r.message_id is None and round_id not in self._originals and registering:
                return  # its /dream is still registering the message, and shows it next
            content, ui, files = await self._render(view)
            try:
                await self._deliver(r, content, ui, files)
            except discord.Forbidden as exc:
                # No permission in that channel (any more): trying again at every catch-up
                # would not help, and would crowd out the rounds that can be shown.
                log.warning(
                    "no permission to show the round in its channel (%s): given up",
                    exc.text or exc.status,
                    extra={"round_id": round_id, "channel_id": r.channel_id},
                )
            await rounds.set_shown(pool, round_id, r.status)
        log.info("round shown", extra={"round_id": round_id, "status": r.status})

    async def _render(
        self, view: rounds.RoundView
    ) -> tuple[str, discord.ui.View | None, list[tuple[str, bytes]] | None]:
        """The message's text, buttons and (when not yet posted) image files."""
        r = view.round
        if r.status == "failed":
            return formats.failed(view), retry_view(r.id), []
        if r.status in RETRIED_STATUSES:
            return formats.retried(view), None, []
        positions = [image.position for image in view.images]
        if not positions:
            return formats.nothing_to_show(view), None, []
        choice = await requester_choice(self.bot.pool, r.id)
        chosen = (choice.verdict, choice.chosen_position) if choice else None
        ui = round_view(r.id, positions, chosen=chosen, closed=r.status == "closed")
        if r.status == "closed":
            content = formats.closed(view)
        else:
            others = self.bot.settings.limits.others_may_vote
            content = formats.ready(view, len(positions), others_may_vote=others)
        files = None
        if r.shown_status not in ("ready", "closed"):
            files = await self._image_files(view)
        return content, ui, files

    async def _image_files(self, view: rounds.RoundView) -> list[tuple[str, bytes]]:
        # Through the store (a folder or a bucket), all of a round's images at once.
        data = await asyncio.gather(*(self.bot.store.get_async(i.storage_key) for i in view.images))
        # Neutral names in the shown order: nothing tells which model made which image.
        files = [
            (f"{i + 1}{PurePosixPath(image.storage_key).suffix}", blob)
            for i, (image, blob) in enumerate(zip(view.images, data, strict=True))
        ]
        if self.bot.settings.generation.post_grid and len(files) > 1:
            grid = await asyncio.to_thread(imaging.make_grid, [blob for _, blob in files])
            files.append(("grid.png", grid))
        return files

    async def _deliver(
        self,
        r: rounds.Round,
        content: str,
        ui: discord.ui.View | None,
        files: list[tuple[str, bytes]] | None,
    ) -> None:
        def edits() -> dict[str, Any]:
            fields: dict[str, Any] = {"content": content, "view": ui}
            if files is not None:  # discord.py closes the files it sent: make them anew
                fields["attachments"] = [discord.File(io.BytesIO(d), n) for n, d in files]
            return fields

        extra = {"round_id": r.id}
        original = self._originals.pop(r.id, None)
        if original is not None and original.usable():
            try:
                await original.interaction.edit_original_response(**edits())
                return
            except discord.HTTPException as exc:
                log.info(
                    "the interaction token failed (%s); editing by id", exc.status, extra=extra
                )
        channel = self.bot.get_partial_messageable(r.channel_id, guild_id=r.guild_id)  # type: ignore[arg-type]
        if r.message_id is not None:
            try:
                await channel.get_partial_message(r.message_id).edit(**edits())
                return
            except discord.NotFound:
                log.info("the round's message is gone; posting a new one", extra=extra)
        new_files = edits().get("attachments")
        message = await channel.send(content, view=ui, files=new_files or None)
        await self._record_or_delete(
            message,
            messages.record_message(
                self.bot.pool, r.id, r.guild_id, message.channel.id, message.id
            ),
            r.id,
        )

    async def _record_or_delete(
        self, message: discord.Message, record: Awaitable[bool], round_id: int
    ) -> None:
        """Record a message just posted about a round (`record`: one of `db.messages`'
        recorders, which queue it for deletion instead if the round was forgotten meanwhile).
        If recording fails, the message is deleted at once: forgetting could never find it,
        and it shows the round and mentions its requester."""
        extra = {"round_id": round_id, "message_id": message.id}
        try:
            if not await record:
                log.info("the round is gone: its new message is queued for deletion", extra=extra)
        except BaseException:
            try:
                await message.delete()
            except (discord.HTTPException, aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.error(
                    "a message about a round could be neither recorded nor deleted (%s): "
                    "delete it by hand",
                    exc,
                    extra={**extra, "channel_id": message.channel.id},
                )
            raise

    # -- clicks ----------------------------------------------------------------------------

    async def on_click(
        self,
        interaction: discord.Interaction,
        round_id: int,
        verdict: Literal["pick", "tie", "none"],
        position: int | None,
        label: str | None,
    ) -> None:
        """A click on a round's button: record it, answer privately within Discord's 3 s."""
        settings = self.bot.settings
        extra = {"round_id": round_id, "user_id": interaction.user.id}
        try:
            async with asyncio.timeout(settings.bot.click_timeout_seconds):
                result = await record_choice(
                    self.bot.pool,
                    round_id=round_id,
                    discord_user_id=interaction.user.id,
                    verdict=verdict,
                    position=position,
                    others_may_vote=settings.limits.others_may_vote,
                    interaction_id=interaction.id,
                    open_for=timedelta(minutes=settings.limits.round_ttl_minutes),
                )
        except ChoiceRefused as exc:
            log.info("click refused: %s", exc.code, extra=extra)
            await interaction.response.send_message(str(exc), ephemeral=True)
            return
        except TimeoutError:
            log.warning("click timed out waiting for the database", extra=extra)
            await interaction.response.send_message(formats.CLICK_UNCERTAIN, ephemeral=True)
            return
        except UNAVAILABLE as exc:
            log.warning("click not recorded, database unavailable: %s", exc, extra=extra)
            await interaction.response.send_message(formats.CLICK_NOT_RECORDED, ephemeral=True)
            return
        text = formats.choice_confirmation(result, label)
        committed.record(interaction, text)
        if not result.choice.is_requester or result.outcome in ("unchanged", "stale"):
            await interaction.response.send_message(text, ephemeral=True)
            return
        # The requester's verdict is the training signal: show it on the message.
        positions = shown_positions(interaction.message, round_id)
        if positions is None:
            images = await images_of_round(self.bot.pool, round_id, include_nsfw=False)
            positions = [image.position for image in images]
        ui = round_view(round_id, positions, chosen=(verdict, position))
        try:
            await interaction.response.edit_message(view=ui)
        except discord.HTTPException as exc:  # the choice is recorded: say so all the same
            log.warning("could not highlight the choice (%s)", exc.status, extra=extra)
            await interaction.response.send_message(text, ephemeral=True)
            return
        await interaction.followup.send(text, ephemeral=True)
        if verdict == "pick" and position is not None:
            await self._post_full_size(interaction, round_id, position, label or str(position))
        log.info("requester chose", extra={**extra, "verdict": verdict, "position": position})

    async def _post_full_size(
        self, interaction: discord.Interaction, round_id: int, position: int, label: str
    ) -> None:
        shown = await images_of_round(self.bot.pool, round_id, include_nsfw=False)
        image = next((i for i in shown if i.position == position), None)
        if image is None:
            return
        data = await self.bot.store.get_async(image.storage_key)
        name = f"chosen{PurePosixPath(image.storage_key).suffix}"
        posted = await interaction.followup.send(
            formats.full_size(interaction.user.id, label),
            file=discord.File(io.BytesIO(data), name),
            wait=True,
        )
        # It shows the image and mentions the requester: forgetting them deletes it too.
        await self._record_or_delete(
            posted,
            messages.record_round_message(
                self.bot.pool,
                round_id,
                interaction.guild_id,
                posted.channel.id,
                posted.id,
                "chosen",
            ),
            round_id,
        )

    async def on_retry(self, interaction: discord.Interaction, round_id: int) -> None:
        """The Retry button of a failed round: the requester (or a maintainer) queues it again."""
        pool = self.bot.pool
        # The round's lock may be held while its message uploads images, and a retry takes
        # several queries: acknowledge within Discord's 3 s first, answer after.
        await interaction.response.defer()
        async with self._lock(round_id):
            view = await rounds.get_round_view(pool, round_id)
            if view is None:
                await reply(interaction, "This round no longer exists.")
                return
            maintainer = checks.is_maintainer(interaction)
            if interaction.user.id != view.requester_discord_id and not maintainer:
                await reply(
                    interaction, "Only the person who asked (or a maintainer) can retry this round."
                )
                return
            # A retry puts the round back in flight: the same rules as /dream, unless a
            # maintainer retries it.
            limits = rounds.Limits(in_flight=self.bot.settings.limits.rounds_in_flight)
            try:
                job = await rounds.retry_round(
                    pool, round_id, limits=None if maintainer else limits
                )
            except rounds.RoundRefused as refused:
                await reply(interaction, str(refused))
                return
            if job is None:
                await reply(interaction, "This round is not failed (any more): nothing to retry.")
                return
            committed.record(interaction, formats.ROUND_QUEUED_AGAIN)
            position = await jobs.queue_position(pool, job)
            await interaction.edit_original_response(
                content=formats.queued(view.prompt, view.negative_prompt, position, again=True),
                view=None,
            )
            # The click's token edits this message for the next 15 minutes.
            self._remember(round_id, interaction)
            await rounds.set_shown(pool, round_id, "queued")
        log.info("round retried", extra={"round_id": round_id, "job_id": job.id})


async def setup(bot: HPSBot) -> None:
    await bot.add_cog(Dream(bot))
