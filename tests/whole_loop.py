"""The whole loop as it is deployed: `hps serve` (the bot, the scheduler and the real worker
as child processes) with production log settings, against the local Discord-compatible
server, on the tiny SD pipeline and a tiny CLIP as the HPS model.

Reusable pieces, for the whole-loop test (`tests/e2e/test_whole_loop.py`) and for anyone who
needs the same set-up with something changed (another image store, a demo):

- `loop_models`: a session fixture (registered by tests/conftest.py) with the tiny models
  and the adaptation's regularization images;
- `standard_fake()`: the local Discord server with the end-to-end tests' guild, channels
  and maintainer role;
- `serve_env(...)`: the environment of a production-like `hps serve` (INFO, JSON logs)
  shrunk to the tiny models; keyword arguments add or replace `HPS_*` variables;
- `Served`: the `hps serve` process, its log lines parsed (`problems` lists ERROR lines and
  broken log calls);
- `Loop`: acting as the users and reading what the platform did;
- `run_scenario(loop)`: the scenario with its exact expectations.

    async with standard_fake() as fake:
        env = serve_env(fake, database_url, tmp_path / "data", loop_models, HPS_X="...")
        async with served(env, tmp_path / "serve.log", database_url, fake) as loop:
            await run_scenario(loop)
            loop.serve.stop_cleanly()
        assert loop.serve.problems() == []
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from PIL import Image

from bot.fake_discord import FakeDiscord, FakeGuild, FakeUser, buttons
from db import jobs
from db import models as registry
from db.connect import create_pool
from tests.e2e.conftest import (
    ALICE,
    BOB,
    CHANNEL_ID,
    GUILD_ID,
    LOG_CHANNEL_ID,
    MAINTAINER,
    MAINTAINER_ROLE,
    OTHER_CHANNEL_ID,
)
from tests.log_check import parse_json_lines, problems

ROOT = Path(__file__).resolve().parents[1]
CAROL = FakeUser(710000000000000004, "carol")

# Long enough for a worker that imports torch and loads the pipeline on a busy machine.
FIRST_ROUND_SECONDS = 180.0
JOB_SECONDS = 150.0


@dataclass(frozen=True)
class LoopModels:
    sd_model: Path  # the tiny SD pipeline (diffusers layout)
    clip_config: Path  # the tiny CLIP's open_clip model config (models.hps_arch)
    clip_weights: Path  # its weights (models.hps_pretrained)
    regularization: Path  # adapt.regularization_data: two images with captions


@pytest.fixture(scope="session")
def loop_models(tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LoopModels:
    from pipeline.tiny_models import tiny_weights

    config, weights = tiny_weights(tmp_path_factory.mktemp("loop_clip"))
    regularization = tmp_path_factory.mktemp("loop_regularization")
    rows = []
    for name, colour in (("sky.png", "skyblue"), ("grass.png", "green")):
        Image.new("RGB", (64, 64), colour).save(regularization / name)
        rows.append({"file_name": name, "caption": f"a photo of {colour}"})
    (regularization / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return LoopModels(tiny_sd_dir, config, weights, regularization)


@asynccontextmanager
async def standard_fake() -> AsyncIterator[FakeDiscord]:
    """The local Discord server with the end-to-end tests' guild: /dream's channel, another
    channel, the log channel and the maintainer role."""
    fake = FakeDiscord(
        guilds=[
            FakeGuild(
                GUILD_ID,
                "HPS test guild",
                [CHANNEL_ID, OTHER_CHANNEL_ID, LOG_CHANNEL_ID],
                [MAINTAINER_ROLE],
            )
        ]
    )
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


def serve_env(
    fake: FakeDiscord, database_url: str, data_dir: Path, models: LoopModels, **changes: str
) -> dict[str, str]:
    """The environment of `hps serve` for the loop: production logging (INFO, JSON lines),
    the tiny models, and small enough numbers that every stage runs in seconds:

    - the classifier trains on as few as 3 examples, with no validation split and 40 % of
      the prompts (by hash) tested, and needs a gain of 1.0 to be promoted, so it is
      refused whatever a few noise images teach it (a deterministic outcome);
    - the adaptation takes 2 prompts or more, 20 % held out, 4 images each, 2 LoRA steps
      at 64 px with the regularization images, and every adapter enters A/B testing
      (`offline_gate = none`);
    - every round with an adapter in testing is an A/B round (`ab_share = 1`), and the
      live test takes one look at 2 decided rounds at 60 % confidence (2 of 2 won
      promotes), reviewed every 2 seconds; the other schedules are off.
    """
    base = {k: v for k, v in os.environ.items() if not k.startswith("HPS_")}
    settings = {
        "HPS_DATABASE_URL": database_url,
        "HPS_DATA_DIR": str(data_dir),
        "HPS_LOG_LEVEL": "INFO",
        "HPS_LOG_FORMAT": "json",
        "HPS_DISCORD__TOKEN": fake.token,
        "HPS_DISCORD__GUILD_IDS": f"[{GUILD_ID}]",
        "HPS_DISCORD__CHANNEL_IDS": f"[{CHANNEL_ID}]",
        "HPS_DISCORD__MAINTAINER_ROLE_IDS": f"[{MAINTAINER_ROLE}]",
        "HPS_DISCORD__LOG_CHANNEL_ID": str(LOG_CHANNEL_ID),
        "HPS_DISCORD__API_BASE_URL": fake.api_base_url,
        "HPS_DISCORD__GATEWAY_URL": fake.gateway_url,
        "HPS_BOT__GUILD_READY_TIMEOUT": "0.05",
        "HPS_LIMITS__ROUNDS_PER_HOUR": "50",
        "HPS_LIMITS__ROUNDS_IN_FLIGHT": "10",
        "HPS_GENERATION__SD_MODEL": str(models.sd_model),
        "HPS_GENERATION__STEPS": "2",
        "HPS_GENERATION__WIDTH": "64",
        "HPS_GENERATION__HEIGHT": "64",
        "HPS_GENERATION__SAFETY_CHECKER": "false",
        "HPS_GENERATION__AB_SHARE": "1.0",
        "HPS_MODELS__HPS_ARCH": str(models.clip_config),
        "HPS_MODELS__HPS_PRETRAINED": str(models.clip_weights),
        "HPS_MODELS__DEVICE": "cpu",
        "HPS_TRAIN__MIN_EXAMPLES": "3",
        "HPS_TRAIN__VAL_FRACTION": "0",
        "HPS_TRAIN__TEST_FRACTION": "0.4",
        "HPS_TRAIN__BATCH_SIZE": "2",
        "HPS_TRAIN__NUM_WORKERS": "0",
        "HPS_TRAIN__PROMOTE_MARGIN": "1.0",
        "HPS_ADAPT__MIN_PROMPTS": "2",
        "HPS_ADAPT__HELDOUT_FRACTION": "0.2",
        "HPS_ADAPT__EVAL_PROMPTS": "2",
        "HPS_ADAPT__EVAL_SEEDS": "1",
        "HPS_ADAPT__SAMPLE_BATCH": "8",
        "HPS_ADAPT__RESOLUTION": "64",
        "HPS_ADAPT__BATCH_SIZE": "4",
        "HPS_ADAPT__TOTAL_BATCH_SIZE": "4",
        "HPS_ADAPT__LEARNING_RATE": "0.01",
        "HPS_ADAPT__MAX_TRAIN_STEPS": "2",
        "HPS_ADAPT__CHECKPOINTING_STEPS": "2",
        "HPS_ADAPT__VALIDATION_IMAGES": "0",
        "HPS_ADAPT__NUM_WORKERS": "0",
        "HPS_ADAPT__REGULARIZATION_DATA": str(models.regularization),
        "HPS_ADAPT__OFFLINE_GATE": "none",
        "HPS_ADAPT__MIN_LIVE_ROUNDS": "2",
        "HPS_ADAPT__MAX_LIVE_ROUNDS": "2",
        "HPS_ADAPT__LIVE_CONFIDENCE": "0.6",
        "HPS_SCHEDULES__RETRAIN_CLASSIFIER": "",
        "HPS_SCHEDULES__ADAPT_SD": "",
        "HPS_SCHEDULES__CLOSE_STALE_ROUNDS": "",
        "HPS_SCHEDULES__SCORE_IMAGES": "",
        "HPS_SCHEDULES__REQUEUE_EXPIRED_JOBS": "",
        "HPS_SCHEDULES__REVIEW_ADAPTERS": "*/2 * * * * *",
        "HPS_WORKER__LEASE_SECONDS": "60",
        "HPS_WORKER__HEARTBEAT_SECONDS": "2",
        "HPS_WORKER__POLL_SECONDS": "0.5",
        "HPS_WORKER__BACKOFF_SECONDS": "1",
        "HPS_WORKER__SHUTDOWN_GRACE_SECONDS": "20",
    }
    return {**base, **settings, **changes}


class Served:
    """`python -m cli serve` as a real process; its children (bot, scheduler, worker) log to
    the same file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        with log_path.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "cli", "serve"],
                env=env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.returncode: int | None = None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def records(self) -> list[dict[str, Any]]:
        return parse_json_lines(self.output())[0]

    def problems(self, allowed: list[str] | None = None) -> list[str]:
        """ERROR lines (unless their message contains one of `allowed`) and broken log
        calls, in every process's output."""
        return problems(*parse_json_lines(self.output()), allowed=allowed or [])

    async def wait_log(self, logger: str, message: str, within: float) -> dict[str, Any]:
        """The first JSON record of `logger` whose message contains `message`."""

        def found() -> dict[str, Any] | None:
            return next(
                (
                    r
                    for r in self.records()
                    if r.get("logger") == logger and message in str(r.get("msg"))
                ),
                None,
            )

        return await poll(found, within, f"no log line {logger}: {message!r}", self)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (as a service manager stops it), then its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        self.returncode = self.process.wait(timeout)
        return self.returncode

    def stop_cleanly(self) -> None:
        """SIGTERM: `hps serve` exits 0, every child stopped by itself and said so."""
        import psutil

        children = psutil.Process(self.process.pid).children(recursive=True)
        assert {c.cmdline()[-1] for c in children} == {"bot", "scheduler", "worker"}
        assert self.stop() == 0, self.output()[-3000:]
        assert not any(c.is_running() for c in children)
        said = {(r.get("logger"), r.get("msg")) for r in self.records()}
        assert ("bot.client", "bot stopped") in said
        assert ("apscheduler.scheduler", "Scheduler has been shut down") in said
        assert any(
            logger == "pipeline.worker" and re.fullmatch(r"worker \S+ stopped", str(msg))
            for logger, msg in said
        )

    def kill(self) -> None:
        """Whatever happened, nothing is left running (children included)."""
        if self.process.poll() is None:
            import psutil

            for child in psutil.Process(self.process.pid).children(recursive=True):
                child.kill()
            self.process.kill()
            self.process.wait()


