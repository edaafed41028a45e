"""The SQL of the views and functions the migrations create, one file per version.

`db/sql/<object>/<revision>.sql` is `<object>` as migration `<revision>` made it: a view's
query (the migration writes `CREATE [OR REPLACE] VIEW <object> AS` before it) or a
function's whole `CREATE FUNCTION` statement. A migration that changes one adds a new file
and loads it by name; its downgrade loads the previous version. So a change reads as a diff
between two files (`diff db/sql/record_choice/0002.sql db/sql/record_choice/0006.sql`), and
a file never changes once its migration is released: databases already migrated hold it.
"""

from __future__ import annotations

from importlib.resources import files


def load(name: str) -> str:
    """The SQL of `name`, "<object>/<revision>" (e.g. "record_choice/0006")."""
    return files(__name__).joinpath(*f"{name}.sql".split("/")).read_text(encoding="utf-8")
