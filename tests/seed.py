"""A small, fixed example of a running platform, for the analysts' docs and the report.

Built through the data layer; only timestamps are then set by hand, so that results do not
depend on the day the tests run. Three days of November 2026:

- day 1: 4 rounds by the base model, now closed; requesters pick, one says "none of
  these"; two other users vote.
- day 2: 6 A/B rounds (2 images by the base, 2 by adapter `sd_adapter-ab`); requesters pick
  the adapter's image in 4, the base's in 1, and can't decide in 1; a shadow-banned user
  votes (flagged).
- day 3: 2 A/B rounds (1 win each way), 1 failed round, 1 round still queued.
- two classifier versions with recorded test metrics; HPS scores on every shown image:
  day 1's by `classifier-a` (serving then), the others by `classifier-b` (serving now).

Discord ids are realistic 18-digit snowflakes (users, guild, channel, messages, every
click's interaction id; a ban reason mentions a user), and pseudonyms have nothing to do
with them, so that a test finding no Discord id in what the analysts' role reads means
something.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from db import jobs, messages, models, rounds, users
from db.choices import record_choice
from db.connect import Executor
from db.images import images_of_round, set_scores
from tests.factories import fake_image

MAINTAINER = "discord:912345678901234567"  # how actions are attributed


def snowflake(n: int) -> int:
    """A Discord-like 18-digit id for the example's small number `n` (user 101, ...)."""
    return 318_000_000_000_000_000 + n * 7_654_321_987


GUILD_ID, CHANNEL_ID = snowflake(1), snowflake(2)
DAY1 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
DAY2 = DAY1 + timedelta(days=1)
DAY3 = DAY1 + timedelta(days=2)

SET_ROUND_TIMES_SQL = """
WITH made AS (
    UPDATE images SET created_at = $2::timestamptz + interval '20 seconds' WHERE round_id = $1
)
UPDATE rounds SET created_at = $2::timestamptz, started_at = $2::timestamptz,
    ready_at = CASE WHEN ready_at IS NULL THEN NULL ELSE $2::timestamptz + interval '20 seconds' END
WHERE id = $1
"""
SET_CHOICE_TIMES_SQL = """
UPDATE choices SET created_at = $2::timestamptz + interval '1 minute',
    updated_at = $2::timestamptz + interval '1 minute'
WHERE round_id = $1
"""
SET_CLOSED_TIMES_SQL = """
UPDATE rounds SET closed_at = ready_at + interval '1 day' WHERE closed_at IS NOT NULL
"""
# Pseudonyms are random in real life; fixed ones (by first appearance, nothing to do with
# the Discord id) keep the documented results stable.
SET_USERS_SQL = """
UPDATE users u SET first_seen_at = $1, last_seen_at = $1,
    pseudonym = 'user-' || lpad(n.k::text, 2, '0')
FROM (SELECT id, row_number() OVER (ORDER BY id) AS k FROM users) n
WHERE n.id = u.id
"""
SET_MODEL_TIMES_SQL = """
UPDATE model_versions
SET created_at = $1::timestamptz + id * interval '1 hour',
    promoted_at = CASE WHEN promoted_at IS NULL THEN NULL
                       ELSE $1::timestamptz + id * interval '1 hour' + interval '30 minutes' END,
    retired_at = CASE WHEN retired_at IS NULL THEN NULL
                      ELSE $1::timestamptz + (id + 1) * interval '1 hour' END
"""


def _metrics(top1: float, low: float, high: float, untuned: float) -> dict:
    return {
        "test": {"n": 200, "top1": top1, "top1_ci": [low, high], "chance": 0.25,
                 "pairwise": top1 + 0.2},
        "compared": {"untuned": {"n": 200, "top1": untuned, "pairwise": untuned + 0.2}},
    }  # fmt: skip


class _Clicks:
    """Interaction ids, growing with time like Discord's."""

    def __init__(self) -> None:
        self.count = 0

    def next(self) -> int:
        self.count += 1
        return snowflake(10_000 + self.count)


async def _choose(
    db: Executor, clicks: _Clicks, round_id: int, user: int, verdict: str, position: int | None
) -> None:
    await record_choice(db, round_id=round_id, discord_user_id=snowflake(user),
                        verdict=verdict, position=position,  # type: ignore[arg-type]
                        interaction_id=clicks.next())  # fmt: skip


async def _create(db: Executor, requester: int, prompt: str) -> int:
    created = await rounds.create_round(
        db, requester_discord_id=snowflake(requester), prompt=prompt, k=4,
        guild_id=GUILD_ID, channel_id=CHANNEL_ID,
    )  # fmt: skip
    message_id = snowflake(1_000 + created.round.id)
    await messages.record_message(db, created.round.id, GUILD_ID, CHANNEL_ID, message_id)
    return created.round.id


async def _round(
    db: Executor,
    clicks: _Clicks,
    at: datetime,
    *,
    requester: int,
    prompt: str,
    versions: list[int],
    scores: list[float],
    scorer: int,
    verdict: str | None,
    position: int | None = None,
) -> int:
    round_id = await _create(db, requester, prompt)
    await rounds.start_generating(db, round_id)
    images = [fake_image(round_id, p, model_version_id=v) for p, v in enumerate(versions, 1)]
    await rounds.finish_round(db, round_id, images)
    ids = [i.id for i in await images_of_round(db, round_id, include_nsfw=True)]
    await set_scores(db, dict(zip(ids, scores, strict=True)), scorer)
    if verdict is not None:
        await _choose(db, clicks, round_id, requester, verdict, position)
    await db.execute(SET_ROUND_TIMES_SQL, round_id, at)
    return round_id


