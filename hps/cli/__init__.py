"""The `hps` command line. Each area has its own module and sub-app; heavy imports
(torch, diffusers, discord) happen inside commands, so `hps db ...` starts fast."""

from __future__ import annotations

import typer
from rich.markup import escape

from hps.cli import adapt as adapt_cli
from hps.cli import config as config_cli
from hps.cli import datasets as datasets_cli
from hps.cli import db as db_cli
from hps.cli import models as models_cli
from hps.cli import score as score_cli
from hps.cli import train as train_cli
from hps.cli.bot import bot
from hps.cli.common import err_console
from hps.cli.report import report
from hps.cli.scheduler import scheduler
from hps.cli.serve import serve
from hps.cli.worker import worker

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


def main() -> None:
    from db.connect import DatabaseUnreachable

    try:
        app()
    except DatabaseUnreachable as exc:  # not our bug: say what to check, no traceback
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        raise SystemExit(1) from None
