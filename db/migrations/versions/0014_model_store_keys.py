"""Model versions named by store keys: `model_versions.artifact` of a published version.

Trained classifiers and SD adapters were folders on the machine that trained them, named by
their absolute path (`<data_dir>/models/<name>`). They are now objects in the store
(`hps.model_store`): `models/<name>/<sha256 of the weights>/…` with a manifest, in a local
folder or an S3 bucket, and `artifact` holds that key. The weights' sha256 is the
`sha256` the registry always recorded, so each registered version's key is computed here in
SQL. Base models (`sd_base`: a hub id or a folder) and versions registered by hand with no
sha256 keep what they hold.

The files themselves move with `hps store migrate` (into an object store, or, which
`hps db upgrade` and `hps serve` do by themselves, into a local store's layout
`<data_dir>/models/<name>/<sha256>/`).

Downgrade: a key becomes the absolute path of that layout under the data directory of
the settings in force (`HPS_DATA_DIR`, default `data`), the folder that holds the version
in a local store (the manifest beside its files is ignored by loaders).

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-03
"""

from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UPGRADE_SQL = """
UPDATE model_versions SET artifact = 'models/' || name || '/' || sha256
WHERE kind IN ('classifier', 'sd_adapter')
  AND sha256 ~ '^[0-9a-f]{64}$'
  AND artifact LIKE '/%'
"""

DOWNGRADE_SQL = """
UPDATE model_versions SET artifact = :root || '/' || artifact
WHERE kind IN ('classifier', 'sd_adapter')
  AND artifact ~ '^models/[A-Za-z0-9][A-Za-z0-9._-]*/[0-9a-f]{64}$'
"""


def upgrade() -> None:
    op.execute(UPGRADE_SQL)


def _data_dir() -> Path:
    try:
        from hps.settings import get_settings

        return get_settings().data_dir
    except Exception:  # settings that do not load: the default folder
        return Path("data")


def downgrade() -> None:
    op.get_bind().execute(sa.text(DOWNGRADE_SQL), {"root": str(_data_dir().resolve())})