async def poll(
    check: Callable[[], Any], within: float, what: str, served: Served | None = None
) -> Any:
    """`check()` (a value, or an awaitable) once truthy; fails after `within` seconds, or
    at once if `served` exited."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if served is not None and served.process.poll() is not None:
            raise AssertionError(f"hps serve exited ({served.process.returncode}): {what}")
        assert loop.time() < deadline, what
        await asyncio.sleep(0.1)


@dataclass
class Round:
    id: int
    message_id: int
    requester: FakeUser


class Loop:
    """The users' side of the platform, and what it recorded."""

    def __init__(
        self, fake: FakeDiscord, pool: asyncpg.Pool, serve: Served, env: dict[str, str]
    ) -> None:
        self.fake = fake
        self.pool = pool
        self.serve = serve
        self.env = env  # the settings `hps serve` runs with

    async def command(self, user: FakeUser, name: str, options: dict[str, Any] | None = None):  # type: ignore[no-untyped-def]
        """`user` runs a slash command in /dream's channel: the interaction."""
        return await self.fake.slash(user, name, options or {}, channel_id=CHANNEL_ID)

    async def answer(self, user: FakeUser, name: str, options: dict[str, Any] | None = None) -> str:
        """What `user` is finally shown after `/name`."""
        interaction = await self.command(user, name, options)
        return (await interaction.answer(within=30))["content"]

    async def dream(self, user: FakeUser, prompt: str) -> Round:
        """`/dream prompt`: the round once its message says it is queued."""
        interaction = await self.command(user, "dream", {"prompt": prompt})
        message = await interaction.answer(within=30)
        assert "Queued" in message["content"], message["content"]
        round_id = await poll(
            lambda: self.pool.fetchval(
                "SELECT id FROM rounds WHERE message_id = $1", int(message["id"])
            ),
            30,
            f"the round of {prompt!r} has no message",
        )
        return Round(round_id, int(message["id"]), user)

    async def shown(self, round_: Round, within: float = JOB_SECONDS) -> list[str]:
        """The round's button ids once its images are posted (K picks, tie, none)."""

        def ready() -> list[str] | None:
            found = buttons(self.fake.messages.get(round_.message_id, {}))
            return [b["custom_id"] for b in found] if found else None

        return await poll(ready, within, f"round {round_.id} was not shown", self.serve)

    async def click(self, user: FakeUser, round_: Round, custom_id: str) -> str:
        """`user` clicks a button of the round's message: the confirmation they see."""
        click = await self.fake.click(user, round_.message_id, custom_id)
        response = await click.wait_response(within=10)
        if response["type"] == 7:  # the requester's verdict highlighted; the text follows
            return (await click.followup(within=10))["content"]
        return response["data"]["content"]

    async def versions(self, round_: Round) -> list[int]:
        """The model version of each of the round's images, by position."""
        rows = await self.pool.fetch(
            "SELECT model_version_id FROM images WHERE round_id = $1 ORDER BY position",
            round_.id,
        )
        return [r["model_version_id"] for r in rows]

    async def job(self, job_id: int, within: float = JOB_SECONDS) -> jobs.Job:
        """The job once finished."""

        async def finished() -> jobs.Job | None:
            job = await jobs.get(self.pool, job_id)
            return job if job is not None and job.state in ("done", "dead") else None

        return await poll(finished, within, f"job {job_id} did not finish", self.serve)

    def posted(self) -> list[str]:
        """The log channel's messages, oldest first."""
        return [m["content"] for m in self.fake.channel_messages(LOG_CHANNEL_ID)]

    async def posts(self, count: int, within: float = 30) -> list[str]:
        """The log channel's messages once there are `count` of them."""
        await poll(lambda: len(self.posted()) >= count, within, f"{count} posts", self.serve)
        return self.posted()


