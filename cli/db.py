"""`hps db upgrade|downgrade|status`."""

from __future__ import annotations

from collections.abc import Callable

import typer

from cli.common import console, fail, run, settings
from hps.settings import redact_url

app = typer.Typer(help="Database migrations.", no_args_is_help=True)


def _alembic(command: Callable[[str, str], None], url: str, revision: str) -> None:
    """An Alembic command, its refusals (an unknown or impossible revision) as errors."""
    from alembic.util import CommandError

    try:
        command(url, revision)
    except CommandError as exc:
        raise fail(f"{exc} (see `hps db status`)") from None


def _url() -> str:
    from db.connect import database_url

    return database_url(settings())


@app.command("upgrade")
def upgrade(revision: str = typer.Argument("head", help="Target revision.")) -> None:
    """Apply migrations up to REVISION (default: the newest)."""
    from cli.store import adopt_local_models
    from db import migrate

    url = _url()
    _alembic(migrate.upgrade, url, revision)
    console.print(f"{redact_url(url)}: upgraded to {revision}", highlight=False)
    if revision == "head":
        # Model folders registered before the store (0013 named them by key): into its layout.
        adopt_local_models(settings())


# `-1` (one revision down) must reach the argument rather than be taken for an option.
@app.command("downgrade", context_settings={"ignore_unknown_options": True})
def downgrade(
    revision: str = typer.Argument(..., help="Target revision, e.g. -1 or base."),
    yes: bool = typer.Option(False, "--yes", help="Do not ask for confirmation."),
) -> None:
    """Revert migrations down to REVISION (this can drop data)."""
    from db import migrate

    url = _url()
    if not yes:
        typer.confirm(f"Downgrade {redact_url(url)} to {revision}? This can drop data", abort=True)
    _alembic(migrate.downgrade, url, revision)
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
