"""The model registry: classifier versions, the base SD pipeline and SD adapters.

Status: candidate (registered) → testing (an adapter in live A/B) → serving → retired.
At most one version of each kind serves (a partial unique index). Promotion, retirement
and rollback are single transactions that also append to `model_events`, the audit trail
that rollback reads to find what served before, and NOTIFY `hps_models` (payload JSON
`{version_id, name, kind, action, actor, reason, ...}`, delivered when the transaction
commits) so that the bot posts every outcome to the log channel.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from db.connect import Executor, transaction

MODELS_CHANNEL = "hps_models"


class ModelError(Exception):
    """An unknown version, or a transition its status does not allow."""


# A version's name is also the name of its folders (models_dir/<name>, runs_dir/<name>).
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def check_name(name: str) -> str:
    """`name` if it can name a version (and its folders), else `ModelError` saying why."""
    if not _NAME.match(name) or ".." in name:
        raise ModelError(
            f"invalid name {name!r}: use up to 100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class ModelVersion:
    id: int
    kind: str
    name: str
    parent_id: int | None
    artifact: str
    sha256: str | None
    config: dict[str, Any]
    metrics: dict[str, Any]
    status: str
    created_at: datetime
    promoted_at: datetime | None
    retired_at: datetime | None


def _version(record: Any) -> ModelVersion:
    return ModelVersion(**dict(record))


REGISTER_SQL = """
WITH next AS (SELECT nextval(pg_get_serial_sequence('model_versions', 'id')) AS id)
INSERT INTO model_versions (id, kind, name, parent_id, artifact, sha256, config, metrics, status)
SELECT next.id, $1, coalesce($2, $1 || '-' || next.id), $3, $4, $5, $6, $7, $8 FROM next
RETURNING *
"""

EVENT_SQL = """
INSERT INTO model_events (model_version_id, action, actor, reason) VALUES ($1, $2, $3, $4)
"""

NOTIFY_SQL = """
SELECT pg_notify($1, $2)
"""

# The transition's own event is the announced version's newest (its row is locked).
SET_NOTICE_SQL = """
UPDATE model_events SET notice = $2
WHERE id = (SELECT max(id) FROM model_events WHERE model_version_id = $1)
RETURNING id
"""


async def _notify(
    conn: Executor,
    version: ModelVersion,
    action: str,
    actor: str | None,
    reason: str | None,
    **related: ModelVersion | None,
) -> None:
    """Announce a transition on `hps_models` (delivered when the transaction commits, so
    never for one that is rolled back); `related` names the other versions it touched (the
    one replaced, the one restored). The notice is also kept on the transition's event, for
    the bot to post once (`claim_notices`), also when nobody listened at the time."""
    payload: dict[str, Any] = {
        "version_id": version.id,
        "name": version.name,
        "kind": version.kind,
        "action": action,
        "actor": actor,
        "reason": (reason or "")[:1000],  # NOTIFY payloads must stay under 8000 bytes
    }
    for key, other in related.items():
        payload[key] = {"id": other.id, "name": other.name} if other else None
    payload["event_id"] = await conn.fetchval(SET_NOTICE_SQL, version.id, payload)
    await conn.execute(NOTIFY_SQL, MODELS_CHANNEL, json.dumps(payload))


async def register(
    db: Executor,
    *,
    kind: str,
    artifact: str,
    name: str | None = None,
    sha256: str | None = None,
    config: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    parent_id: int | None = None,
    actor: str | None = None,
) -> ModelVersion:
    """Add a candidate version (named `<kind>-<id>` unless `name` is given)."""
    if name is not None:
        check_name(name)
    async with transaction(db) as conn:
        version = _version(
            await conn.fetchrow(
                REGISTER_SQL,
                kind,
                name,
                parent_id,
                artifact,
                sha256,
                config or {},
                metrics or {},
                "candidate",
            )
        )
        await conn.execute(EVENT_SQL, version.id, "registered", actor, None)
        return version


GET_SQL = """
SELECT * FROM model_versions WHERE id = $1
"""

GET_BY_NAME_SQL = """
SELECT * FROM model_versions WHERE name = $1
"""


async def get(db: Executor, ref: int | str) -> ModelVersion | None:
    """A version by id, or by name (a string of digits is taken as an id)."""
    if isinstance(ref, str) and ref.isdigit():
        ref = int(ref)
    record = await db.fetchrow(GET_SQL if isinstance(ref, int) else GET_BY_NAME_SQL, ref)
    return _version(record) if record else None


LIST_SQL = """
SELECT * FROM model_versions WHERE ($1::text IS NULL OR kind = $1) ORDER BY kind, id
"""


async def list_versions(db: Executor, kind: str | None = None) -> list[ModelVersion]:
    return [_version(r) for r in await db.fetch(LIST_SQL, kind)]


SERVING_SQL = """
SELECT * FROM model_versions WHERE kind = $1 AND status = 'serving'
"""


async def serving(db: Executor, kind: str) -> ModelVersion | None:
    record = await db.fetchrow(SERVING_SQL, kind)
    return _version(record) if record else None


async def sd_incumbent(db: Executor) -> ModelVersion | None:
    """What makes the images of rounds, and what adapters in testing are measured against:
    the serving SD adapter, else the serving base pipeline (the one the generator runs:
    `serve_base`)."""
    return await serving(db, "sd_adapter") or await serving(db, "sd_base")


# A version's decided A/B rounds against one opponent, in the order they were decided (the
# live test's looks are at fixed counts of these: `pipeline.adapt.live`). Such a round shows
# an image of the version: saying so lets the view look at those rounds only (by the index
# on images' versions) instead of every round.
LIVE_OUTCOMES_SQL = """
SELECT won FROM ab_decisions
WHERE version_id = $1 AND opponent_id = $2
  AND round_id IN (SELECT round_id FROM images WHERE model_version_id = $1)
