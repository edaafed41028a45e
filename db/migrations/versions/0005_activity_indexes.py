"""Indexes for the queries that watch activity: choices made in the last 24 hours
(/status, /stats) and the shown images still waiting for an HPS score (score_images).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_choices_updated_at", "choices", ["updated_at"])
    op.create_index(
        "ix_images_unscored",
        "images",
        ["id"],
        postgresql_where=sa.text("hps_score IS NULL AND NOT nsfw"),
    )


def downgrade() -> None:
    op.drop_index("ix_images_unscored", table_name="images")
    op.drop_index("ix_choices_updated_at", table_name="choices")
