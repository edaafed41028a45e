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

from db.sql import load

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
    op.execute(load("record_choice/0006"))

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
    op.execute(load("record_choice/0002"))
    op.execute("DELETE FROM choice_events WHERE outcome = 'stale'")
    op.drop_constraint(op.f("ck_choice_events_outcome"), "choice_events", type_="check")
    op.create_check_constraint(op.f("ck_choice_events_outcome"), "choice_events", OLD_OUTCOMES)
    op.drop_column("choices", "interaction_id")
