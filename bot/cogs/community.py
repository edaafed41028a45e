"""Commands for everyone: /score (HPS of uploaded images), /stats, /forget-me (and its
confirmation buttons); and deleting the bot's messages of forgotten users' rounds, whoever
forgot them (/forget-me, or `hps users forget`, which queues them in `message_deletions`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

import aiohttp
import discord
from discord import ButtonStyle, app_commands
from discord.ext import commands, tasks
from discord.ui import View

from bot import checks, committed, formats, imaging
from bot.buttons import ButtonCog, CogButton
from bot.client import HPSBot
from bot.replies import reply
from db import images, jobs, messages, stats, users
from db.connect import UNAVAILABLE, transaction
from db.locks import LockTimeout

log = logging.getLogger(__name__)

SCORE_KIND = "score"
FINISHED = ("done", "dead", "cancelled")
# Re-read a waited-for job this often, in case its NOTIFY was lost (a LISTEN reconnect).
POLL_SECONDS = 5.0
# Messages and image files whose deletion failed (Discord or the store unreachable) are
# tried again this often (once due: each failure backs off).
DELETION_RETRY_SECONDS = 60.0


def _score_cooldown(interaction: discord.Interaction) -> app_commands.Cooldown:
    per_minute = interaction.client.settings.bot.score_per_minute  # type: ignore[attr-defined]
    return app_commands.Cooldown(per_minute, 60.0)


class ForgetButton(
    CogButton["Community"], template=r"hps:forget:(?P<answer>yes|no):(?P<user_id>\d+)"
):
    """The confirmation of /forget-me, valid only for the user who asked."""

    def __init__(self, user_id: int, answer: str) -> None:
        yes = answer == "yes"
        super().__init__(
            f"hps:forget:{answer}:{user_id}",
            "Yes, delete my data" if yes else "No, keep it",
            ButtonStyle.danger if yes else ButtonStyle.secondary,
        )
        self.user_id = user_id
        self.answer = answer

    def handle(self, cog: Community, interaction: discord.Interaction) -> Awaitable[None]:
        return cog.on_forget_answer(interaction, self.user_id, self.answer == "yes")


def forget_view(user_id: int) -> View:
    view = View(timeout=None)
    view.add_item(ForgetButton(user_id, "yes"))
    view.add_item(ForgetButton(user_id, "no"))
    return view


class Community(ButtonCog):
    buttons = (ForgetButton,)

    def __init__(self, bot: HPSBot) -> None:
        self.bot: HPSBot = bot
        checks.servers_only(self.score, bot.settings.discord.dream_in_dms)
        self._job_waiters: dict[int, asyncio.Future[None]] = {}
        self._deleting = asyncio.Lock()
        self._finishing: set[asyncio.Task[None]] = set()  # forgets' deletions, after answering
        # One upload decoded at a time in this process: a decoded image may take
        # score_max_pixels × 4 bytes, and the bot's memory must stay small under many /score.
        self._decoding = asyncio.Semaphore(1)

    # -- /score ----------------------------------------------------------------------------

    @app_commands.command(
        description="Score your images for a prompt with HPS (higher = preferred)."
    )
    @app_commands.describe(
        prompt="The prompt the images are for",
        image="An image (PNG, JPEG, WebP or GIF)",
        image2="Another image",
        image3="Another image",
        image4="Another image",
    )
    @app_commands.checks.dynamic_cooldown(_score_cooldown)
    async def score(
        self,
        interaction: discord.Interaction,
        prompt: str,
        image: discord.Attachment,
        image2: discord.Attachment | None = None,
        image3: discord.Attachment | None = None,
        image4: discord.Attachment | None = None,
    ) -> None:
        if not checks.in_server(interaction, self.bot.settings.discord.dream_in_dms):
            await interaction.response.send_message(checks.SERVERS_ONLY, ephemeral=True)
            return
        limits = self.bot.settings.limits
        uploads = [a for a in (image, image2, image3, image4) if a is not None]
        try:
            prompt = checks.clean_prompt(prompt, limits)
            if len(uploads) > limits.score_max_images:
                raise imaging.UploadRejected(
                    f"At most {limits.score_max_images} images per /score, please."
                )
            for upload in uploads:
                imaging.check_attachment(upload.filename, upload.content_type, upload.size, limits)
        except (checks.PromptRejected, imaging.UploadRejected) as exc:
            log.info("refused /score: %s", exc, extra={"user_id": interaction.user.id})
            await interaction.response.send_message(str(exc), ephemeral=True)
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        try:
            checked = []
            for upload in uploads:
                data = await upload.read()
                async with self._decoding:
                    checked.append(
                        await asyncio.to_thread(imaging.check_image, upload.filename, data, limits)
                    )
        except imaging.UploadRejected as exc:
            log.info("refused /score: %s", exc, extra={"user_id": interaction.user.id})
            await interaction.edit_original_response(content=str(exc))
            return
        except discord.HTTPException:
            await interaction.edit_original_response(
                content="Downloading your images from Discord failed; please try again."
            )
            return

        store = self.bot.store
        blobs = await asyncio.gather(*(store.put_async(c.data, c.suffix) for c in checked))
        keys = [blob.key for blob in blobs]
        async with transaction(self.bot.pool) as conn:
            await images.hold_keys(conn, keys)
            # In case equal bytes were deleted meanwhile.
            await asyncio.gather(*(store.ensure_async(c.data, c.suffix) for c in checked))
            job, _ = await jobs.enqueue(
                conn,
                SCORE_KIND,
                {"prompt": prompt, "image_keys": keys},
                requested_by=f"discord:{interaction.user.id}",
                priority=1,  # someone is waiting for it
            )
        committed.record(interaction, formats.score_queued(job.id))
        log.info("score job enqueued", extra={"job_id": job.id, "user_id": interaction.user.id})
        finished = await self.wait_for_job(job.id, self.bot.settings.bot.score_timeout_seconds)
        cancelled = False
        if finished is None:
            cancelled = bool(await jobs.cancel(self.bot.pool, [job.id]))
            text = formats.score_timeout(job.id, cancelled)
            if cancelled:
                committed.record(interaction, text)
        elif finished.state == "done":
            text = formats.score_result(prompt, [u.filename for u in uploads], finished.result)
        else:
            text = formats.score_failed(finished)
        await interaction.edit_original_response(content=text)
        if finished is not None or cancelled:
            await self._delete_uploads(keys)

    async def wait_for_job(self, job_id: int, seconds: float) -> jobs.Job | None:
        """The job once finished, or None after `seconds`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        notified = self._job_waiters[job_id] = loop.create_future()
        try:
            while True:
                job = await jobs.get(self.bot.pool, job_id)
                if job is None or job.state in FINISHED:
                    return job
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return None
                try:
                    await asyncio.wait_for(asyncio.shield(notified), min(remaining, POLL_SECONDS))
                except TimeoutError:
                    pass
        finally:
            self._job_waiters.pop(job_id, None)

    @commands.Cog.listener()
    async def on_hps_job_done(self, job_id: int, kind: str, state: str) -> None:
        waiter = self._job_waiters.get(job_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _delete_uploads(self, keys: list[str]) -> None:
        """Scored uploads are not kept, unless a round's image has the same bytes."""
        try:
            await images.delete_unreferenced(self.bot.pool, keys, self.bot.store.delete)
        except LockTimeout as exc:  # the files stay; nothing references them
            log.warning("could not delete scored uploads: %s", exc)

    # -- /stats ----------------------------------------------------------------------------

    @app_commands.command(description="Your rounds and choices, and the community's totals.")
    # It counts whole tables: a cooldown keeps anyone from turning it into a load test.
    @app_commands.checks.cooldown(1, 10.0)
    async def stats(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)  # whole-table counts
        mine = await stats.user_stats(self.bot.pool, interaction.user.id)
        totals = await stats.totals(self.bot.pool)
        await reply(interaction, formats.user_stats(mine, totals))

    # -- /forget-me ------------------------------------------------------------------------

    @app_commands.command(name="forget-me", description="Delete your rounds and choices.")
    async def forget_me(self, interaction: discord.Interaction) -> None:
        await interaction.response.send_message(
            formats.FORGET_PROMPT, view=forget_view(interaction.user.id), ephemeral=True
        )

    async def on_forget_answer(
        self, interaction: discord.Interaction, user_id: int, confirmed: bool
    ) -> None:
        if interaction.user.id != user_id:
            await interaction.response.send_message(formats.NOT_YOURS, ephemeral=True)
            return
        if not confirmed:
            await interaction.response.edit_message(content="Nothing was deleted.", view=None)
            return
        await interaction.response.defer()  # forgetting a prolific user may take a while
        try:
            result = await users.forget_user(self.bot.pool, user_id)
        except LockTimeout as exc:
            log.warning("could not forget a user: %s", exc)
            await interaction.edit_original_response(content=formats.FORGET_BUSY, view=None)
            return
        if result is None:
            await interaction.edit_original_response(
                content="We hold no data about you.", view=None
            )
            return
        committed.record(
            interaction, formats.forgotten_rows(result.choices_deleted, result.rounds_deleted)
        )
        log.info(
            "user forgotten",
            extra={
                "user_id": result.user_id,
                "rounds": result.rounds_deleted,
                "files": len(result.orphaned_image_keys),
                "messages": result.messages_queued,
            },
        )
        # Answer from what is committed and queued, at once: deleting the files and the
        # messages may take longer than the interaction lives (a prolific user, Discord or
        # the store failing). The answer is brought up to date when they are done.
        await interaction.edit_original_response(
            content=formats.forgetting(
                result.choices_deleted,
                result.rounds_deleted,
                len(result.orphaned_image_keys),
                result.messages_queued,
            ),
            view=None,
        )
        if result.orphaned_image_keys or result.message_deletions:
            task = asyncio.create_task(self._finish_forget(interaction, result))
            self._finishing.add(task)
            task.add_done_callback(self._finishing.discard)

    async def _finish_forget(
        self, interaction: discord.Interaction, result: users.ForgetResult
    ) -> None:
        """Delete this forget's files and messages (only theirs), then say what is done."""
        pool, keys = self.bot.pool, result.orphaned_image_keys
        try:
            sweep = await images.delete_pending(pool, self.bot.store.delete, keys=keys)
            files_left = await images.pending_deletions(pool, keys)
            left = await self.delete_queued_messages(only=list(result.message_deletions))
        except UNAVAILABLE as exc:  # all recorded: the retry loop finishes the work
            log.warning("could not finish deleting a forgotten user's files: %s", exc)
            return
        except Exception:
            log.exception("could not finish deleting a forgotten user's files and messages")
            return
        text = formats.forgotten(
            result.choices_deleted,
            result.rounds_deleted,
            sweep.deleted,
            files_left,
            result.messages_queued,
            messages_left=left.pending,
            messages_given_up=left.given_up,
        )
        try:
            await interaction.edit_original_response(content=text)
        except discord.HTTPException as exc:  # the token expired: the first answer stays
            log.info("could not update the answer to /forget-me (%s)", exc.status)

    # -- deleting forgotten rounds' messages and files ---------------------------------------

    async def cog_load(self) -> None:
        await super().cog_load()
        self._retry_deletions.start()

    async def cog_unload(self) -> None:
        self._retry_deletions.cancel()
        for task in self._finishing:
            task.cancel()
        await super().cog_unload()

    @commands.Cog.listener()
    async def on_hps_messages(self) -> None:
        await self.delete_queued_messages()

    @commands.Cog.listener()
    async def on_hps_listening(self) -> None:
        # Forgotten while no bot listened (`hps users forget` with the bot down).
        await self.delete_queued_messages()
        await self.delete_pending_files()

    @tasks.loop(seconds=DELETION_RETRY_SECONDS)
    async def _retry_deletions(self) -> None:
        # The bot always runs and always has the store: it finishes what forgets could not,
        # whoever forgot (/forget-me, or `hps users forget` while the store or Discord failed).
        try:
            await self.delete_queued_messages()
            await self.delete_pending_files()
        except Exception:  # an error must not end the loop (tasks.loop stops on one)
            log.exception("deleting forgotten rounds' messages or files failed; trying again later")

    async def delete_pending_files(self) -> int:
        """Delete the image files forgets left to delete (`image_deletions`) that are due;
        returns how many were deleted. Failures stay pending, tried again with backoff."""
        try:
            return (await images.delete_pending(self.bot.pool, self.bot.store.delete)).deleted
        except UNAVAILABLE as exc:
            log.warning("could not read the image files to delete: %s", exc)
            return 0

    async def delete_queued_messages(self, only: list[int] | None = None) -> messages.Left:
        """Delete the queued messages of forgotten rounds on Discord (`only`: those of these
        queued rows), and say what is left of them. One pass at a time in this process;
        claims keep other processes apart. A failure Discord may get over ends the pass (the
        retry loop tries again after a backoff); one it refuses for good is given up."""
        try:
            async with self._deleting:
                while claimed := await messages.claim_deletions(self.bot.pool, only=only):
                    if not await self._delete_each(claimed):
                        break  # Discord is failing: tried again later
                return await messages.left(self.bot.pool, only)
        except UNAVAILABLE as exc:
            log.warning("could not read the messages to delete: %s", exc)
            return messages.Left(pending=-1, given_up=0)

    async def _delete_each(self, claimed: list[messages.Deletion]) -> bool:
        """Delete the claimed messages in turn; at the first failure worth trying again,
        stop and hand the others back untried. False if it stopped."""
        for i, deletion in enumerate(claimed):
            if not await self._delete(deletion):
                await messages.release(self.bot.pool, [d.id for d in claimed[i + 1 :]])
                return False
        return True

    async def _delete(self, deletion: messages.Deletion) -> bool:
        """Delete one message; False if it failed in a way worth trying again."""
        channel = self.bot.get_partial_messageable(deletion.channel_id, guild_id=deletion.guild_id)
        extra = {
            "channel_id": deletion.channel_id,
            "message_id": deletion.message_id,
            "attempts": deletion.attempts,
        }
        try:
            await channel.get_partial_message(deletion.message_id).delete()
        except discord.NotFound:
            pass  # deleted already (by a moderator, or an earlier try)
        except discord.HTTPException as exc:
            error = f"{exc.status} {exc.text or exc}"[:500]
            if 400 <= exc.status < 500 and exc.status != 429:
                # Discord refuses for good (the bot lost access to the channel, the thread
                # is archived): trying again cannot help. Left for a moderator.
                log.warning(
                    "cannot delete a forgotten round's message (%s): given up", error, extra=extra
                )
                await messages.gave_up(self.bot.pool, deletion.id, error)
                return True
            return await self._failed(deletion, error, extra)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return await self._failed(deletion, f"{type(exc).__name__}: {exc}"[:500], extra)
        await messages.deleted(self.bot.pool, deletion.id)
        return True

    async def _failed(self, deletion: messages.Deletion, error: str, extra: dict) -> bool:  # type: ignore[type-arg]
        if await messages.failed(self.bot.pool, deletion.id, error):
            log.warning(
                "deleting a forgotten round's message failed %d times (%s): given up",
                deletion.attempts,
                error,
                extra=extra,
            )
        else:
            log.warning(
                "deleting a forgotten round's message failed (%s); trying again later",
                error,
                extra=extra,
            )
        return False


async def setup(bot: HPSBot) -> None:
    await bot.add_cog(Community(bot))
