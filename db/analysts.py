"""The analysts' policy: what `hps_analyst` and its logins may do besides reading.

The migrations grant the group role `hps_analyst` read access to the views and to the tables'
columns that identify nobody (0003, 0006, 0007, 0012). What they cannot hold is applied here,
after every `hps db upgrade` (and by `hps db analysts`), idempotently, because it does not
live in the schema: a database-wide privilege, the catalog functions' privileges and role
settings are lost by a clone or a restore, and need a superuser or a role administrator.

- **Nothing but reading.** PUBLIC (every role, analysts included) loses the right to create
  temporary tables and functions in this database (`TEMPORARY`), to create objects in the
  schema `public`, and to create large objects (`lo_creat`, `lo_create`, `lo_from_bytea`,
  `lo_import`); the platform uses none of them. The database owner keeps them.
- **No platform locks.** Taking an advisory lock is the platform's: a session that takes
  the migration lock, a training kind's queue lock or an image key's lock holds the
  platform up. PUBLIC loses the functions that take one, and the database owner and the
  role applying the policy (the platform's) get them. Releasing stays open to all (one can
  only release one's own, and connection pools release them all on every reset).
- **Limits.** Every login that is a member of `hps_analyst` gets, in this database, a
  statement timeout, an idle-in-transaction timeout and a lock timeout, and a connection
  limit (`AnalystSettings`). Role settings are not inherited from a group role, so each login
  gets them: create a login, then run `hps db analysts`. The timeouts are the session's
  defaults (a login can set them off in its session); the connection limit holds.

NOTIFY cannot be refused to anyone (PostgreSQL has no privilege for it), so an analyst can
send a notification on the platform's channels. The platform takes notifications as wake-ups
only: every listener reads what happened from the tables (`db.listen`), so a forged one costs a
read and changes nothing.

What needs a superuser (the functions) or a role administrator (the logins) and the role
applying the policy is not, is skipped and reported, never half-done: run `hps db analysts`
as such a role.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from db.connect import Executor, transaction
from hps.settings import AnalystSettings

ROLE = "hps_analyst"

ROLE_EXISTS_SQL = """
SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = $1)
"""

# Who applies the policy, and what they may change.
APPLIER_SQL = """
SELECT r.rolsuper AS superuser,
       r.rolcreaterole AS createrole,
       pg_has_role(d.datdba, 'MEMBER') AS owns_database,
       pg_has_role(n.nspowner, 'MEMBER') AS owns_public,
       format('%I', current_database()) AS database,
       format('%I', pg_get_userbyid(d.datdba)) AS owner,
       format('%I', current_user) AS applier,
       current_setting('lo_compat_privileges')::bool AS lo_compat_privileges
FROM pg_roles r, pg_database d, pg_namespace n
WHERE r.rolname = current_user AND d.datname = current_database() AND n.nspname = 'public'
"""

ADVISORY_FUNCTIONS_SQL = """
SELECT p.oid::regprocedure::text AS function
FROM pg_proc p
WHERE p.pronamespace = 'pg_catalog'::regnamespace
  AND (p.proname LIKE 'pg\\_advisory\\_%' OR p.proname LIKE 'pg\\_try\\_advisory\\_%')
  AND p.proname NOT LIKE '%unlock%'
ORDER BY 1
"""

LARGE_OBJECT_CREATORS_SQL = """
SELECT p.oid::regprocedure::text AS function
FROM pg_proc p
WHERE p.pronamespace = 'pg_catalog'::regnamespace
  AND p.proname IN ('lo_creat', 'lo_create', 'lo_from_bytea', 'lo_import')
ORDER BY 1
"""

# The logins in the role ($1), whether the applier may alter them (PostgreSQL 16 asks
# a CREATEROLE role for the admin option on the login), and their limits now.
LOGINS_SQL = """
SELECT r.rolname AS name,
       format('%I', r.rolname) AS ident,
       r.rolconnlimit AS connection_limit,
       coalesce(s.setconfig, '{}') AS settings,
       CASE WHEN me.rolsuper THEN true
            WHEN r.rolsuper OR NOT me.rolcreaterole THEN false
            WHEN current_setting('server_version_num')::int < 160000 THEN true
            ELSE pg_has_role(r.oid, 'MEMBER WITH ADMIN OPTION')
       END AS alterable
FROM pg_auth_members m
JOIN pg_roles g ON g.oid = m.roleid
JOIN pg_roles r ON r.oid = m.member
JOIN pg_roles me ON me.rolname = current_user
LEFT JOIN pg_db_role_setting s
    ON s.setrole = r.oid
   AND s.setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())
