"""`hps db upgrade|downgrade|status|analysts`."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import typer

from cli.common import console, err_console, fail, run, settings
from hps.settings import redact_url

app = typer.Typer(help="Database migrations.", no_args_is_help=True)


def _alembic(command: Callable[..., Any], url: str, revision: str, **options: Any) -> Any:
    """An Alembic command, its refusals (an unknown or impossible revision) and lock
    timeouts as errors."""
    from alembic.util import CommandError

    from db.migrate import MigrationLockTimeout

    try:
        return command(url, revision, **options)
    except CommandError as exc:
        raise fail(f"{exc} (see `hps db status`)") from None
    except MigrationLockTimeout as exc:
        raise fail(str(exc)) from None


def _url() -> str:
    from db.connect import database_url

    return database_url(settings())


LOCK_TIMEOUT_HELP = (
    "Seconds to wait for the migration lock (another upgrade) and, trying again, for tables "
    "other sessions use; then stop, having applied nothing."
)


@app.command("upgrade")
def upgrade(
    revision: str = typer.Argument("head", help="Target revision."),
    lock_timeout: float = typer.Option(300.0, min=0.001, help=LOCK_TIMEOUT_HELP),
) -> None:
    """Apply migrations up to REVISION (default: the newest), then the analysts' policy."""
    from cli.store import adopt_local_models
    from db import migrate

    url = _url()
    wait = timedelta(seconds=lock_timeout)
    skipped = _alembic(migrate.upgrade, url, revision, lock_wait=wait, analysts=settings().analysts)
    console.print(f"{redact_url(url)}: upgraded to {revision}", highlight=False)
    _print_skipped(skipped)
    if revision == "head":
        # Model folders registered before the store (0014 named them by key): into its layout.
        adopt_local_models(settings())


def _print_skipped(skipped: list[str]) -> None:
    for what in skipped:
        err_console.print(f"[yellow]analysts' policy not applied:[/yellow] {what}", highlight=False)


# `-1` (one revision down) must reach the argument rather than be taken for an option.
@app.command("downgrade", context_settings={"ignore_unknown_options": True})
def downgrade(
    revision: str = typer.Argument(..., help="Target revision, e.g. -1 or base."),
    yes: bool = typer.Option(False, "--yes", help="Do not ask for confirmation."),
    lock_timeout: float = typer.Option(300.0, min=0.001, help=LOCK_TIMEOUT_HELP),
) -> None:
    """Revert migrations down to REVISION (this can drop data)."""
    from db import migrate

    url = _url()
    if not yes:
        typer.confirm(f"Downgrade {redact_url(url)} to {revision}? This can drop data", abort=True)
    _alembic(migrate.downgrade, url, revision, lock_wait=timedelta(seconds=lock_timeout))
    console.print(f"database downgraded to {revision}")


@app.command("status")
def status() -> None:
    """Show the current and newest revisions; exit 1 if migrations are pending."""
    from db import migrate
    from db.connect import connect

    url = _url()

    async def _status() -> migrate.MigrationStatus:
        conn = await connect(url)
        try:
            return await migrate.status(conn)
        finally:
            await conn.close()

    try:
        state = run(_status())
    except migrate.UnknownRevision as exc:
        raise fail(str(exc)) from None
    console.print(f"database: {redact_url(url)}", highlight=False)
    console.print(f"current:  {state.current or '(empty database)'}")
    console.print(f"head:     {state.head}")
    if not state.up_to_date:
        console.print(f"pending:  {', '.join(state.pending)}")
        raise fail("migrations are pending: run `hps db upgrade`")
    console.print("up to date")


@app.command("analysts")
def analysts() -> None:
    """Apply the analysts' policy (no temporary objects, advisory locks or large objects;
    each hps_analyst login's timeouts and connection limit) and list the logins."""
    from db import analysts as policy
    from db.connect import connect

    url = _url()
    limits = settings().analysts

    async def _apply() -> tuple[list[str], list[policy.Login]]:
        conn = await connect(url)
        try:
            return await policy.secure(conn, limits), await policy.logins(conn)
        finally:
            await conn.close()

    skipped, logins = run(_apply())
    if not logins:
        role = policy.ROLE
        console.print(f"no logins in {role} yet (CREATE ROLE name LOGIN IN ROLE {role})")
    for login in logins:
        limit = "none" if login.connection_limit < 0 else str(login.connection_limit)
        settings_ = ", ".join(login.settings) or "no settings"
        console.print(f"{login.name}: {limit} connection(s); {settings_}", highlight=False)
    _print_skipped(skipped)
    if skipped:
        raise typer.Exit(1)
