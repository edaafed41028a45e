"""Imported users in a namespace of their own; forgotten users stay out of imports.

Before this revision an import took whatever user held the dataset's user hash as its
pseudonym: a record whose `user_hash` equalled a Discord user's pseudonym put its pick on
that live user, one equal to a forgotten user's tombstone put it on the tombstone, and an old
export of someone since forgotten brought their old pseudonym back as a new user.

- Imported users are named `import:<user hash>`; a CHECK makes `source = 'import'` and that
  prefix go together, so no import can meet a Discord user's pseudonym again. Existing
  imported users get the prefix; imported rounds whose requester is a Discord user (live or
  forgotten: an import took their pseudonym) move, with their pick, to the imported user
  `import:<that pseudonym>`.
- `retired_pseudonyms`: the sha256 of each pseudonym a Discord user stops holding (replaced
  when forgotten, or the row deleted), recorded by a trigger whatever code forgets. Imports
  leave out records under those hashes. It holds no time and no user id (nothing that joins
  to the tombstone) and is not granted to `hps_analyst`. Users forgotten before this
  revision left no record: their old pseudonyms cannot be recognised.

Revision ID: 0010
Revises: 0008
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PREFIX_IMPORTED_USERS_SQL = """
UPDATE users SET pseudonym = 'import:' || pseudonym WHERE source = 'import'
"""

# Imported rounds requested by a Discord user: the import took that user's pseudonym.
TAKEN = """
    SELECT r.id AS round_id, u.id AS user_id, 'import:' || u.pseudonym AS pseudonym
    FROM rounds r JOIN users u ON u.id = r.requester_id
    WHERE r.source = 'import' AND u.source = 'discord'
"""

CREATE_IMPORTED_USERS_SQL = f"""
INSERT INTO users (pseudonym, source)
SELECT DISTINCT pseudonym, 'import' FROM ({TAKEN}) taken
ON CONFLICT (pseudonym) DO NOTHING
"""

MOVE_CHOICES_SQL = f"""
UPDATE choices c SET user_id = i.id
FROM ({TAKEN}) taken JOIN users i ON i.pseudonym = taken.pseudonym
WHERE c.round_id = taken.round_id AND c.user_id = taken.user_id
"""

MOVE_ROUNDS_SQL = f"""
UPDATE rounds r SET requester_id = i.id
FROM ({TAKEN}) taken JOIN users i ON i.pseudonym = taken.pseudonym
WHERE r.id = taken.round_id
"""

RETIRE_FUNCTION_SQL = """
CREATE FUNCTION retire_pseudonym() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.source = 'discord' AND (TG_OP = 'DELETE' OR NEW.pseudonym <> OLD.pseudonym) THEN
        INSERT INTO retired_pseudonyms (sha256)
        VALUES (encode(sha256(convert_to(OLD.pseudonym, 'UTF8')), 'hex'))
        ON CONFLICT DO NOTHING;
    END IF;
    RETURN NULL;
END
$$
"""

RETIRE_TRIGGER_SQL = """
CREATE TRIGGER users_retire_pseudonym AFTER UPDATE OF pseudonym OR DELETE ON users
FOR EACH ROW EXECUTE FUNCTION retire_pseudonym()
"""

# Downgrading: back to bare hashes, except where a Discord user holds the same pseudonym.
UNPREFIX_IMPORTED_USERS_SQL = """
UPDATE users u SET pseudonym = substr(u.pseudonym, 8)
WHERE u.source = 'import' AND u.pseudonym LIKE 'import:%'
  AND NOT EXISTS (SELECT FROM users d WHERE d.pseudonym = substr(u.pseudonym, 8))
"""


def upgrade() -> None:
    op.execute(PREFIX_IMPORTED_USERS_SQL)
    op.execute(CREATE_IMPORTED_USERS_SQL)
    op.execute(MOVE_CHOICES_SQL)
    op.execute(MOVE_ROUNDS_SQL)
    op.create_check_constraint(
        op.f("ck_users_import_pseudonym"),
        "users",
        "(source = 'import') = (pseudonym LIKE 'import:%')",
    )
    op.create_table(
        "retired_pseudonyms",
        sa.Column("sha256", sa.Text(), nullable=False),
        sa.CheckConstraint("sha256 ~ '^[0-9a-f]{64}$'", name=op.f("ck_retired_pseudonyms_sha256")),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_retired_pseudonyms")),
    )
    op.execute(RETIRE_FUNCTION_SQL)
    op.execute(RETIRE_TRIGGER_SQL)


def downgrade() -> None:
    op.execute("DROP TRIGGER users_retire_pseudonym ON users")
    op.execute("DROP FUNCTION retire_pseudonym()")
    op.drop_table("retired_pseudonyms")
    op.drop_constraint(op.f("ck_users_import_pseudonym"), "users", type_="check")
    op.execute(UNPREFIX_IMPORTED_USERS_SQL)
