"""Maintainer commands end to end: guarded twice, and they change what they say."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import asyncpg
import pytest

from bot import formats
from bot.fake_discord import EPHEMERAL, MANAGE_GUILD, FakeDiscord, FakeUser
from db import jobs, scorers, services, users
from db import models as registry
from tests.e2e.conftest import (
    ALICE,
    BOB,
    CHANNEL_ID,
    LOG_CHANNEL_ID,
    MAINTAINER,
    dream,
    wait_buttons,
)
from tests.e2e.worker import TestWorker

MAINTAINER_COMMANDS = {
    "retrain", "status", "models", "scorers", "promote", "rollback", "ban", "unban",
}  # fmt: skip
LEASE = timedelta(minutes=1)
REFUSAL = "This command is for maintainers only. Nothing was changed."


async def _answer(fake: FakeDiscord, user: FakeUser, name: str, options: dict | None = None) -> str:
    """What the user is finally shown, privately (maintainers' commands defer first)."""
    interaction = await fake.slash(user, name, options or {}, channel_id=CHANNEL_ID)
    message = await interaction.answer()
    assert message["flags"] & EPHEMERAL
    return message["content"]


async def test_commands_are_synced_with_maintainer_commands_hidden_by_default(
    bot, fake: FakeDiscord
) -> None:
    [sync] = fake.calls("PUT", f"/applications/{fake.application_id}/guilds/")
    synced = {c["name"]: c for c in sync.json}
    assert set(synced) == MAINTAINER_COMMANDS | {"dream", "score", "stats", "forget-me"}
    for name in MAINTAINER_COMMANDS:
        assert int(synced[name]["default_member_permissions"]) == MANAGE_GUILD
    assert synced["dream"]["default_member_permissions"] is None
    options = {o["name"]: o for o in synced["dream"]["options"]}
    assert options["prompt"]["required"] and not options["seed"]["required"]
    assert [c["value"] for c in options["aspect"]["choices"]] == ["square", "portrait", "landscape"]


async def test_non_maintainers_are_refused_and_nothing_happens(
    bot, fake: FakeDiscord, pool: asyncpg.Pool
) -> None:
    # Manage Server is not enough once maintainer roles are configured.
    admin = FakeUser(730000000000000001, "admin", permissions=MANAGE_GUILD)
    for user in (ALICE, admin):
        assert await _answer(fake, user, "retrain", {"target": "both"}) == REFUSAL
        assert await _answer(fake, user, "ban", {"user": BOB}) == REFUSAL
        assert await _answer(fake, user, "status") == REFUSAL
    assert await pool.fetchval("SELECT count(*) FROM jobs") == 0
    assert await pool.fetchval("SELECT count(*) FROM users") == 0


async def test_without_maintainer_roles_nobody_is_a_maintainer(
    make_bot, fake: FakeDiscord, pool: asyncpg.Pool
) -> None:
    """Not even a server admin: the bot may be in servers whose admins must not act on the
    whole platform."""
    await make_bot(discord={"maintainer_role_ids": []})
    assert await _answer(fake, MAINTAINER, "retrain", {"target": "sd"}) == REFUSAL
    admin = FakeUser(730000000000000001, "admin", permissions=MANAGE_GUILD)
    assert await _answer(fake, admin, "retrain", {"target": "sd"}) == REFUSAL
    assert await jobs.list_jobs(pool) == []


async def test_retrain_enqueues_one_job_and_posts_the_outcome_to_the_log_channel(
    bot, fake: FakeDiscord, pool: asyncpg.Pool
) -> None:
    text = await _answer(fake, MAINTAINER, "retrain", {"target": "classifier"})
    [job] = await jobs.list_jobs(pool)
    assert (job.kind, job.state, job.requested_by) == (
        "train_classifier",
        "queued",
        f"discord:{MAINTAINER.id}",
    )
    assert text == (
        f"Queued `train_classifier` as job {job.id}.\n"
        "The outcome will be posted in the log channel."
    )
    again = await _answer(fake, MAINTAINER, "retrain", {"target": "classifier"})
    assert again.startswith(f"A `train_classifier` job is already queued: job {job.id}.")
    assert len(await jobs.list_jobs(pool)) == 1

    # A worker finishes it: the outcome goes to the log channel.
    [claimed] = await jobs.claim(pool, ["train_classifier"], "w1", lease=LEASE)
    result = {
        "summary": "trained on 1200 choices; test accuracy 0.4410 (serving: 0.4210)",
        "metrics": {"accuracy": 0.441, "choices": 1200},
        "promoted": True,
    }
    assert await jobs.complete(pool, claimed, "w1", result)
    posted = await fake.wait_for(lambda: fake.channel_messages(LOG_CHANNEL_ID))
    assert [m["content"] for m in posted] == [
        f"`train_classifier` job {job.id} **done**: trained on 1200 choices; "
        "test accuracy 0.4410 (serving: 0.4210)\n"
        "metrics: accuracy=0.441, choices=1200\n"
        "promoted: yes"
    ]

    # `both` enqueues the missing one only; a dead job's error is posted too.
    both = await _answer(fake, MAINTAINER, "retrain", {"target": "both"})
    adapt = [j for j in await jobs.list_jobs(pool) if j.kind == "adapt_sd"]
    assert len(adapt) == 1 and f"Queued `adapt_sd` as job {adapt[0].id}." in both
    assert f"Queued `train_classifier` as job {adapt[0].id - 1}." in both
    [claimed] = await jobs.claim(pool, ["adapt_sd"], "w1", lease=LEASE)
    await jobs.fail(pool, claimed, "w1", "CUDA error: out of memory", retry=False)
    await fake.wait_for(lambda: len(fake.channel_messages(LOG_CHANNEL_ID)) == 2)
    assert fake.channel_messages(LOG_CHANNEL_ID)[1]["content"] == (
        f"`adapt_sd` job {adapt[0].id} **dead**: CUDA error: out of memory"
    )


async def test_outcomes_finished_while_no_bot_listened_are_posted_once_on_start(
    make_bot, fake: FakeDiscord, pool: asyncpg.Pool
) -> None:
    """The NOTIFY of a job that finished while the bot was down is gone: the bot looks for
    unposted outcomes when it listens, and two bot processes never post one twice."""
    job, _ = await jobs.enqueue_training(pool, "classifier", requested_by="test")
    [claimed] = await jobs.claim(pool, ["train_classifier"], "w1", lease=LEASE)
    assert await jobs.complete(pool, claimed, "w1", {"summary": "trained while you slept"})
    version = await registry.register(pool, kind="classifier", artifact="/m/c9")
    await registry.promote(pool, version.id, actor="cli:ops", reason="by hand")
    first = await make_bot()
    await make_bot()  # another process (shards split), listening too
    posted = await fake.wait_for(
        lambda: (
            len(fake.channel_messages(LOG_CHANNEL_ID)) == 2
            and fake.channel_messages(LOG_CHANNEL_ID)
        )
    )
    assert sorted(m["content"] for m in posted) == [
        f"`classifier-{version.id}` (classifier) **promoted** by cli:ops: by hand",
        f"`train_classifier` job {job.id} **done**: trained while you slept",
    ]
    await first.listener.stop()  # a reconnect catches up again: nothing new to post
    first.listener.start()
    await asyncio.wait_for(first.listener.listening.wait(), 10)
    await asyncio.sleep(0.5)
    assert len(fake.channel_messages(LOG_CHANNEL_ID)) == 2
    assert (await jobs.get(pool, job.id)).announced_at is not None


async def test_status_and_models_report_the_platform(
    bot, fake: FakeDiscord, pool: asyncpg.Pool, worker: TestWorker
) -> None:
    _, queued = await dream(fake, ALICE, "a status check")
    # Nothing alive: /status says so first.
    alone = await _answer(fake, MAINTAINER, "status")
    assert alone.startswith(
        "⚠️ **No worker is alive** that generates images (no heartbeat within 2m 00s): "
        "/dream rounds wait and fail after 60 minutes.\n"
        "⚠️ **No scheduler is alive**: rounds are not closed or given up on time, and no "
        "training is scheduled.\n**Queue**"
    )
    await jobs.register_worker(pool, "gpu-1:42", ["generate"], "cuda:0")
    await services.heartbeat(pool, "scheduler", {})
    base = await registry.ensure_base(pool, kind="sd_base", artifact="tiny-sd")
    classifier = await registry.register(
        pool, kind="classifier", artifact="/m/c1", metrics={"accuracy": 0.4321}
    )
    text = await _answer(fake, MAINTAINER, "status")
    assert text.startswith("**Queue**\n- `generate`: queued 1")
    assert "- `gpu-1:42` (cuda:0, job -): last heartbeat " in text
    assert f"- sd_base: {base.name}" in text and "- classifier: none" in text
    assert "**Last training**\n- none yet" in text
    assert text.endswith("**Choices in the last 24 h**: 0")

    await worker.run_once()
    await wait_buttons(fake, int(queued["id"]), 6)
    listing = await _answer(fake, MAINTAINER, "models", {"kind": "classifier"})
    assert listing == f"- `{classifier.name}` (classifier, candidate): accuracy=0.4321"

    # Unevaluated, a classifier is not served (the gate of `hps models promote` too)...
    refused = await _answer(fake, MAINTAINER, "promote", {"version": classifier.name})
    assert refused == (
        f"{classifier.name} was not evaluated against the configured model "
        f"(configured:ViT-L-14 pretrained=openai): run `hps eval --model {classifier.name}` "
        "first (or force the promotion)"
    )
    assert await registry.serving(pool, "classifier") is None
    # ...unless the maintainer forces it.
    promoted = await _answer(
        fake, MAINTAINER, "promote", {"version": classifier.name, "force": True}
    )
    assert promoted == f"`{classifier.name}` is now serving."
    assert (await registry.serving(pool, "classifier")).id == classifier.id
    unknown = await _answer(fake, MAINTAINER, "promote", {"version": "nope"})
    assert unknown == "Unknown model version 'nope'."
    rolled = await _answer(fake, MAINTAINER, "rollback", {"kind": "classifier"})
    assert rolled == f"Rolled back `{classifier.name}`; none serves now."
    assert await registry.serving(pool, "classifier") is None
    nothing = await _answer(fake, MAINTAINER, "rollback", {"kind": "classifier"})
    assert nothing == "No classifier version is serving; nothing to roll back."


def _report(top1: float, pairwise: float, model: str) -> dict:
    return {"model": model, "scale": "s", "examples": "abc", "n": 40, "ties": 2, "top1": top1,
            "top1_ci": [top1 - 0.1, top1 + 0.1], "chance": 0.25, "pairwise": pairwise,
            "pairwise_ci": [pairwise - 0.05, pairwise + 0.05], "pairwise_n": 120}  # fmt: skip


async def test_scorers_shows_the_latest_agreement_table(
    bot, fake: FakeDiscord, pool: asyncpg.Pool
) -> None:
    empty = await _answer(fake, MAINTAINER, "scorers")
    assert empty.startswith("No reward model has been compared with the choices yet")
    await scorers.record_agreement(pool, source="choices", split="test",
                                   reports={"hps": _report(0.3, 0.6, "old")})  # fmt: skip
    await scorers.record_agreement(
        pool, source="choices", split="test",
        reports={"pickscore": _report(0.45, 0.7, "PickScore (p)"), "hps": _report(0.4, 0.65, "c1")},
    )  # fmt: skip
    text = await _answer(fake, MAINTAINER, "scorers")
    lines = text.splitlines()
    assert lines[0].startswith("**Agreement with people's choices** (the choices, test split, ")
    assert lines[1:] == [
        "- **pickscore** (`PickScore (p)`): top-1 45.0% [35.0%–55.0%] of 40 (chance 25.0%); "
        "pairwise 70.0% [65.0%–75.0%] of 120 pairs (chance 50%)",
        "- **hps** (`c1`): top-1 40.0% [30.0%–50.0%] of 40 (chance 25.0%); pairwise "
        "65.0% [60.0%–70.0%] of 120 pairs (chance 50%)",
    ]
    assert await _answer(fake, BOB, "scorers") == REFUSAL


async def test_bans_stop_dreams_and_shadow_bans_flag_votes(
    bot, fake: FakeDiscord, pool: asyncpg.Pool, worker: TestWorker
) -> None:
    _, queued = await dream(fake, ALICE, "a shadowy figure")
    message_id = int(queued["id"])
    await worker.run_once()
    await wait_buttons(fake, message_id, 6)
    round_id = await pool.fetchval("SELECT id FROM rounds")

    text = await _answer(fake, MAINTAINER, "ban", {"user": BOB, "reason": "spam"})
    assert text == f"Banned <@{BOB.id}>."
    assert await _answer(fake, BOB, "dream", {"prompt": "x"}) == (
        "You are not allowed to start rounds here."
    )
    click = await fake.click(BOB, message_id, f"hps:pick:{round_id}:1")
    assert (await click.wait_response())["data"]["content"] == "You are not allowed to vote here."

    text = await _answer(fake, MAINTAINER, "ban", {"user": BOB, "shadow": True})
    assert text == f"Shadow-banned <@{BOB.id}>."
    click = await fake.click(BOB, message_id, f"hps:pick:{round_id}:1")
    # Looks normal to them, stored flagged.
    assert (await click.wait_response())["data"]["content"] == (
        "Recorded: you chose image 1. Thank you!"
    )
    assert await pool.fetchval("SELECT flagged FROM choices") is True

    assert await _answer(fake, MAINTAINER, "unban", {"user": BOB}) == (
        f"<@{BOB.id}> may dream and vote again."
    )
    user = await users.get_user(pool, BOB.id)
    assert user is not None and not user.banned and not user.shadow_banned
    stranger = FakeUser(740000000000000001, "stranger")
    assert await _answer(fake, MAINTAINER, "unban", {"user": stranger}) == (
        f"<@{stranger.id}> is unknown here."
    )


async def test_a_retrain_that_fails_after_queueing_says_what_it_queued(
    bot, fake: FakeDiscord, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The jobs are committed when the reply fails to be made: the maintainer is told what
    is queued, not that nothing changed."""

    def broken(enqueued: object) -> str:
        raise RuntimeError("the reply could not be formatted")

    monkeypatch.setattr(formats, "retrain", broken)
    text = await _answer(fake, MAINTAINER, "retrain", {"target": "both"})
    classifier, adapt = sorted(await jobs.list_jobs(pool), key=lambda j: j.id)
    assert (classifier.kind, adapt.kind) == ("train_classifier", "adapt_sd")
    assert text == (
        f"Queued `train_classifier` as job {classifier.id}.\n"
        f"Queued `adapt_sd` as job {adapt.id}.\n"
        "That much is done; after it, something went wrong on our side (it has been logged)."
    )

    # Both or neither: a failure while queueing leaves nothing queued, and says so.
    await jobs.cancel(pool, [classifier.id, adapt.id])
    real_enqueue = jobs.enqueue_training

    async def fails_for_sd(db, target, **options):  # type: ignore[no-untyped-def]
        if target == "sd":
            raise RuntimeError("the second enqueue failed")
        return await real_enqueue(db, target, **options)

    monkeypatch.setattr(jobs, "enqueue_training", fails_for_sd)
    text = await _answer(fake, MAINTAINER, "retrain", {"target": "both"})
    assert text == "Something went wrong on our side; it has been logged. Nothing was changed."
    assert [j.state for j in await jobs.list_jobs(pool)] == ["cancelled", "cancelled"]