@asynccontextmanager
async def served(
    env: dict[str, str], log_path: Path, database_url: str, fake: FakeDiscord
) -> AsyncIterator[Loop]:
    """`hps serve` running with `env`, its bot connected and listening; on exit it is
    stopped with SIGTERM (its exit code in `loop.serve.returncode`) if the body did not."""
    serve = Served(env, log_path)
    pool = await create_pool(database_url, min_size=1, max_size=4)
    try:
        await serve.wait_log("bot.client", "ready: 1 guild(s)", 120)
        await serve.wait_log("db.listen", "listening on hps_rounds", 30)
        yield Loop(fake, pool, serve, env)
        if serve.returncode is None:
            await asyncio.to_thread(serve.stop)
    finally:
        serve.kill()
        await pool.close()


# -- the scenario -------------------------------------------------------------------------

# Prompts, placed by their hashes: the classifier tests on "a red house" and "a blue ball"
# (40 %), the adaptation holds "a red house" out (20 %); the others are trained on.
FIRST = [
    (ALICE, "a red house"),
    (ALICE, "a green cube"),
    (BOB, "a blue ball"),
    (BOB, "a yellow cube"),
    (CAROL, "a purple cube"),
    (CAROL, "a black ball"),
]
AB = [(ALICE, "a white car"), (BOB, "a orange ball"), (CAROL, "a green car")]
AFTER_PROMOTION = "a white ball"


