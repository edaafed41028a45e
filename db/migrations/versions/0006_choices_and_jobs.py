"""Clicks: a round's expiry and the order of clicks are enforced where the click is recorded;
outcomes posted to Discord are claimed once.

- `record_choice(...)` takes how long a ready round stays open (`p_open_for`): a click
  after `ready_at + p_open_for` is refused as closed, even before the scheduler's
  `close_stale_rounds` marks the round closed (or with that schedule off).
- The last click wins by the time it was made, not by the order of commits: a choice keeps
  the interaction id (a Discord snowflake, time-ordered) of the click it holds, and an older
  click arriving late is recorded in `choice_events` as `stale` and changes nothing.
- Clicking the same image again (`unchanged`) no longer counts as a new choice: the choice's
  `updated_at` and `revision` stay as they were.
- `jobs.announced_at`, `model_events.announced_at`: when the bot posted a training job's
  outcome or a registry event to the log channel. The bot claims an announcement by setting
  it, so each is posted once by one bot process, and what finished while no bot listened is
  posted when one listens again. Existing rows count as announced. `model_events.notice`
  keeps a promotion's, retirement's or rollback's notice (the `hps_models` NOTIFY payload)
  for that; it names the actor, so it is hidden from `hps_analyst` like the actor.
- `choices.interaction_id` is a Discord id: hidden from `hps_analyst`, like the others.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ROLE = "hps_analyst"
# The jobs whose outcome the bot posts (db.jobs.TRAINING_KINDS), not yet posted.
ANNOUNCED_JOBS = (
    "announced_at IS NULL AND state IN ('done', 'dead') "
    "AND kind IN ('train_classifier', 'adapt_sd')"
)
OLD_OUTCOMES = "outcome IN ('recorded', 'changed', 'unchanged')"
NEW_OUTCOMES = "outcome IN ('recorded', 'changed', 'unchanged', 'stale')"
OLD_SIGNATURE = "record_choice(bigint, bigint, text, smallint, boolean, bigint)"
NEW_SIGNATURE = "record_choice(bigint, bigint, text, smallint, boolean, bigint, interval)"

RECORD_CHOICE_FUNCTION = """
CREATE FUNCTION record_choice(
    p_round_id bigint,
    p_discord_id bigint,
    p_verdict text,
    p_position smallint,
    p_others_may_vote boolean,
    p_interaction_id bigint,
    p_open_for interval
) RETURNS TABLE (
    -- The choice's columns, flat: a composite column would cost asyncpg a slow type
    -- introspection on every new connection.
    id bigint,
    round_id bigint,
    user_id bigint,
    verdict text,
    chosen_position smallint,
    is_requester boolean,
    flagged boolean,
    revision integer,
    created_at timestamptz,
    updated_at timestamptz,
    outcome text,
    previous_verdict text,
    previous_position smallint
)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    r record;
    u users;
    prev choices;
    had_prev boolean;
    cur choices;
    by_requester boolean;
    result text;
BEGIN
    SELECT rr.status, rr.requester_id, rr.ready_at,
           EXISTS (SELECT FROM images i WHERE i.round_id = rr.id AND i.position = p_position
                   AND NOT i.nsfw) AS shown
    INTO r FROM rounds rr WHERE rr.id = p_round_id
    -- Until commit, the round can be neither closed nor deleted (a forget) under the
    -- click: a click racing a close is decided by which commits first, never both.
    FOR SHARE OF rr;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'HP001', MESSAGE = 'unknown_round';
    END IF;
    IF r.status <> 'ready' THEN
        RAISE EXCEPTION USING ERRCODE = 'HP001', MESSAGE = 'status', DETAIL = r.status;
    END IF;
    -- Past its time a round is closed to clicks, whether or not it was marked closed yet.
    IF p_open_for IS NOT NULL AND r.ready_at + p_open_for <= now() THEN
        RAISE EXCEPTION USING ERRCODE = 'HP001', MESSAGE = 'status', DETAIL = 'closed';
    END IF;
    IF p_verdict = 'pick' AND NOT r.shown THEN
        RAISE EXCEPTION USING ERRCODE = 'HP001', MESSAGE = 'bad_position';
    END IF;

    -- The user's row stays locked until commit: one user's clicks serialise here.
    INSERT INTO users (discord_id) VALUES (p_discord_id)
    ON CONFLICT (discord_id) DO UPDATE SET last_seen_at = now()
    RETURNING * INTO u;
    IF u.banned THEN
        RAISE EXCEPTION USING ERRCODE = 'HP001', MESSAGE = 'banned';
    END IF;
    by_requester := u.id IS NOT DISTINCT FROM r.requester_id;
    IF NOT by_requester AND NOT p_others_may_vote THEN
        RAISE EXCEPTION USING ERRCODE = 'HP001', MESSAGE = 'requester_only';
    END IF;

    SELECT * INTO prev FROM choices c
    WHERE c.round_id = p_round_id AND c.user_id = u.id FOR UPDATE;
    had_prev := FOUND;
    IF NOT had_prev THEN
        INSERT INTO choices (round_id, user_id, verdict, chosen_position, is_requester, flagged,
                             interaction_id)
        VALUES (p_round_id, u.id, p_verdict, p_position, by_requester, u.shadow_banned,
                p_interaction_id)
        ON CONFLICT (round_id, user_id) DO NOTHING
        RETURNING * INTO cur;
        IF NOT FOUND THEN  -- a concurrent first click won the insert: now it exists
            SELECT * INTO prev FROM choices c
            WHERE c.round_id = p_round_id AND c.user_id = u.id FOR UPDATE;
            had_prev := true;
        END IF;
    END IF;
    IF had_prev THEN
        IF p_interaction_id < prev.interaction_id THEN
            -- Made before the click the choice holds, committed after it: too late.
            cur := prev;
            result := 'stale';
        ELSIF prev.verdict = p_verdict AND prev.chosen_position IS NOT DISTINCT FROM p_position
        THEN
            -- The same choice again: not a new choice, but the latest click it holds.
            UPDATE choices c
            SET interaction_id = greatest(c.interaction_id, p_interaction_id)
            WHERE c.id = prev.id
            RETURNING * INTO cur;
            result := 'unchanged';
        ELSE
            UPDATE choices c
            SET verdict = p_verdict, chosen_position = p_position, flagged = u.shadow_banned,
                updated_at = now(), revision = c.revision + 1,
                interaction_id = coalesce(p_interaction_id, c.interaction_id)
            WHERE c.id = prev.id
            RETURNING * INTO cur;
            result := 'changed';
        END IF;
    ELSE
        result := 'recorded';
    END IF;

    INSERT INTO choice_events (round_id, user_id, verdict, chosen_position, is_requester,
                               flagged, outcome, interaction_id)
    VALUES (p_round_id, u.id, p_verdict, p_position, by_requester, u.shadow_banned, result,
            p_interaction_id);
    RETURN QUERY SELECT cur.id, cur.round_id, cur.user_id, cur.verdict, cur.chosen_position,
        cur.is_requester, cur.flagged, cur.revision, cur.created_at, cur.updated_at, result,
        prev.verdict, prev.chosen_position;
