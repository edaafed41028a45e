"""Splits on the prompt's text alone, and each round's incumbent recorded.

- `prompts.text_hash`: sha256 of the normalised text without the negative prompt
  (`db.prompts.text_hash`). The classifier and every export see the text only, so
  train/test splits are decided on it (`pipeline.data.prompt_split`): "a red castle" with
  and without the negative prompt "blurry" are one prompt there, never on both sides. It
  equals `norm_hash` for prompts with no negative prompt, whose splits do not change.
  Filled here with the same normalisation in Python (NFKC, whitespace, case folding, which
  SQL cannot reproduce exactly).
- `rounds.incumbent_version_id`: the version that served the round (its A/B plan's
  incumbent), so the live record by recipe counts each A/B round from the side of the
  candidate under test (`db.stats.live_by_recipe`), also after another adapter was
  promoted while it kept testing. Filled here from the generate jobs' results, which hold
  the plan; rounds whose job is gone keep NULL. `hps_analyst` may read it (rounds are
  granted column by column: 0003).

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-03
"""

import hashlib
import re
import unicodedata
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ROLE = "hps_analyst"
BATCH = 10_000

_SPACE = re.compile(r"\s+")


def _text_hash(text: str) -> str:
    # db.prompts.text_hash as of this revision (a migration never changes with the code).
    normal = _SPACE.sub(" ", unicodedata.normalize("NFKC", text)).strip().casefold()
    return hashlib.sha256(f"{normal}\x00".encode()).hexdigest()


INCUMBENTS_SQL = """
UPDATE rounds r SET incumbent_version_id = plan.incumbent
FROM (
    SELECT (j.result->>'round_id')::bigint AS round_id,
           (j.result->'plan'->>'incumbent')::bigint AS incumbent
    FROM jobs j
    WHERE j.kind = 'generate' AND j.state = 'done' AND j.result->>'status' = 'ready'
      AND j.result->'plan'->>'incumbent' ~ '^[0-9]+$'
      AND j.result->>'round_id' ~ '^[0-9]+$'
) plan
WHERE r.id = plan.round_id
  AND EXISTS (SELECT FROM model_versions v WHERE v.id = plan.incumbent)
"""


def upgrade() -> None:
    op.add_column("prompts", sa.Column("text_hash", sa.Text(), nullable=True))
    conn = op.get_bind()
    last = 0
    while rows := conn.execute(
        sa.text("SELECT id, text FROM prompts WHERE id > :last ORDER BY id LIMIT :n"),
        {"last": last, "n": BATCH},
    ).all():
        conn.execute(
            sa.text("UPDATE prompts SET text_hash = :hash WHERE id = :id"),
            [{"id": row.id, "hash": _text_hash(row.text)} for row in rows],
        )
        last = rows[-1].id
    op.alter_column("prompts", "text_hash", nullable=False)
    op.create_index(op.f("ix_prompts_text_hash"), "prompts", ["text_hash"])

    op.add_column("rounds", sa.Column("incumbent_version_id", sa.BigInteger(), nullable=True))
    op.create_foreign_key(
        op.f("fk_rounds_incumbent_version_id"),
        "rounds",
        "model_versions",
        ["incumbent_version_id"],
        ["id"],
    )
    op.execute(INCUMBENTS_SQL)
    op.execute(
        f"""
        DO $$ BEGIN
            IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{ROLE}') THEN
                GRANT SELECT (incumbent_version_id) ON rounds TO {ROLE};
            END IF;
        END $$
        """
    )


def downgrade() -> None:
    op.drop_constraint(op.f("fk_rounds_incumbent_version_id"), "rounds", type_="foreignkey")
    op.drop_column("rounds", "incumbent_version_id")
    op.drop_index(op.f("ix_prompts_text_hash"), table_name="prompts")
    op.drop_column("prompts", "text_hash")
