"""The model registry: one serving version per kind, promotion and rollback."""

from __future__ import annotations

import asyncio

import pytest

from db import models
from db.models import ModelError


async def test_register_promote_rollback(pool) -> None:  # type: ignore[no-untyped-def]
    a = await models.register(pool, kind="classifier", artifact="/m/a", metrics={"acc": 0.4})
    b = await models.register(pool, kind="classifier", artifact="/m/b", parent_id=a.id)
    assert a.name == f"classifier-{a.id}" and a.status == "candidate"
    assert await models.serving(pool, "classifier") is None

    first = await models.promote(pool, a.id, actor="ann")
    assert first.promoted.status == "serving" and first.retired is None
    second = await models.promote(pool, b.name, actor="ann", reason="better")
    assert second.promoted.id == b.id and second.retired.id == a.id
    assert (await models.serving(pool, "classifier")).id == b.id

    back = await models.rollback(pool, "classifier", actor="bob")
    assert back.retired.id == b.id and back.promoted.id == a.id
    assert (await models.serving(pool, "classifier")).id == a.id
    to_nothing = await models.rollback(pool, "classifier", actor="bob")
    assert to_nothing.promoted is None and to_nothing.retired.id == a.id
    with pytest.raises(ModelError, match="nothing to roll back"):
        await models.rollback(pool, "classifier", actor="bob")
    actions = [e["action"] for e in await models.events(pool, "classifier")]
    assert actions.count("promoted") == 3 and actions.count("rolled_back") == 2


async def test_transitions_are_checked(pool) -> None:  # type: ignore[no-untyped-def]
    v = await models.register(pool, kind="sd_adapter", artifact="/m/lora")
    with pytest.raises(ModelError, match="Unknown model version"):
        await models.promote(pool, "no-such-version", actor="x")
    tested = await models.start_testing(pool, v.id, actor="x")
    assert tested.status == "testing" and [
        t.id for t in await models.testing(pool, "sd_adapter")
    ] == [v.id]
    with pytest.raises(ModelError, match="not a candidate"):
        await models.start_testing(pool, v.id, actor="x")
    retired = await models.retire(pool, v.id, actor="x", reason="lost the A/B test")
    assert retired.status == "retired" and retired.retired_at is not None
    merged = await models.merge_metrics(pool, v.id, {"live": {"win_rate": 0.4}})
    assert merged.metrics == {"live": {"win_rate": 0.4}}


async def test_concurrent_promotions_leave_one_serving(pool) -> None:  # type: ignore[no-untyped-def]
    versions = [
        await models.register(pool, kind="classifier", artifact=f"/m/{i}") for i in range(8)
    ]
    await asyncio.gather(*(models.promote(pool, v.id, actor="x") for v in versions))
    serving = await pool.fetchval(
        "SELECT count(*) FROM model_versions WHERE kind = 'classifier' AND status = 'serving'"
    )
    assert serving == 1


async def test_ensure_base_is_idempotent_and_serves_first(pool) -> None:  # type: ignore[no-untyped-def]
    base = await models.ensure_base(pool, kind="sd_base", artifact="CompVis/stable-diffusion-v1-4")
    again = await models.ensure_base(pool, kind="sd_base", artifact="CompVis/stable-diffusion-v1-4")
    assert base.id == again.id and again.status == "serving"
    other = await models.ensure_base(pool, kind="sd_base", artifact="/local/sd15")
    assert other.status == "candidate"  # one serves already


async def test_promotions_retirements_and_rollbacks_are_announced(pool, database_url) -> None:  # type: ignore[no-untyped-def]
    from tests.db.test_rounds import Listener

    a = await models.register(pool, kind="sd_adapter", artifact="/m/a")
    b = await models.register(pool, kind="sd_adapter", artifact="/m/b")
    c = await models.register(pool, kind="sd_adapter", artifact="/m/c")
    async with Listener(database_url, models.MODELS_CHANNEL) as heard:
        await models.start_testing(pool, c.id, actor="job:3")  # not announced
        await models.promote(pool, a.id, actor="ann", reason="first")
        await models.promote(pool, b.id, actor="review", reason="better live")
        await models.retire(pool, c.id, actor="review", reason="worse live")
        await models.rollback(pool, "sd_adapter", actor="discord:9")
        with pytest.raises(ModelError):  # refused: nothing announced
            await models.retire(pool, b.id, actor="x")
        got = [await heard.next() for _ in range(4)]
        await asyncio.sleep(0.2)
        assert heard.payloads.empty()
    # Each notice is kept on its transition's event, for the bot to claim and post once.
    event_ids = [notice.pop("event_id") for notice in got]
    rows = await pool.fetch(
        "SELECT id, action, notice FROM model_events WHERE notice IS NOT NULL ORDER BY id"
    )
    assert [r["id"] for r in rows] == event_ids
    assert [r["action"] for r in rows] == ["promoted", "promoted", "retired", "rolled_back"]
    assert [{k: v for k, v in r["notice"].items() if k != "event_id"} for r in rows] == got
    claimed = await models.claim_notices(pool, event_id=event_ids[1])
    assert claimed == [{**rows[1]["notice"], "event_id": event_ids[1]}]
    assert [n["event_id"] for n in await models.claim_notices(pool)] == [
        event_ids[0],
        *event_ids[2:],
    ]
    assert await models.claim_notices(pool) == []  # each is claimed once
    common = {"kind": "sd_adapter"}
    assert got == [
        {**common, "version_id": a.id, "name": a.name, "action": "promoted", "actor": "ann",
         "reason": "first", "replaced": None},
        {**common, "version_id": b.id, "name": b.name, "action": "promoted", "actor": "review",
         "reason": "better live", "replaced": {"id": a.id, "name": a.name}},
        {**common, "version_id": c.id, "name": c.name, "action": "retired", "actor": "review",
         "reason": "worse live"},
        {**common, "version_id": b.id, "name": b.name, "action": "rolled_back",
         "actor": "discord:9", "reason": "", "restored": {"id": a.id, "name": a.name}},
    ]  # fmt: skip


async def test_names_that_could_escape_their_folder_are_refused(pool) -> None:  # type: ignore[no-untyped-def]
    for bad in ("../x", "a/b", ".hidden", "", "x" * 101, "a..b"):
        with pytest.raises(ModelError, match="invalid name"):
            await models.register(pool, kind="classifier", artifact="/m", name=bad)
    assert models.check_name("classifier-2026.11_a") == "classifier-2026.11_a"
    assert await pool.fetchval("SELECT count(*) FROM model_versions") == 0
