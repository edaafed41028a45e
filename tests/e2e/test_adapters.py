"""SD adapters seen from Discord: /status and /models show their offline and live numbers,
and every promotion, retirement and rollback, automatic or not, lands in the log channel."""

from __future__ import annotations

import asyncpg

from bot.fake_discord import FakeDiscord
from db import models as registry
from db.choices import record_choice
from hps.settings import AdaptSettings
from pipeline.adapt.live import review
from tests.e2e.conftest import CHANNEL_ID, LOG_CHANNEL_ID, MAINTAINER
from tests.factories import ready_round

OFFLINE = {
    "pairs": 400,
    "prompts": 200,
    "win_rate": 0.58,
    "win_rate_ci": [0.52, 0.64],
    "hps_gain": 0.214,
    "judges": {"pickscore": {"pairs": 400, "win_rate": 0.555, "win_rate_ci": [0.5, 0.61]}},
}


async def _answer(fake: FakeDiscord, name: str, options: dict | None = None) -> str:
    interaction = await fake.slash(MAINTAINER, name, options or {}, channel_id=CHANNEL_ID)
    return (await interaction.answer())["content"]


async def test_an_automatic_promotion_is_posted_to_the_log_channel(
    bot, fake: FakeDiscord, pool: asyncpg.Pool
) -> None:
    base = await registry.ensure_base(pool, kind="sd_base", artifact="tiny-sd")
    adapter = await registry.register(
        pool, kind="sd_adapter", artifact="/m/a", parent_id=base.id, metrics={"offline": OFFLINE}
    )
    await registry.start_testing(pool, adapter.id, actor="job:1")
    for user in range(6):  # six A/B rounds, each requester picks the adapter's image
        round_id = await ready_round(
            pool,
            requester=500 + user,
            prompt=f"prompt {user}",
            model_version_ids={1: base.id, 2: adapter.id, 3: base.id, 4: adapter.id},
        )
        await record_choice(
            pool, round_id=round_id, discord_user_id=500 + user, verdict="pick", position=4
        )

    status = await _answer(fake, "status")
    assert (
        f"**SD adapters**\n- `{adapter.name}` (testing): offline win 58.0% [52.0%–64.0%], "
        "HPS +0.214 (400 pairs); pickscore win 55.5% [50.0%–61.0%]; live 6/6 rounds won, "
        "100.0% [61.0%–100.0%] vs `sd_base:tiny-sd`\n"
    ) in status

    # One look at 95 % after 6 decided rounds (the default design looks 5 times at 99 %).
    [decided] = await review(pool, AdaptSettings(min_live_rounds=6, max_live_rounds=6))
    assert decided.decision.action == "promote"
    posted = await fake.wait_for(lambda: fake.channel_messages(LOG_CHANNEL_ID))
    assert [m["content"] for m in posted] == [
        f"`{adapter.name}` (sd_adapter) **promoted** by review: live win rate 100.0% "
        "(95% CI 61.0%–100.0%, 6 of 6 rounds) against sd_base:tiny-sd: significantly better"
    ]

    # A maintainer's rollback is posted too; /models shows the numbers it was decided on.
    rolled = await _answer(fake, "rollback", {"kind": "sd_adapter"})
    assert rolled == f"Rolled back `{adapter.name}`; none serves now."
    await fake.wait_for(lambda: len(fake.channel_messages(LOG_CHANNEL_ID)) == 2)
    assert fake.channel_messages(LOG_CHANNEL_ID)[1]["content"] == (
        f"`{adapter.name}` (sd_adapter) **rolled back** by discord:{MAINTAINER.id}\n"
        "None serves now."
    )
    listing = await _answer(fake, "models", {"kind": "sd_adapter"})
    assert listing == (
        f"- `{adapter.name}` (sd_adapter, retired): offline win 58.0% [52.0%–64.0%], HPS "
        "+0.214 (400 pairs); pickscore win 55.5% [50.0%–61.0%]; live 6/6 rounds won, "
        "100.0% [61.0%–100.0%] vs `sd_base:tiny-sd`"
    )