async def seed(db: Executor) -> dict[str, int]:
    """Fill an empty database (at head) with the example; returns some ids by name."""
    base = await models.ensure_base(db, kind="sd_base", artifact="CompVis/stable-diffusion-v1-4")
    adapter = await models.register(
        db, kind="sd_adapter", name="sd_adapter-ab", artifact="/models/sd_adapter-ab",
        parent_id=base.id, metrics={"offline": {"win_rate": 0.61}},
    )  # fmt: skip
    await models.start_testing(db, adapter.id, actor=MAINTAINER)
    c1 = await models.register(
        db, kind="classifier", name="classifier-a", artifact="/models/classifier-a",
        metrics=_metrics(0.405, 0.338, 0.476, 0.330),
    )  # fmt: skip
    c2 = await models.register(
        db, kind="classifier", name="classifier-b", artifact="/models/classifier-b",
        parent_id=c1.id, metrics=_metrics(0.435, 0.367, 0.506, 0.330),
    )  # fmt: skip
    await models.promote(db, c1.id, actor=MAINTAINER)
    await models.promote(db, c2.id, actor=MAINTAINER)
    b, a = base.id, adapter.id
    ids: dict[str, int] = {}
    clicks = _Clicks()

    day1 = [
        (101, "a castle at sunset", "pick", 2),
        (102, "a red cube", "pick", 1),
        (103, "portrait of a cat", "none", None),
        (101, "a castle at sunset", "pick", 4),
    ]
    for i, (requester, prompt, verdict, position) in enumerate(day1):
        ids[f"day1_{i}"] = await _round(
            db, clicks, DAY1 + timedelta(minutes=10 * i), requester=requester, prompt=prompt,
            versions=[b, b, b, b], scores=[20.0 + i, 21.0 + i, 22.0 + i, 23.0 + i],
            scorer=c1.id, verdict=verdict, position=position,
        )  # fmt: skip
    await _choose(db, clicks, ids["day1_0"], 201, "pick", 2)
    await _choose(db, clicks, ids["day1_1"], 202, "tie", None)

    # Positions 1 and 3 are the base's, 2 and 4 the adapter's.
    mixed = [b, a, b, a]
    day2 = [("pick", 2), ("pick", 4), ("pick", 2), ("pick", 4), ("pick", 1), ("tie", None)]
    for i, (verdict, position) in enumerate(day2):
        ids[f"day2_{i}"] = await _round(
            db, clicks, DAY2 + timedelta(minutes=10 * i), requester=104 + i % 2,
            prompt=f"a lighthouse in a storm, style {i}", versions=mixed,
            scores=[22.0, 24.0 + i * 0.5, 21.5, 23.5], scorer=c2.id, verdict=verdict,
            position=position,
        )  # fmt: skip
    # A ban reason is free text: here it mentions a user, as Discord writes mentions.
    reason = f"vote brigading for <@{snowflake(104)}>"
    await users.ban(db, snowflake(301), shadow=True, reason=reason, actor=MAINTAINER)
    await _choose(db, clicks, ids["day2_0"], 301, "pick", 1)
    for i, position in enumerate((2, 3)):
        ids[f"day3_{i}"] = await _round(
            db, clicks, DAY3 + timedelta(minutes=10 * i), requester=106,
            prompt=f"an astronaut riding a horse {i}", versions=mixed,
            scores=[21.0, 23.0, 22.5, 22.0], scorer=c2.id, verdict="pick", position=position,
        )  # fmt: skip
    await jobs.enqueue_training(db, "classifier", requested_by=MAINTAINER)
    await jobs.enqueue(
        db, "score", {"prompt": "my secret idea", "image_keys": []},
        requested_by=f"discord:{snowflake(101)}",
    )  # fmt: skip
    failed = await _create(db, 102, "a blue ball")
    await rounds.start_generating(db, failed)
    await rounds.fail_round(db, failed, "the safety checker flagged 3 of 4 images")
    await db.execute(SET_ROUND_TIMES_SQL, failed, DAY3 + timedelta(hours=1))
    queued = await _create(db, 103, "a green car")
    await db.execute(SET_ROUND_TIMES_SQL, queued, DAY3 + timedelta(hours=2))
    for round_id in ids.values():
        at = await db.fetchval("SELECT created_at FROM rounds WHERE id = $1", round_id)
        await db.execute(SET_CHOICE_TIMES_SQL, round_id, at)
    for i in range(4):  # day 1's rounds are past their time
        await rounds.close_round(db, ids[f"day1_{i}"])
    await db.execute(SET_CLOSED_TIMES_SQL)
    await db.execute(SET_USERS_SQL, DAY1)
    await db.execute(SET_MODEL_TIMES_SQL, DAY1 - timedelta(days=1))
    ids.update(base=b, adapter=a, classifier_a=c1.id, classifier_b=c2.id)
    return ids
