"""Datasets and prompts (HPS follow-ups): imports keyed by content, exact prompt spellings.

- `rounds.import_key`: what makes an imported record the same record
  (`db.datasets.import_key`: the normalised prompt, the images' sha256 in the order shown and
  the pick), unique. It replaces the unique (source, external_id): record ids are unique only
  within one dataset, so a second dataset (e.g. an export of another instance) reusing them
  was taken for one already imported and silently skipped. Existing imported rounds get
  their key computed here, in SQL, exactly as Python computes it.
- `rounds.prompt_text`: a round's exact prompt where it differs from its prompt row's
  spelling (a prompt row keeps the first spelling of prompts that normalise alike), so an
  imported dataset exports again exactly as it came.
Both are readable by `hps_analyst` (the table's grants are per column).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from db.sql import load

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ROLE = "hps_analyst"

# sha256(norm_hash | sha256s of the images by position, comma-separated | chosen position),
# hex: `db.datasets.import_key`. A second round with the same content (possible only before
# this revision, under other record ids) keeps no key.
BACKFILL_SQL = """
WITH keyed AS (
    SELECT r.id,
           encode(sha256(convert_to(
               p.norm_hash || '|' || string_agg(i.sha256, ',' ORDER BY i.position)
               || '|' || c.chosen_position::text, 'UTF8')), 'hex') AS key
    FROM rounds r
    JOIN prompts p ON p.id = r.prompt_id
    JOIN images i ON i.round_id = r.id
    JOIN choices c ON c.round_id = r.id AND c.is_requester AND c.verdict = 'pick'
    WHERE r.source = 'import'
    GROUP BY r.id, p.norm_hash, c.chosen_position
), first AS (
    SELECT id, key, row_number() OVER (PARTITION BY key ORDER BY id) AS n FROM keyed
)
UPDATE rounds r SET import_key = first.key FROM first WHERE first.id = r.id AND first.n = 1
"""

# Downgrading: rounds of different datasets may now share an external id; the later ones
# get their round id appended so that the old unique (source, external_id) holds again.
DISAMBIGUATE_SQL = """
UPDATE rounds r SET external_id = r.external_id || '#' || r.id
FROM (
    SELECT id, row_number() OVER (PARTITION BY source, external_id ORDER BY id) AS n
    FROM rounds WHERE external_id IS NOT NULL
) d
WHERE d.id = r.id AND d.n > 1
"""


def upgrade() -> None:
    op.add_column("rounds", sa.Column("import_key", sa.Text(), nullable=True))
    op.add_column("rounds", sa.Column("prompt_text", sa.Text(), nullable=True))
    op.execute(BACKFILL_SQL)
    op.drop_constraint("uq_rounds_source_external_id", "rounds", type_="unique")
    op.create_unique_constraint("uq_rounds_import_key", "rounds", ["import_key"])
    op.execute(f"GRANT SELECT (import_key, prompt_text) ON rounds TO {ROLE}")
    # Analysts see each round's prompt as it was written.
    op.execute(f"CREATE OR REPLACE VIEW choices_flat AS {load('choices_flat/0008')}")


def downgrade() -> None:
    op.execute(f"CREATE OR REPLACE VIEW choices_flat AS {load('choices_flat/0001')}")
    op.drop_constraint("uq_rounds_import_key", "rounds", type_="unique")
    op.execute(DISAMBIGUATE_SQL)
    op.create_unique_constraint("uq_rounds_source_external_id", "rounds", ["source", "external_id"])
    op.drop_column("rounds", "prompt_text")
    op.drop_column("rounds", "import_key")