ORDER BY decided_at, round_id
LIMIT $3
"""


async def live_outcomes(db: Executor, version_id: int, opponent_id: int, limit: int) -> list[bool]:
    """Whether `version_id` won each of its first `limit` decided A/B rounds against
    `opponent_id` (the analysts' `ab_decisions`), oldest decision first."""
    return [r["won"] for r in await db.fetch(LIVE_OUTCOMES_SQL, version_id, opponent_id, limit)]


TESTING_SQL = """
SELECT * FROM model_versions WHERE kind = $1 AND status = 'testing' ORDER BY id
"""


async def testing(db: Executor, kind: str) -> list[ModelVersion]:
    return [_version(r) for r in await db.fetch(TESTING_SQL, kind)]


MERGE_METRICS_SQL = """
UPDATE model_versions SET metrics = metrics || $2::jsonb WHERE id = $1 RETURNING *
"""


async def merge_metrics(db: Executor, version_id: int, metrics: dict[str, Any]) -> ModelVersion:
    """Add or replace top-level metric keys, keeping the others."""
    record = await db.fetchrow(MERGE_METRICS_SQL, version_id, metrics)
    if record is None:
        raise ModelError(f"no model version {version_id}")
    return _version(record)


LOCK_KIND_SQL = """
SELECT * FROM model_versions WHERE kind = $1 ORDER BY id FOR UPDATE
"""

SET_STATUS_SQL = """
UPDATE model_versions
SET status = $2,
    promoted_at = CASE WHEN $2 = 'serving' THEN now() ELSE promoted_at END,
    retired_at = CASE WHEN $2 = 'retired' THEN now() ELSE retired_at END
WHERE id = $1
RETURNING *
"""


@dataclass(frozen=True)
class Promotion:
    promoted: ModelVersion | None  # None: rolled back to no version (the base model)
    retired: ModelVersion | None


async def lock_kind(conn: Executor, kind: str) -> None:
    """Lock every version of `kind` until the caller's transaction ends: promotions,
    retirements and rollbacks of that kind serialise on this lock."""
    await conn.fetch(LOCK_KIND_SQL, kind)


async def _locked(conn: Executor, ref: int | str) -> ModelVersion:
    version = await get(conn, ref)
    if version is None:
        raise ModelError(f"Unknown model version {ref!r}.")
    await lock_kind(conn, version.kind)
    version = await get(conn, version.id)
    assert version is not None
    return version


# Decides, under the registry lock, whether `version` may replace `serving` (None: nothing
# serves): returns the reason to record, or raises ModelError.
Gate = Callable[[ModelVersion, "ModelVersion | None"], str]


async def promote(
    db: Executor,
    ref: int | str,
    *,
    actor: str | None,
    reason: str | None = None,
    gate: Gate | None = None,
) -> Promotion:
    """Make a version the serving one of its kind; the previous one is retired. A `gate`
    sees the version serving at that moment, inside the transaction, so a check cannot be
    overtaken by another promotion between checking and promoting."""
    async with transaction(db) as conn:
        version = await _locked(conn, ref)
        if version.status == "serving":
            raise ModelError(f"{version.name} is already serving.")
        previous = await serving(conn, version.kind)
        if gate is not None:
            reason = reason or gate(version, previous)
        retired = None
        if previous is not None:
            retired = _version(await conn.fetchrow(SET_STATUS_SQL, previous.id, "retired"))
            await conn.execute(
                EVENT_SQL, previous.id, "retired", actor, f"replaced by {version.name}"
            )
        promoted = _version(await conn.fetchrow(SET_STATUS_SQL, version.id, "serving"))
        await conn.execute(EVENT_SQL, version.id, "promoted", actor, reason)
        await _notify(conn, promoted, "promoted", actor, reason, replaced=retired)
        return Promotion(promoted, retired)


async def start_testing(
    db: Executor, ref: int | str, *, actor: str | None, reason: str | None = None
) -> ModelVersion:
    """Put a candidate into live A/B testing."""
    async with transaction(db) as conn:
        version = await _locked(conn, ref)
        if version.status != "candidate":
            raise ModelError(f"{version.name} is {version.status}, not a candidate.")
        tested = _version(await conn.fetchrow(SET_STATUS_SQL, version.id, "testing"))
        await conn.execute(EVENT_SQL, version.id, "testing", actor, reason)
        return tested


async def retire(
    db: Executor, ref: int | str, *, actor: str | None, reason: str | None = None
) -> ModelVersion:
    """Retire a candidate or testing version (use `rollback` for the serving one)."""
    async with transaction(db) as conn:
        version = await _locked(conn, ref)
        if version.status in ("retired", "serving"):
            raise ModelError(
                f"{version.name} is {version.status}; "
                + ("use rollback to stop serving it." if version.status == "serving" else "")
            )
        retired = _version(await conn.fetchrow(SET_STATUS_SQL, version.id, "retired"))
        await conn.execute(EVENT_SQL, version.id, "retired", actor, reason)
        await _notify(conn, retired, "retired", actor, reason)
        return retired


# The most recently promoted retired version that was not rolled back since: rollbacks
# unwind promotions like a stack (a version rolled back never comes back by rollback).
PREVIOUSLY_SERVING_SQL = """
SELECT v.* FROM model_versions v
CROSS JOIN LATERAL (
    SELECT max(e.id) FILTER (WHERE e.action = 'promoted') AS promoted,
           max(e.id) FILTER (WHERE e.action = 'rolled_back') AS rolled_back
    FROM model_events e WHERE e.model_version_id = v.id
) ev
WHERE v.kind = $1 AND v.id <> $2 AND v.status = 'retired' AND ev.promoted IS NOT NULL
  AND (ev.rolled_back IS NULL OR ev.rolled_back < ev.promoted)
ORDER BY ev.promoted DESC
LIMIT 1
"""


async def rollback(
    db: Executor, kind: str, *, actor: str | None, reason: str | None = None
) -> Promotion:
    """Retire the serving version of `kind` and serve again the one that served before it
    (none if there was none: the platform then uses the base model)."""
    async with transaction(db) as conn:
        await lock_kind(conn, kind)
        current = await serving(conn, kind)
        if current is None:
            raise ModelError(f"No {kind} version is serving; nothing to roll back.")
        retired = _version(await conn.fetchrow(SET_STATUS_SQL, current.id, "retired"))
        await conn.execute(EVENT_SQL, current.id, "rolled_back", actor, reason)
        record = await conn.fetchrow(PREVIOUSLY_SERVING_SQL, kind, current.id)
        restored = None
        if record is not None:
            restored = _version(await conn.fetchrow(SET_STATUS_SQL, record["id"], "serving"))
            await conn.execute(
                EVENT_SQL, restored.id, "promoted", actor, f"rollback of {current.name}"
            )
        await _notify(conn, retired, "rolled_back", actor, reason, restored=restored)
        return Promotion(restored, retired)


ENSURE_BASE_SQL = """
WITH next AS (SELECT nextval(pg_get_serial_sequence('model_versions', 'id')) AS id)
INSERT INTO model_versions (id, kind, name, artifact)
SELECT next.id, $1, $2, $3 FROM next
ON CONFLICT (name) DO NOTHING
"""


async def ensure_base(db: Executor, *, kind: str, artifact: str) -> ModelVersion:
    """The version row of a base model (e.g. the configured SD pipeline), created on first
    use and made serving if no version of its kind serves."""
    name = f"{kind}:{artifact}"
    async with transaction(db) as conn:
        await lock_kind(conn, kind)
        await conn.execute(ENSURE_BASE_SQL, kind, name, artifact)
        version = await get(conn, name)
        assert version is not None
        if await serving(conn, kind) is None and version.status != "serving":
            version = _version(await conn.fetchrow(SET_STATUS_SQL, version.id, "serving"))
            await conn.execute(EVENT_SQL, version.id, "promoted", "system", "base model")
        return version


async def serve_base(db: Executor, *, kind: str, artifact: str) -> ModelVersion:
    """The base version of `artifact` (see `ensure_base`), made the serving one of its kind
    if another serves. The generator calls this with the pipeline it actually runs, so that
    the images it makes and the incumbent the live review measures adapters against are one
    version, also after `generation.sd_model` changed (the promotion retires the former
    base and is posted to the log channel like any other)."""
    async with transaction(db) as conn:
        version = await ensure_base(conn, kind=kind, artifact=artifact)
        if version.status == "serving":
            return version
        reason = f"the configured base model is now {artifact}"
        promoted = (await promote(conn, version.id, actor="system", reason=reason)).promoted
        assert promoted is not None
        return promoted


EVENTS_SQL = """
SELECT e.*, v.name FROM model_events e JOIN model_versions v ON v.id = e.model_version_id
WHERE ($1::text IS NULL OR v.kind = $1)
ORDER BY e.id DESC LIMIT $2
"""


CLAIM_NOTICES_SQL = """
UPDATE model_events SET announced_at = now()
WHERE id IN (
    SELECT id FROM model_events
    WHERE announced_at IS NULL AND notice IS NOT NULL
      AND ($1::bigint IS NULL OR id = $1) AND created_at > now() - $2::interval
    ORDER BY id
    FOR UPDATE SKIP LOCKED
)
RETURNING id, notice
"""

UNANNOUNCE_NOTICE_SQL = """
UPDATE model_events SET announced_at = NULL WHERE id = $1
"""


async def claim_notices(
    db: Executor, *, event_id: int | None = None, within: timedelta = timedelta(days=7)
) -> list[dict[str, Any]]:
    """Promotion, retirement and rollback notices (the NOTIFY payloads) nobody posted yet
    (only `event_id`'s, if given), from within `within`, marked as announced: whoever
    claims one posts it, once. Oldest first."""
    records = await db.fetch(CLAIM_NOTICES_SQL, event_id, within)
    return [{**r["notice"], "event_id": r["id"]} for r in sorted(records, key=lambda r: r["id"])]


async def unannounce_notice(db: Executor, event_id: int) -> None:
    """Posting a claimed notice failed: leave it for the next claim."""
    await db.execute(UNANNOUNCE_NOTICE_SQL, event_id)


async def events(db: Executor, kind: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """The latest registry events, newest first."""
    return [dict(r) for r in await db.fetch(EVENTS_SQL, kind, limit)]


TESTING_SINCE_SQL = """
SELECT max(created_at) FROM model_events WHERE model_version_id = $1 AND action = 'testing'
"""


async def testing_since(db: Executor, version_id: int) -> datetime | None:
    """When the version last entered live testing (None if it never did)."""
    return await db.fetchval(TESTING_SINCE_SQL, version_id)
