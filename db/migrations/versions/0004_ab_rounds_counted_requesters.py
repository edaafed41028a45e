"""Live A/B accounting counts only requesters who still count.

`ab_rounds` (0003) left out flagged choices (made while shadow-banned) but kept the earlier,
unflagged choices of requesters banned or shadow-banned later, whom training already leaves
out (`db.datasets`: "who counts"). The adapters' live win rates, read from `ab_win_rates`
(built on `ab_rounds` through `ab_decisions`) by the automatic promotion review, now leave
them out too. Same columns, so the views built on it and the grants to hps_analyst stand.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from collections.abc import Sequence

from alembic import op

from db.sql import load

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(f"CREATE OR REPLACE VIEW ab_rounds AS {load('ab_rounds/0004')}")


def downgrade() -> None:
    op.execute(f"CREATE OR REPLACE VIEW ab_rounds AS {load('ab_rounds/0003')}")
