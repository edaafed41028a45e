"""Fair A/B rounds only, and two more columns hidden from analysts.

- `ab_rounds` gets a last column `balanced`: every model version shown in the round showed as
  many images as the others (after the safety filter held some back). A requester's pick is
  one win per round, which is only fair between versions offering as many images: with 2
  against 1, the version with 2 wins more often by chance alone. `ab_decisions` (and so
  `ab_win_rates`, the live review and the report) counts balanced rounds only; unbalanced
  ones stay visible in `ab_rounds`.
- `hps_analyst` may no longer read `choice_events.interaction_id` (a Discord snowflake) nor
  `users.ban_reason` (free text a maintainer typed, which may hold mentions of Discord ids),
  with column-level grants as 0003 does.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from collections.abc import Sequence

from alembic import op

from db.sql import load

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ROLE = "hps_analyst"
# Revoked here, beside those 0003 and 0006 revoke.
HIDDEN = {"choice_events": "interaction_id", "users": "ban_reason"}


def _role_exists() -> bool:
    rows = op.get_bind().exec_driver_sql(f"SELECT 1 FROM pg_roles WHERE rolname = '{ROLE}'")
    return rows.first() is not None


def _columns(table: str) -> list[str]:
    rows = op.get_bind().exec_driver_sql(
        "SELECT column_name FROM information_schema.columns"
        f" WHERE table_schema = 'public' AND table_name = '{table}' ORDER BY ordinal_position"
    )
    return [row[0] for row in rows]


def upgrade() -> None:
    # Same columns plus one at the end: the views stay in place, grants and all.
    op.execute(f"CREATE OR REPLACE VIEW ab_rounds AS {load('ab_rounds/0007')}")
    op.execute(f"CREATE OR REPLACE VIEW ab_decisions AS {load('ab_decisions/0007')}")
    if not _role_exists():
        return
    # choice_events was granted whole (0003): a column is revoked by granting the others.
    events = [c for c in _columns("choice_events") if c != HIDDEN["choice_events"]]
    op.execute(f"REVOKE SELECT ON choice_events FROM {ROLE}")
    op.execute(f"GRANT SELECT ({', '.join(events)}) ON choice_events TO {ROLE}")
    op.execute(f"REVOKE SELECT ({HIDDEN['users']}) ON users FROM {ROLE}")


def downgrade() -> None:
    # A view cannot lose a column in place: drop the three and make them as 0004 left them.
    for view in ("ab_win_rates", "ab_decisions", "ab_rounds"):
        op.execute(f"DROP VIEW {view}")
    op.execute(f"CREATE VIEW ab_rounds AS {load('ab_rounds/0004')}")
    op.execute(f"CREATE VIEW ab_decisions AS {load('ab_decisions/0003')}")
    op.execute(f"CREATE VIEW ab_win_rates AS {load('ab_win_rates/0003')}")
    if not _role_exists():
        return
    for view in ("ab_rounds", "ab_decisions", "ab_win_rates"):
        op.execute(f"GRANT SELECT ON {view} TO {ROLE}")
    # A table-level REVOKE takes its column-level grants with it.
    op.execute(f"REVOKE SELECT ON choice_events FROM {ROLE}")
    op.execute(f"GRANT SELECT ON choice_events TO {ROLE}")
    op.execute(f"GRANT SELECT ({HIDDEN['users']}) ON users TO {ROLE}")
