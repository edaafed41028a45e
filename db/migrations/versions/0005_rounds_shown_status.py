"""rounds.shown_status: the status a round's Discord message last showed, so that the bot
catches up on rounds that changed while it was away (a restart, a lost LISTEN connection).

Revision ID: 0005
Revises: 0001
Create Date: 2026-11-25 08:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATUSES = (
    "shown_status IS NULL OR shown_status IN ('queued', 'generating', 'ready', 'closed', 'failed')"
)


def upgrade() -> None:
    op.add_column("rounds", sa.Column("shown_status", sa.Text(), nullable=True))
    op.create_check_constraint(op.f("ck_rounds_shown_status"), "rounds", STATUSES)


def downgrade() -> None:
    op.drop_constraint(op.f("ck_rounds_shown_status"), "rounds", type_="check")
    op.drop_column("rounds", "shown_status")