def _button(round_: Round, button: str) -> str:
    """The custom id of `pick:<position>`, `tie` or `none` on the round's message."""
    if button.startswith("pick:"):
        return f"hps:pick:{round_.id}:{button.removeprefix('pick:')}"
    return f"hps:{button}:{round_.id}"


def _what(button: str) -> str:
    """How the confirmation names a button's verdict."""
    if button.startswith("pick:"):
        return f"image {button.removeprefix('pick:')}"
    return {"tie": "“Can't decide”", "none": "“None of these”"}[button]


async def run_scenario(loop: Loop) -> None:
    """The loop, with exact expectations at every step (see the module docstring)."""
    from pipeline.adapt.prompts import is_held_out
    from pipeline.data import assign_split

    pool = loop.pool

    # 1. Several users /dream; the real worker generates with the base pipeline.
    rounds = {prompt: await loop.dream(user, prompt) for user, prompt in FIRST}
    for round_ in rounds.values():
        assert len(await loop.shown(round_, FIRST_ROUND_SECONDS)) == 6  # 4 images, tie, none
    base = await registry.serving(pool, "sd_base")
    assert base is not None and base.artifact == loop.env["HPS_GENERATION__SD_MODEL"]
    for round_ in rounds.values():
        assert await loop.versions(round_) == [base.id] * 4

    # 2. Picks, ties and "none of these", by the requesters and by others.
    clicks = [  # who clicks, on the round of which prompt, which button
        (ALICE, "a red house", "pick:2"),
        (ALICE, "a green cube", "pick:1"),
        (BOB, "a blue ball", "tie"),
        (BOB, "a yellow cube", "none"),
        (CAROL, "a purple cube", "pick:3"),
        (CAROL, "a black ball", "tie"),
        (BOB, "a green cube", "pick:4"),  # the others' votes do not train
        (CAROL, "a yellow cube", "pick:2"),
        (ALICE, "a black ball", "none"),
    ]
    for user, key, button in clicks:
        answer = await loop.click(user, rounds[key], _button(rounds[key], button))
        assert answer == f"Recorded: you chose {_what(button)}. Thank you!"
    assert await pool.fetchval("SELECT count(*) FROM choices") == 9
    assert await pool.fetchval("SELECT count(*) FROM choice_events") == 9

    # 3. /retrain classifier: trained on the requesters' picks and ties of the train split
    # (3), tested on the test split (2), refused (the margin), posted once.
    splits = {
        p: assign_split(_hash(p), None, val_fraction=0.0, test_fraction=0.4) for _, p in FIRST
    }
    assert sorted(p for p, s in splits.items() if s == "test") == ["a blue ball", "a red house"]
    text = await loop.answer(MAINTAINER, "retrain", {"target": "classifier"})
    [classifier_job] = await jobs.list_jobs(pool, kind="train_classifier")
    assert text == (
        f"Queued `train_classifier` as job {classifier_job.id}.\n"
        "The outcome will be posted in the log channel."
    )
    done = await loop.job(classifier_job.id)
    name = f"classifier-job{done.id}"
    assert done.state == "done", done.error
    assert done.result["status"] == "trained" and done.result["promoted"] is False
    assert done.result["examples"] == {"train": 3, "val": 0, "test": 2}
    assert done.result["reason"].startswith("not better by the margin: top-1 ")
    version = await registry.get(pool, name)
    assert version is not None and version.status == "candidate"
    assert await registry.serving(pool, "classifier") is None
    [outcome] = await loop.posts(1)
    assert outcome.startswith(
        f"`train_classifier` job {done.id} **done**: Trained classifier {name} on 3 examples. "
        "Test top-1 "
    )
    assert "Registered as a candidate, not promoted: not better by the margin" in outcome
    assert outcome.endswith("\npromoted: no")

    # 4. /retrain sd: the paper's recipe on the tiny pipeline; the adapter enters A/B testing.
    assert [p for _, p in FIRST if is_held_out(p, 0.2)] == ["a red house"]
    text = await loop.answer(MAINTAINER, "retrain", {"target": "sd"})
    [adapt_job] = await jobs.list_jobs(pool, kind="adapt_sd")
    assert text == (
        f"Queued `adapt_sd` as job {adapt_job.id}.\nThe outcome will be posted in the log channel."
    )
    done = await loop.job(adapt_job.id)
    assert done.state == "done", done.error
    adapter_name = f"sd_adapter-job{done.id}"
    assert done.result["status"] == "registered" and done.result["testing"] is True
    adapter = await registry.get(pool, adapter_name)
    assert adapter is not None and adapter.status == "testing" and adapter.parent_id == base.id
    data = adapter.metrics["data"]
    assert (data["prompts"], data["images"], data["regularization"]) == (5, 20, 2)
    assert adapter.metrics["training"]["steps"] == 2
    assert adapter.metrics["offline"]["prompts"] == 1 and adapter.metrics["offline"]["pairs"] == 1
    posts = await loop.posts(2)
    assert posts[1].startswith(
        f"`adapt_sd` job {done.id} **done**: SD adaptation run {adapter_name}: 5 prompts, 20 images"
    )
    assert f"Registered {adapter_name}. In A/B testing: " in posts[1]

    # 5. Later rounds mix base and adapter half and half, each image with its version; the
    # requesters pick the adapter's images twice and tie once: the live record counts 2 of 2.
    ab = [await loop.dream(user, prompt) for user, prompt in AB]
    versions = {}
    for round_ in ab:  # all generated before any click can end the test
        await loop.shown(round_)
        versions[round_.id] = await loop.versions(round_)
        assert sorted(versions[round_.id]) == sorted([base.id, base.id, adapter.id, adapter.id])
    for round_ in ab:
        if round_.requester is CAROL:
            answer = await loop.click(CAROL, round_, _button(round_, "tie"))
            assert answer == "Recorded: you chose “Can't decide”. Thank you!"
            continue
        position = versions[round_.id].index(adapter.id) + 1
        answer = await loop.click(round_.requester, round_, _button(round_, f"pick:{position}"))
        assert answer == f"Recorded: you chose image {position}. Thank you!"
    decided = await pool.fetch(
        "SELECT round_id, won FROM ab_decisions WHERE version_id = $1 ORDER BY round_id",
        adapter.id,
    )
    assert [(d["round_id"], d["won"]) for d in decided] == [
        (ab[0].id, True),
        (ab[1].id, True),
    ]

    # 6. The review (every 2 s) takes its one look at 2 decided rounds: promoted, posted.
    promoted = await poll(
        lambda: _serving_adapter(pool), 60, "the adapter was not promoted", loop.serve
    )
    assert promoted.id == adapter.id
    [look] = promoted.metrics["live"]["looks"]
    assert (look["look"], look["rounds"], look["wins"], look["high"]) == (1, 2, 2, 1.0)
    posts = await loop.posts(3)
    assert posts[2].startswith(
        f"`{adapter_name}` (sd_adapter) **promoted** by schedule:review_adapters: live win "
        "rate 100.0% (60% CI 73.8%–100.0%, 2 of 2 rounds) against "
    )

    # 7. Rounds after the promotion are served by the new serving version alone.
    after = await loop.dream(ALICE, AFTER_PROMOTION)
    await loop.shown(after)
    assert await loop.versions(after) == [adapter.id] * 4
    assert await loop.click(ALICE, after, _button(after, "pick:1")) == (
        "Recorded: you chose image 1. Thank you!"
    )

    # 8. /forget-me: Bob's choices, events and rounds (with their votes and files) go.
    bob = await pool.fetchval("SELECT id FROM users WHERE discord_id = $1", BOB.id)
    bobs_rounds = await pool.fetchval("SELECT count(*) FROM rounds WHERE requester_id = $1", bob)
    bobs_choices = await pool.fetchval("SELECT count(*) FROM choices WHERE user_id = $1", bob)
    assert (bobs_rounds, bobs_choices) == (3, 4)
    # The bot's messages of Bob's rounds (they show his images): the rounds', and the chosen
    # image it posted after his pick.
    bobs_messages = {
        r["message_id"]
        for r in await pool.fetch(
            "SELECT message_id FROM rounds WHERE requester_id = $1 UNION ALL "
            "SELECT m.message_id FROM round_messages m JOIN rounds r ON r.id = m.round_id "
            "WHERE r.requester_id = $1",
            bob,
        )
    }
    assert len(bobs_messages) == 4 and bobs_messages <= set(loop.fake.messages)
    ask = await loop.command(BOB, "forget-me")
    await ask.wait_response()
    yes = await loop.fake.click(BOB, ask.original_message_id, f"hps:forget:yes:{BOB.id}")
    await yes.wait_response()
    message = await loop.fake.wait_for(
        lambda: (
            (m := loop.fake.messages[ask.original_message_id])["content"].startswith("Done") and m
        ),
        within=30,
    )
    assert message["content"] == (
        "Done: deleted 3 round(s), 4 choice(s), 12 image file(s) and the bot's 4 message(s) "
        "showing your rounds."
    )
    for table, column in (("choices", "user_id"), ("choice_events", "user_id")):
        assert await pool.fetchval(f"SELECT count(*) FROM {table} WHERE {column} = $1", bob) == 0
    assert await pool.fetchval("SELECT count(*) FROM rounds WHERE requester_id = $1", bob) == 0
    # Carol's vote went with Bob's round; everyone else's rounds and choices stay.
    assert await pool.fetchval("SELECT count(*) FROM rounds") == 10 - 3
    assert await pool.fetchval("SELECT count(*) FROM choices") == 9 + 3 + 1 - 4 - 1
    assert await pool.fetchval("SELECT discord_id FROM users WHERE id = $1", bob) is None
    assert not bobs_messages & set(loop.fake.messages)  # the bot deleted them
    # Nothing was left to delete later (files or messages).
    assert await pool.fetchval("SELECT count(*) FROM image_deletions") == 0
    assert await pool.fetchval("SELECT count(*) FROM message_deletions") == 0

    # 9. Nothing was posted twice.
    await asyncio.sleep(1)
    assert len(loop.posted()) == 3


def _hash(prompt: str) -> str:
    from db.prompts import prompt_hash

    return prompt_hash(prompt)


async def _serving_adapter(pool: asyncpg.Pool) -> registry.ModelVersion | None:
    return await registry.serving(pool, "sd_adapter")
