"""Maintainer commands: retraining, the platform's status, the model registry, bans.

Two guards, because Discord's default permissions are only a hint that a server's admins
can override: every command is hidden by `default_permissions(manage_guild=True)`, and the
cog's `interaction_check` requires one of `discord.maintainer_role_ids` (with none set,
nobody is a maintainer). Everyone else gets a private refusal and nothing happens.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot import checks, formats
from bot.client import HPSBot
from bot.replies import reply
from db import jobs, services, stats, users
from db import models as registry
from db.connect import UNAVAILABLE
from db.locks import LockTimeout
from db.promotion import check_promotable, configured_label
from db.scorers import latest_agreement

log = logging.getLogger(__name__)

TRAINING_JOB_KINDS = set(jobs.TRAINING_KINDS.values())
SERVED_KINDS = ("classifier", "sd_base", "sd_adapter")


def _actor(interaction: discord.Interaction) -> str:
    return f"discord:{interaction.user.id}"


class Maintainers(commands.Cog):
    def __init__(self, bot: HPSBot) -> None:
        self.bot = bot

    async def interaction_check(self, interaction: discord.Interaction) -> bool:  # type: ignore[override]
        if not checks.is_maintainer(interaction):
            raise checks.NotMaintainer()
        # Every command here reads or changes several tables: answer Discord's 3 s deadline
        # with "thinking…" first (privately), and the command's text replaces it.
        await interaction.response.defer(ephemeral=True, thinking=True)
        return True

    @app_commands.command(
        description="Retrain the HPS classifier, re-adapt Stable Diffusion, or both."
    )
    @app_commands.describe(target="What to train (default: both)")
    @app_commands.default_permissions(manage_guild=True)
    @app_commands.guild_only()
    async def retrain(
        self,
        interaction: discord.Interaction,
        target: Literal["classifier", "sd", "both"] = "both",
    ) -> None:
        targets = ["classifier", "sd"] if target == "both" else [target]
        try:
            enqueued = [
                await jobs.enqueue_training(self.bot.pool, t, requested_by=_actor(interaction))
                for t in targets
            ]
        except LockTimeout as exc:  # another session holds the queue's lock: say who
            log.warning("/retrain: %s", exc)
            await reply(interaction, f"Could not queue the training: {exc}")
            return
        for job, created in enqueued:
            log.info(
                "training requested",
                extra={"job_id": job.id, "job_kind": job.kind, "job_created": created},
            )
        await reply(interaction, formats.retrain(enqueued))

    @commands.Cog.listener()
    async def on_hps_job_done(self, job_id: int, kind: str, state: str) -> None:
        """Post a finished training job's outcome to the log channel."""
        if kind in TRAINING_JOB_KINDS:
            await self._announce_jobs(job_id)

    @commands.Cog.listener()
    async def on_hps_listening(self) -> None:
        """What happened while no bot listened (a restart, an outage): training outcomes and
        the registry's promotions, retirements and rollbacks."""
        await self._announce_jobs(None)
        await self._announce_models(None)

    async def _announce_jobs(self, job_id: int | None) -> None:
        """Claim and post outcomes nobody posted yet (only `job_id`'s, if given): the claim
        in the database makes each be posted once, by one bot process."""
        channel_id = self.bot.settings.discord.log_channel_id
        if channel_id is None:
            return
        try:
            claimed = await jobs.claim_announcements(
                self.bot.pool, sorted(TRAINING_JOB_KINDS), job_id=job_id
            )
        except UNAVAILABLE as exc:
            log.warning("could not read the outcomes to post: %s", exc)
            return
        for job in claimed:
            try:
                await self.bot.get_partial_messageable(channel_id).send(
                    formats.training_outcome(job)
                )
            except discord.HTTPException:
                log.exception("could not post to the log channel", extra={"job_id": job.id})
                await jobs.unannounce(self.bot.pool, job.id)
                continue
            log.info("training outcome posted", extra={"job_id": job.id, "job_state": job.state})

    @commands.Cog.listener()
    async def on_hps_model_event(self, event: dict[str, Any]) -> None:
        """Post every promotion, retirement and rollback (by anyone: the automatic review,
        a job's offline gate, /promote, the CLI) to the log channel."""
        await self._announce_models(event.get("event_id"))

    async def _announce_models(self, event_id: int | None) -> None:
        """Claim and post the registry's notices nobody posted yet (only `event_id`'s, if
        given): each is posted once, by one bot process, also after a downtime."""
        channel_id = self.bot.settings.discord.log_channel_id
        if channel_id is None:
            return
        try:
            notices = await registry.claim_notices(self.bot.pool, event_id=event_id)
        except UNAVAILABLE as exc:
            log.warning("could not read the registry's notices to post: %s", exc)
            return
        for notice in notices:
            extra = {"model_version_id": notice.get("version_id"), "action": notice.get("action")}
            try:
                await self.bot.get_partial_messageable(channel_id).send(formats.model_event(notice))
            except discord.HTTPException:
                log.exception("could not post to the log channel", extra=extra)
                await registry.unannounce_notice(self.bot.pool, notice["event_id"])
                continue
            log.info("model event posted", extra=extra)

    @app_commands.command(
        description="Queue, workers, serving models, last training, recent choices."
    )
    @app_commands.default_permissions(manage_guild=True)
    @app_commands.guild_only()
    async def status(self, interaction: discord.Interaction) -> None:
        pool = self.bot.pool
        serving = {kind: await registry.serving(pool, kind) for kind in SERVED_KINDS}
        last = []  # the classifier's and SD's latest outcomes
        for kind in jobs.TRAINING_KINDS.values():
            finished = await jobs.list_jobs(pool, kind=kind, limit=5)
            last += [j for j in finished if j.state in ("done", "dead")][:1]
        # The serving adapter and those in A/B testing, with offline and live numbers.
        adapters = await registry.testing(pool, "sd_adapter")
        if serving["sd_adapter"] is not None:
            adapters.insert(0, serving["sd_adapter"])
        live = await stats.live_records(pool, adapters)
        settings = self.bot.settings
        lease = timedelta(seconds=settings.worker.lease_seconds)
        workers = await services.live_workers(pool, lease)
        stale = timedelta(seconds=settings.health.stale_seconds)
        schedulers = await services.list_services(pool, "scheduler", stale)
        warnings = formats.liveness_warnings(
            sum("generate" in kinds for _, kinds, _ in workers),
            sum(s.alive for s in schedulers),
            lease,
            settings.limits.queued_round_minutes,
        )
        text = formats.status(
            await stats.queue_depth(pool),
            await jobs.list_workers(pool),
            serving,
            last,
            await stats.choices_since(pool, timedelta(hours=24)),
            datetime.now(UTC),
            [(v, live.get(v.id)) for v in adapters],
            warnings,
        )
        await reply(interaction, text)

    @app_commands.command(description="Model versions with their metrics.")
    @app_commands.describe(kind="Only this kind of model")
    @app_commands.default_permissions(manage_guild=True)
    @app_commands.guild_only()
    async def models(
        self,
        interaction: discord.Interaction,
        kind: Literal["classifier", "sd_base", "sd_adapter"] | None = None,
    ) -> None:
        versions = await registry.list_versions(self.bot.pool, kind)
        live = await stats.live_records(self.bot.pool, versions)
        await reply(interaction, formats.models(versions, live))

    @app_commands.command(
        description="Which reward models agree most with our choices (the latest hps eval)."
    )
    @app_commands.default_permissions(manage_guild=True)
    @app_commands.guild_only()
    async def scorers(self, interaction: discord.Interaction) -> None:
        rows = await latest_agreement(self.bot.pool)
        await reply(interaction, formats.scorer_agreement(rows))

    @app_commands.command(description="Serve a model version (the one it replaces is retired).")
    @app_commands.describe(
        version="Version name or id",
        force="Serve a classifier even if it did not beat the serving one on the same test",
    )
    @app_commands.default_permissions(manage_guild=True)
    @app_commands.guild_only()
    async def promote(
        self, interaction: discord.Interaction, version: str, force: bool = False
    ) -> None:
        margin = self.bot.settings.train.promote_margin
        configured = configured_label(self.bot.settings)
        try:
            done = await registry.promote(
                self.bot.pool,
                version.strip(),
                actor=_actor(interaction),
                gate=None if force else (lambda v, s: check_promotable(v, s, margin, configured)),
            )
        except registry.ModelError as exc:
            await reply(interaction, str(exc))
            return
        assert done.promoted is not None
        text = f"`{done.promoted.name}` is now serving"
        text += f"; `{done.retired.name}` was retired." if done.retired else "."
        log.info("promoted %s", done.promoted.name, extra={"model_version_id": done.promoted.id})
        await reply(interaction, text)

    @app_commands.command(
        description="Stop serving the current version of a kind; serve the previous one."
    )
    @app_commands.describe(kind="Which kind of model to roll back")
    @app_commands.default_permissions(manage_guild=True)
    @app_commands.guild_only()
    async def rollback(
        self,
        interaction: discord.Interaction,
        kind: Literal["classifier", "sd_base", "sd_adapter"],
    ) -> None:
        try:
            done = await registry.rollback(self.bot.pool, kind, actor=_actor(interaction))
        except registry.ModelError as exc:
            await reply(interaction, str(exc))
            return
        assert done.retired is not None
        restored = f"`{done.promoted.name}` serves again" if done.promoted else "none serves now"
        log.info("rolled back %s", done.retired.name, extra={"model_version_id": done.retired.id})
        await reply(interaction, f"Rolled back `{done.retired.name}`; {restored}.")

    @app_commands.command(
        description="Ban a user from /dream and voting (shadow: votes kept but flagged)."
    )
    @app_commands.describe(user="Who", shadow="Accept their clicks silently, flagged", reason="Why")
    @app_commands.default_permissions(manage_guild=True)
    @app_commands.guild_only()
    async def ban(
        self,
        interaction: discord.Interaction,
        user: discord.User,
        shadow: bool = False,
        reason: str | None = None,
    ) -> None:
        await users.ban(
            self.bot.pool, user.id, shadow=shadow, reason=reason, actor=_actor(interaction)
        )
        kind = "Shadow-banned" if shadow else "Banned"
        log.info("%s user", kind.lower(), extra={"user_id": user.id})
        await reply(interaction, f"{kind} {user.mention}.")

    @app_commands.command(description="Lift a user's ban.")
    @app_commands.default_permissions(manage_guild=True)
    @app_commands.guild_only()
    async def unban(self, interaction: discord.Interaction, user: discord.User) -> None:
        lifted = await users.unban(self.bot.pool, user.id)
        text = (
            f"{user.mention} may dream and vote again."
            if lifted
            else f"{user.mention} is unknown here."
        )
        log.info("unbanned user", extra={"user_id": user.id})
        await reply(interaction, text)


async def setup(bot: HPSBot) -> None:
    await bot.add_cog(Maintainers(bot))
