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

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SHOWN = """
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
"""

BEFORE = (
    SHOWN
    + """LEFT JOIN choices c ON c.round_id = r.id AND c.is_requester AND NOT c.flagged
LEFT JOIN images chosen ON chosen.round_id = c.round_id AND chosen.position = c.chosen_position
WHERE cardinality(shown.version_ids) >= 2
"""
)

AFTER = (
    SHOWN
    + """LEFT JOIN (
    choices c JOIN users u
        ON u.id = c.user_id AND NOT u.banned AND NOT u.shadow_banned AND u.forgotten_at IS NULL
) ON c.round_id = r.id AND c.is_requester AND NOT c.flagged
LEFT JOIN images chosen ON chosen.round_id = c.round_id AND chosen.position = c.chosen_position
WHERE cardinality(shown.version_ids) >= 2
"""
)


def upgrade() -> None:
    op.execute(f"CREATE OR REPLACE VIEW ab_rounds AS {AFTER}")


def downgrade() -> None:
    op.execute(f"CREATE OR REPLACE VIEW ab_rounds AS {BEFORE}")
