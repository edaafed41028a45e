"""The `hps` command line. Each area has its own module and sub-app; heavy imports
(torch, diffusers, discord) happen inside commands, so `hps db ...` starts fast."""

from __future__ import annotations

import typer
from rich.markup import escape

from cli import adapt as adapt_cli
from cli import config as config_cli
from cli import datasets as datasets_cli
from cli import db as db_cli
from cli import jobs as jobs_cli
from cli import models as models_cli
from cli import score as score_cli
from cli import store as store_cli
from cli import train as train_cli
from cli import users as users_cli
from cli.bot import bot
from cli.common import err_console
from cli.demo import demo
from cli.health import health
from cli.report import report
from cli.scheduler import scheduler
from cli.serve import serve
from cli.worker import worker

app = typer.Typer(
    name="hps",
    help="Human Preference Score platform: choice bot, GPU workers, HPS training and exports.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(db_cli.app, name="db")
app.add_typer(config_cli.app, name="config")
app.add_typer(models_cli.app, name="models")
app.add_typer(adapt_cli.app, name="adapt")
app.add_typer(store_cli.app, name="store")
app.add_typer(jobs_cli.app, name="jobs")
app.add_typer(users_cli.app, name="users")
app.command("serve")(serve)
app.command("worker")(worker)
app.command("scheduler")(scheduler)
app.command("score")(score_cli.score)
app.command("train")(train_cli.train)
app.command("eval")(train_cli.evaluate)
app.command("import")(datasets_cli.import_)
app.command("export")(datasets_cli.export)
app.command("report")(report)
app.command("bot")(bot)
app.command("health")(health)
app.command("demo")(demo)


def main() -> None:
    from db.connect import DatabaseUnreachable
    from hps.store import StoreUnavailable

    try:
        app()
    except (DatabaseUnreachable, StoreUnavailable) as exc:  # say what to check, no traceback
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        raise SystemExit(1) from None
