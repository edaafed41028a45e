"""The bot's needs: `rounds.shown_status` and the `record_choice` function.

- `rounds.shown_status`: the status a round's Discord message last showed, so that the bot
  catches up on rounds that changed while it was away (a restart, a lost LISTEN connection).
- `record_choice(...)`: recording a click in one round trip. A click is the hot path (the
  bot must take hundreds a second); done as separate statements in a transaction it took
  seven round trips. The function runs the same steps in the same order with the same locks
  (`db/choices.py` documents them) and raises SQLSTATE HP001 with the refusal's code as
  message (the round's status as detail) when a click is refused, so nothing is written.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 08:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from db.sql import load

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SHOWN_STATUSES = (
    "shown_status IS NULL OR shown_status IN ('queued', 'generating', 'ready', 'closed', 'failed')"
)


def upgrade() -> None:
    op.add_column("rounds", sa.Column("shown_status", sa.Text(), nullable=True))
    op.create_check_constraint(op.f("ck_rounds_shown_status"), "rounds", SHOWN_STATUSES)
    op.execute(load("record_choice/0002"))


def downgrade() -> None:
    op.execute("DROP FUNCTION record_choice(bigint, bigint, text, smallint, boolean, bigint)")
    op.drop_constraint(op.f("ck_rounds_shown_status"), "rounds", type_="check")
    op.drop_column("rounds", "shown_status")
