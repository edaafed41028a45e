"""Analysts' views and the read-only `hps_analyst` role.

Views (documented with worked queries in docs/analysts.md): `rounds_daily`,
`choices_daily`, `user_activity` (pseudonymous), `ab_rounds`, `ab_decisions` and
`ab_win_rates` (live comparisons of model versions shown side by side in one round), and
`classifier_versions` (offline accuracy against the untuned CLIP baseline).
`choices_flat` (0001) stays the one-row-per-choice view.

`hps_analyst` is a group role without login: it may read the views and the tables, except
the columns holding Discord ids (users.discord_id and banned_by, rounds.guild_id/channel_id/
message_id, jobs.requested_by and payload, model_events.actor), which a database owner can
grant separately. Roles are cluster-wide, so creation is
idempotent and the downgrade drops the role only when no other database uses it.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from collections.abc import Sequence

from alembic import op

from db.sql import load

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ROLE = "hps_analyst"

# Created in this order (each may read those before it), dropped in the reverse order.
VIEWS = {
    name: load(f"{name}/0003")
    for name in (
        "rounds_daily",
        "choices_daily",
        "user_activity",
        "ab_rounds",
        "ab_decisions",
        "ab_win_rates",
        "classifier_versions",
    )
}

# Columns that identify people or places on Discord (ids, and `discord:<id>` actor strings):
# not readable by hps_analyst. Jobs' payloads may hold a /score prompt and who asked.
RESTRICTED = {
    "users": ["discord_id", "banned_by"],
    "rounds": ["guild_id", "channel_id", "message_id"],
    "jobs": ["requested_by", "payload"],
    "model_events": ["actor"],
}
READABLE_TABLES = [
    "users",
    "prompts",
    "rounds",
    "images",
    "choices",
    "choice_events",
    "model_versions",
    "model_events",
    "jobs",
    "workers",
]


def upgrade() -> None:
    for name, body in VIEWS.items():
        op.execute(f"CREATE VIEW {name} AS {body}")
    op.execute(
        f"""
        DO $$ BEGIN
            IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{ROLE}') THEN
                CREATE ROLE {ROLE} NOLOGIN;
            END IF;
        END $$
        """
    )
    op.execute(f"GRANT USAGE ON SCHEMA public TO {ROLE}")
    for view in ["choices_flat", *VIEWS]:
        op.execute(f"GRANT SELECT ON {view} TO {ROLE}")
    conn = op.get_bind()
    for table in READABLE_TABLES:
        if table in RESTRICTED:
            columns = [
                row[0]
                for row in conn.exec_driver_sql(
                    "SELECT column_name FROM information_schema.columns"
                    f" WHERE table_schema = 'public' AND table_name = '{table}'"
                    " ORDER BY ordinal_position"
                )
                if row[0] not in RESTRICTED[table]
            ]
            op.execute(f"GRANT SELECT ({', '.join(columns)}) ON {table} TO {ROLE}")
        else:
            op.execute(f"GRANT SELECT ON {table} TO {ROLE}")


def downgrade() -> None:
    op.execute(f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {ROLE}")
    for table in RESTRICTED:
        op.execute(f"REVOKE ALL ON {table} FROM {ROLE}")
    op.execute(f"REVOKE USAGE ON SCHEMA public FROM {ROLE}")
    for name in reversed(list(VIEWS)):
        op.execute(f"DROP VIEW {name}")
    # Another database of this cluster may still grant to the role: then it stays.
    op.execute(
        f"""
        DO $$ BEGIN
            DROP ROLE IF EXISTS {ROLE};
        EXCEPTION WHEN dependent_objects_still_exist THEN NULL;
        END $$
        """
    )