WHERE g.rolname = $1 AND r.rolcanlogin
ORDER BY r.rolname
"""

# Identifiers come quoted from the database (format('%I')), numbers from validated settings.
REVOKE_TEMPORARY_DDL = "REVOKE TEMPORARY ON DATABASE {database} FROM PUBLIC"
REVOKE_CREATE_DDL = "REVOKE CREATE ON SCHEMA public FROM PUBLIC"
REVOKE_EXECUTE_DDL = "REVOKE EXECUTE ON FUNCTION {function} FROM PUBLIC"
GRANT_EXECUTE_DDL = "GRANT EXECUTE ON FUNCTION {function} TO {roles}"
LOGIN_SETTING_DDL = "ALTER ROLE {login} IN DATABASE {database} SET {name} = '{value}'"
LOGIN_CONNECTIONS_DDL = "ALTER ROLE {login} CONNECTION LIMIT {limit}"


def login_settings(limits: AnalystSettings) -> dict[str, str]:
    """The session settings each analyst login gets in this database."""
    return {
        "statement_timeout": f"{limits.statement_timeout_seconds}s",
        "idle_in_transaction_session_timeout": f"{limits.idle_in_transaction_seconds}s",
        "lock_timeout": f"{limits.lock_timeout_seconds}s",
    }


@dataclass(frozen=True)
class Login:
    name: str
    connection_limit: int  # -1: none
    settings: list[str]  # as PostgreSQL keeps them: name=value


async def logins(db: Executor) -> list[Login]:
    """The analysts' logins and their limits in this database."""
    rows = await db.fetch(LOGINS_SQL, ROLE)
    return [Login(r["name"], r["connection_limit"], list(r["settings"])) for r in rows]


async def secure(db: Executor, limits: AnalystSettings) -> list[str]:
    """Apply the policy (module docstring) in one transaction; returns what was skipped
    and why (empty: all of it holds)."""
    if not await db.fetchval(ROLE_EXISTS_SQL, ROLE):
        return [f"no role {ROLE} (migrations before 0003): nothing to secure"]
    skipped: list[str] = []
    async with transaction(db) as tx:
        me = await tx.fetchrow(APPLIER_SQL)
        if me["superuser"] or me["owns_database"]:
            await tx.execute(REVOKE_TEMPORARY_DDL.format(database=me["database"]))
        else:
            skipped.append("TEMPORARY on the database: only its owner or a superuser may revoke it")
        if me["superuser"] or me["owns_public"]:
            await tx.execute(REVOKE_CREATE_DDL)
        else:
            skipped.append("CREATE on schema public: only its owner or a superuser may revoke it")
        if me["superuser"]:
            platform = sorted({me["owner"], me["applier"]})
            for row in await tx.fetch(ADVISORY_FUNCTIONS_SQL):
                await tx.execute(REVOKE_EXECUTE_DDL.format(function=row["function"]))
                await tx.execute(
                    GRANT_EXECUTE_DDL.format(function=row["function"], roles=", ".join(platform))
                )
            for row in await tx.fetch(LARGE_OBJECT_CREATORS_SQL):
                await tx.execute(REVOKE_EXECUTE_DDL.format(function=row["function"]))
        else:
            skipped.append(
                "the advisory lock and large object functions: only a superuser may revoke "
                "them (run `hps db analysts` as one)"
            )
        if me["lo_compat_privileges"]:
            skipped.append(
                "lo_compat_privileges is on: every role may read and write every large object "
                "(turn it off in postgresql.conf)"
            )
        for login in await tx.fetch(LOGINS_SQL, ROLE):
            if not login["alterable"]:
                skipped.append(
                    f"the limits of login {login['name']}: only a superuser or a role "
                    "administrator may set them (run `hps db analysts` as one)"
                )
                continue
            try:
                async with tx.transaction():  # a login dropped meanwhile is skipped
                    for name, value in login_settings(limits).items():
                        await tx.execute(
                            LOGIN_SETTING_DDL.format(
                                login=login["ident"], database=me["database"], name=name,
                                value=value,
                            )
                        )  # fmt: skip
                    await tx.execute(
                        LOGIN_CONNECTIONS_DDL.format(
                            login=login["ident"], limit=limits.connection_limit
                        )
                    )
            except asyncpg.UndefinedObjectError:
                continue
    return skipped
