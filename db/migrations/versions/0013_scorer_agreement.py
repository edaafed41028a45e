"""`scorer_agreement`: each reward model's agreement with people's choices, as `hps eval
--scorers` measured it (top-1 and pairwise accuracy with 95% intervals, chance); the rows of
one evaluation share `evaluated_at`. Analysts may read it whole (it holds no user).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ROLE = "hps_analyst"


def _role_exists() -> bool:
    rows = op.get_bind().exec_driver_sql(f"SELECT 1 FROM pg_roles WHERE rolname = '{ROLE}'")
    return rows.first() is not None


def upgrade() -> None:
    op.create_table(
        "scorer_agreement",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column(
            "evaluated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("split", sa.Text(), nullable=False),
        sa.Column("examples", sa.Text(), nullable=False),
        sa.Column("scorer", sa.Text(), nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("scale", sa.Text(), nullable=False),
        sa.Column("choices", sa.Integer(), nullable=False),
        sa.Column("ties", sa.Integer(), nullable=False),
        sa.Column("top1", sa.Float(), nullable=True),
        sa.Column("top1_low", sa.Float(), nullable=True),
        sa.Column("top1_high", sa.Float(), nullable=True),
        sa.Column("chance", sa.Float(), nullable=True),
        sa.Column("pairwise", sa.Float(), nullable=True),
        sa.Column("pairwise_low", sa.Float(), nullable=True),
        sa.Column("pairwise_high", sa.Float(), nullable=True),
        sa.Column("pairs", sa.Integer(), nullable=False),
        sa.Column("report", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_scorer_agreement")),
    )
    op.create_index("ix_scorer_agreement_evaluated_at", "scorer_agreement", ["evaluated_at"])
    if _role_exists():
        op.execute(f"GRANT SELECT ON scorer_agreement TO {ROLE}")


def downgrade() -> None:
    op.drop_index("ix_scorer_agreement_evaluated_at", table_name="scorer_agreement")
    op.drop_table("scorer_agreement")
