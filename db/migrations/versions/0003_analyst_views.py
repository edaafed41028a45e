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

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ROLE = "hps_analyst"

VIEWS = {
    # Days are UTC calendar days.
    "rounds_daily": """
SELECT (r.created_at AT TIME ZONE 'UTC')::date AS day,
       count(*) AS rounds,
       count(*) FILTER (WHERE r.status IN ('queued', 'generating')) AS in_flight,
       count(*) FILTER (WHERE r.status = 'ready') AS ready,
       count(*) FILTER (WHERE r.status = 'closed') AS closed,
       count(*) FILTER (WHERE r.status = 'failed') AS failed,
       count(DISTINCT r.requester_id) AS requesters,
       round(avg(extract(epoch FROM r.ready_at - r.created_at))::numeric, 1)
           AS avg_seconds_to_ready
FROM rounds r
GROUP BY 1
""",
    "choices_daily": """
SELECT (c.created_at AT TIME ZONE 'UTC')::date AS day,
       count(*) AS choices,
       count(*) FILTER (WHERE c.is_requester) AS requester_choices,
       count(*) FILTER (WHERE c.verdict = 'pick') AS picks,
       count(*) FILTER (WHERE c.verdict = 'tie') AS ties,
       count(*) FILTER (WHERE c.verdict = 'none') AS nones,
       count(*) FILTER (WHERE c.flagged) AS flagged,
       count(DISTINCT c.user_id) AS choosers
FROM choices c
GROUP BY 1
""",
    "user_activity": """
SELECT u.pseudonym,
       u.source,
       u.first_seen_at,
       u.last_seen_at,
       u.banned,
       u.shadow_banned,
       u.forgotten_at IS NOT NULL AS forgotten,
       (SELECT count(*) FROM rounds r WHERE r.requester_id = u.id) AS rounds_requested,
       count(c.id) AS choices,
       count(c.id) FILTER (WHERE c.is_requester) AS choices_on_own_rounds,
       count(c.id) FILTER (WHERE NOT c.is_requester) AS votes_on_others_rounds,
       count(c.id) FILTER (WHERE c.verdict = 'pick') AS picks,
       count(c.id) FILTER (WHERE c.verdict = 'tie') AS ties,
       count(c.id) FILTER (WHERE c.verdict = 'none') AS nones,
       max(c.updated_at) AS last_choice_at
FROM users u
LEFT JOIN choices c ON c.user_id = u.id
GROUP BY u.id
""",
    # A round that showed images of two or more model versions, with the requester's
    # verdict (flagged choices left out) and the version of the image they picked.
    "ab_rounds": """
SELECT r.id AS round_id,
       r.created_at,
       shown.version_ids AS shown_version_ids,
       c.verdict AS requester_verdict,
       chosen.model_version_id AS chosen_version_id,
       c.updated_at AS decided_at
FROM rounds r
CROSS JOIN LATERAL (
    SELECT array_agg(DISTINCT i.model_version_id ORDER BY i.model_version_id) AS version_ids
    FROM images i
    WHERE i.round_id = r.id AND NOT i.nsfw AND i.model_version_id IS NOT NULL
) shown
LEFT JOIN choices c ON c.round_id = r.id AND c.is_requester AND NOT c.flagged
LEFT JOIN images chosen ON chosen.round_id = c.round_id AND chosen.position = c.chosen_position
WHERE cardinality(shown.version_ids) >= 2
""",
    # One row per decided A/B round and ordered pair of versions shown in it: the
    # requester picked an image (ties and "none" decide nothing) and `won` says whether it
    # was one of `version_id`'s.
    "ab_decisions": """
SELECT a.round_id,
       a.decided_at,
       mine.version_id,
       theirs.version_id AS opponent_id,
       a.chosen_version_id = mine.version_id AS won
FROM ab_rounds a
CROSS JOIN LATERAL unnest(a.shown_version_ids) AS mine(version_id)
CROSS JOIN LATERAL unnest(a.shown_version_ids) AS theirs(version_id)
WHERE a.requester_verdict = 'pick' AND mine.version_id <> theirs.version_id
""",
    # Per ordered pair of versions shown together: decided rounds, wins, win rate and its
    # 95 % Wilson interval.
    "ab_win_rates": """
SELECT v.id AS version_id,
       v.name AS version,
       v.kind,
       o.id AS opponent_id,
       o.name AS opponent,
       s.rounds,
       s.wins,
       s.wins::float8 / s.rounds AS win_rate,
       (p + z*z/(2*n) - z*sqrt(p*(1-p)/n + z*z/(4*n*n))) / (1 + z*z/n) AS win_rate_low,
       (p + z*z/(2*n) + z*sqrt(p*(1-p)/n + z*z/(4*n*n))) / (1 + z*z/n) AS win_rate_high
FROM (
    SELECT version_id, opponent_id, count(*) AS rounds, count(*) FILTER (WHERE won) AS wins
    FROM ab_decisions
    GROUP BY 1, 2
) s
JOIN model_versions v ON v.id = s.version_id
JOIN model_versions o ON o.id = s.opponent_id
CROSS JOIN LATERAL (SELECT s.wins::float8 / s.rounds AS p, s.rounds::float8 AS n, 1.96 AS z) k
""",
    # Classifier versions with their offline test accuracy next to the untuned CLIP
    # baseline's on the same test examples (the paper's comparison), from the metrics that
    # training and `hps eval` record.
    "classifier_versions": """
SELECT v.id,
       v.name,
       v.status,
       p.name AS parent,
       v.created_at,
       v.promoted_at,
       v.retired_at,
       (v.metrics #>> '{test,n}')::int AS test_examples,
       (v.metrics #>> '{test,chance}')::float8 AS chance,
       (v.metrics #>> '{test,top1}')::float8 AS top1,
       (v.metrics #>> '{test,top1_ci,0}')::float8 AS top1_low,
       (v.metrics #>> '{test,top1_ci,1}')::float8 AS top1_high,
       (v.metrics #>> '{test,pairwise}')::float8 AS pairwise,
       (v.metrics #>> '{compared,untuned,top1}')::float8 AS untuned_top1,
       (v.metrics #>> '{compared,untuned,pairwise}')::float8 AS untuned_pairwise,
       v.metrics
FROM model_versions v
LEFT JOIN model_versions p ON p.id = v.parent_id
WHERE v.kind = 'classifier'
""",
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
