"""Forgetting that finishes: pending image deletions, and a message-deletion queue that backs off.

- `image_deletions`: the image files a forget left unreferenced, recorded in the forget's
  transaction and deleted after its commit; a deletion that fails (the store unreachable)
  stays here and the bot tries it again, with backoff (`db.images.delete_pending`). Not
  readable by `hps_analyst`: its keys are the forgotten person's images' hashes, its times
  the forget's.
- `message_deletions.next_attempt_at` and `gave_up_at`: a failed deletion is tried again
  after a backoff (so failing rows never hold up the others), and one Discord refuses for
  good, or that failed too often, is given up (kept for a moderator, never claimed again).
- Imported copies of people forgotten before this migration (an HPD export imported back
  into its own database brought their picks in as `import:<their pseudonym>`, and forgetting
  did not reach them until now) are forgotten here: their rounds (with images' rows, votes
  and the prompts no other round uses), choices and rows are deleted, and their image files,
  when nothing else uses them, are queued in `image_deletions` for the bot to delete.
  (Downgrading does not bring them back.)

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Imported users whose dataset hash is a pseudonym a forgotten Discord user held.
COPIES = """
SELECT u.id FROM users u
WHERE u.source = 'import'
  AND encode(sha256(convert_to(substr(u.pseudonym, 8), 'UTF8')), 'hex')
      IN (SELECT sha256 FROM retired_pseudonyms)
"""

# One statement each, in this order (no temporary tables: any number of migrations may run
# in one transaction).
FORGET_COPIES_SQL = [
    # Their images' files that nothing else uses, for the bot to delete.
    f"""
    INSERT INTO image_deletions (storage_key)
    SELECT DISTINCT i.storage_key FROM images i JOIN rounds r ON r.id = i.round_id
    WHERE r.requester_id IN ({COPIES})
      AND NOT EXISTS (SELECT FROM images o JOIN rounds s ON s.id = o.round_id
                      WHERE o.storage_key = i.storage_key
                        AND (s.requester_id IS NULL OR s.requester_id NOT IN ({COPIES})))
    ON CONFLICT (storage_key) DO NOTHING
    """,
    f"DELETE FROM choice_events WHERE user_id IN ({COPIES})",
    f"DELETE FROM choices WHERE user_id IN ({COPIES})",
    # Their rounds (images' rows and votes go with them), and the prompts only they used.
    f"""
    WITH gone AS (DELETE FROM rounds WHERE requester_id IN ({COPIES}) RETURNING prompt_id)
    DELETE FROM prompts p
    WHERE p.id IN (SELECT prompt_id FROM gone)
      AND NOT EXISTS (SELECT FROM rounds r
                      WHERE r.prompt_id = p.id
                        AND (r.requester_id IS NULL OR r.requester_id NOT IN ({COPIES})))
    """,
    f"DELETE FROM users WHERE id IN ({COPIES})",
]


def upgrade() -> None:
    op.create_table(
        "image_deletions",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("storage_key", sa.Text(), nullable=False),
        sa.Column(
            "requested_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "next_attempt_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_image_deletions")),
        sa.UniqueConstraint("storage_key", name=op.f("uq_image_deletions_storage_key")),
    )
    op.create_index(
        "ix_image_deletions_next_attempt_at", "image_deletions", ["next_attempt_at"], unique=False
    )
    op.add_column(
        "message_deletions",
        sa.Column(
            "next_attempt_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
    )
    op.add_column(
        "message_deletions", sa.Column("gave_up_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.create_index(
        "ix_message_deletions_next_attempt_at",
        "message_deletions",
        ["next_attempt_at"],
        unique=False,
        postgresql_where=sa.text("gave_up_at IS NULL"),
    )
    for statement in FORGET_COPIES_SQL:
        op.execute(statement)


def downgrade() -> None:
    op.drop_index(
        "ix_message_deletions_next_attempt_at",
        table_name="message_deletions",
        postgresql_where=sa.text("gave_up_at IS NULL"),
    )
    op.drop_column("message_deletions", "gave_up_at")
    op.drop_column("message_deletions", "next_attempt_at")
    op.drop_index("ix_image_deletions_next_attempt_at", table_name="image_deletions")
    op.drop_table("image_deletions")