END
$$
"""

# What hps_analyst may read of `choices`: everything but the Discord interaction id.
CHOICE_COLUMNS = (
    "id, round_id, user_id, verdict, chosen_position, is_requester, flagged, revision, "
    "created_at, updated_at"
)


def _if_role(statement: str) -> str:
    """`statement` run only where the analysts' role exists (0003 creates it when it may)."""
    return f"""
    DO $$ BEGIN
        IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{ROLE}') THEN
            {statement}
        END IF;
    END $$
    """


def upgrade() -> None:
    op.add_column("choices", sa.Column("interaction_id", sa.BigInteger(), nullable=True))
    op.drop_constraint(op.f("ck_choice_events_outcome"), "choice_events", type_="check")
    op.create_check_constraint(op.f("ck_choice_events_outcome"), "choice_events", NEW_OUTCOMES)
    op.execute(f"DROP FUNCTION {OLD_SIGNATURE}")
    op.execute(RECORD_CHOICE_FUNCTION)

    for table in ("jobs", "model_events"):
        op.add_column(table, sa.Column("announced_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("model_events", sa.Column("notice", JSONB(), nullable=True))
    op.execute("UPDATE jobs SET announced_at = now() WHERE state IN ('done', 'dead', 'cancelled')")
    op.execute("UPDATE model_events SET announced_at = now()")
    op.create_index(
        "ix_jobs_unannounced",
        "jobs",
        ["id"],
        postgresql_where=sa.text(ANNOUNCED_JOBS),
    )
    op.create_index(
        "ix_model_events_unannounced",
        "model_events",
        ["id"],
        postgresql_where=sa.text("announced_at IS NULL AND notice IS NOT NULL"),
    )

    op.execute(
        _if_role(
            f"REVOKE SELECT ON choices FROM {ROLE};"
            f" GRANT SELECT ({CHOICE_COLUMNS}) ON choices TO {ROLE};"
            f" GRANT SELECT (announced_at) ON jobs TO {ROLE};"
            f" GRANT SELECT (announced_at) ON model_events TO {ROLE};"
        )
    )


def downgrade() -> None:
    op.execute(
        _if_role(
            f"REVOKE SELECT ON choices FROM {ROLE}; GRANT SELECT ON choices TO {ROLE};"
            f" REVOKE SELECT (announced_at) ON jobs FROM {ROLE};"
            f" REVOKE SELECT (announced_at) ON model_events FROM {ROLE};"
        )
    )
    op.drop_index("ix_model_events_unannounced", table_name="model_events")
    op.drop_index("ix_jobs_unannounced", table_name="jobs")
    op.drop_column("model_events", "notice")
    for table in ("model_events", "jobs"):
        op.drop_column(table, "announced_at")

    op.execute(f"DROP FUNCTION {NEW_SIGNATURE}")
    # The function as 0002 made it (the migration's own text, not a copy of it).
    script = op.get_context().script
    assert script is not None
    op.execute(script.get_revision("0002").module.RECORD_CHOICE_FUNCTION)
    op.execute("DELETE FROM choice_events WHERE outcome = 'stale'")
    op.drop_constraint(op.f("ck_choice_events_outcome"), "choice_events", type_="check")
    op.create_check_constraint(op.f("ck_choice_events_outcome"), "choice_events", OLD_OUTCOMES)
    op.drop_column("choices", "interaction_id")
