"""Everything PostgreSQL: the asyncpg pool, the queries (one module per aggregate),
the embedded-server default and the Alembic migrations. Nothing outside `db/` writes SQL.

Query functions take an `Executor` (an asyncpg connection or pool) and return dataclasses.
SQL statements are module-level constants named `*_SQL`; a test prepares every one of them
against the migrated schema, so code and migrations cannot drift apart unnoticed.
"""
