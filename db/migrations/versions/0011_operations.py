"""Operations: liveness of the bot and the scheduler, and deleting forgotten rounds' messages.

- `services`: one row per bot or scheduler process, heartbeated (`db.services`); workers
  keep theirs in `workers`. `hps health` and `/status` read both.
- `round_messages`: the bot's other messages about a round (the requester's chosen image,
  which shows the image and mentions them), deleted with the round's row.
- `message_deletions`: Discord messages of forgotten users' rounds for the bot to delete
  (`db.messages`), queued in the forgetting transaction, NOTIFY `hps_messages`.
`hps_analyst` reads `services` and the columns of `round_messages` that hold no Discord id;
not `message_deletions`, whose times are those of forgetting.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ROLE = "hps_analyst"


def upgrade() -> None:
    op.create_table(
        "services",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("hostname", sa.Text(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column(
            "started_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "last_seen_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "state",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.CheckConstraint("kind IN ('bot', 'scheduler')", name=op.f("ck_services_kind")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_services")),
    )
    op.create_index(
        "ix_services_kind_last_seen_at", "services", ["kind", "last_seen_at"], unique=False
    )
    op.create_table(
        "round_messages",
        sa.Column("message_id", sa.BigInteger(), nullable=False),
        sa.Column("round_id", sa.BigInteger(), nullable=False),
        sa.Column("channel_id", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("kind IN ('chosen')", name=op.f("ck_round_messages_kind")),
        sa.ForeignKeyConstraint(
            ["round_id"],
            ["rounds.id"],
            name=op.f("fk_round_messages_round_id"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("message_id", name=op.f("pk_round_messages")),
    )
    op.create_index("ix_round_messages_round_id", "round_messages", ["round_id"], unique=False)
    op.create_table(
        "message_deletions",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("guild_id", sa.BigInteger(), nullable=True),
        sa.Column("channel_id", sa.BigInteger(), nullable=False),
        sa.Column("message_id", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column(
            "requested_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_message_deletions")),
        sa.UniqueConstraint("message_id", name=op.f("uq_message_deletions_message_id")),
    )
    op.execute(f"GRANT SELECT ON services TO {ROLE}")
    op.execute(f"GRANT SELECT (round_id, kind, created_at) ON round_messages TO {ROLE}")
    # Not message_deletions: its times are forgetting's, which nothing analysts see may join.


def downgrade() -> None:
    op.drop_table("message_deletions")
    op.drop_index("ix_round_messages_round_id", table_name="round_messages")
    op.drop_table("round_messages")
    op.drop_index("ix_services_kind_last_seen_at", table_name="services")
    op.drop_table("services")
