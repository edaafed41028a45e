"""Analysts see people by pseudonym only, never by the platform's internal user ids.

Forgetting a user gives their tombstone a fresh pseudonym, but the row keeps its internal id:
an earlier extract holding `users.id`, `choices.user_id`, `choice_events.user_id` or
`rounds.requester_id` would link the person's old pseudonym to the new one (and to the
tombstone's other columns). `hps_analyst` may no longer read these columns, with
column-level grants as 0003, 0006 and 0007 do; the views name people by pseudonym only
(`choices_flat`: requester and chooser; `user_activity`), and `rounds_daily` still counts
distinct requesters (a view reads with its owner's rights).

The role's other limits (timeouts, connection limits, no temporary objects, no advisory
locks, no large objects) are not schema: `db.analysts` applies them after every upgrade.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ROLE = "hps_analyst"
# Each table's column holding an internal user id.
INTERNAL_IDS = {
    "users": "id",
    "choices": "user_id",
    "choice_events": "user_id",
    "rounds": "requester_id",
}


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
    op.execute(
        _if_role(
            " ".join(
                f"REVOKE SELECT ({column}) ON {table} FROM {ROLE};"
                for table, column in INTERNAL_IDS.items()
            )
        )
    )


def downgrade() -> None:
    op.execute(
        _if_role(
            " ".join(
                f"GRANT SELECT ({column}) ON {table} TO {ROLE};"
                for table, column in INTERNAL_IDS.items()
            )
        )
    )
