"""The `hps` command line. Each area has its own module and sub-app; heavy imports
(torch, diffusers, discord) happen inside commands, so `hps db ...` starts fast."""

from __future__ import annotations

import typer

from hps.cli import config as config_cli
from hps.cli import db as db_cli
from hps.cli.bot import bot
from hps.cli.serve import serve

app = typer.Typer(
    name="hps",
    help="Human Preference Score platform: choice bot, GPU workers, HPS training and exports.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(db_cli.app, name="db")
app.add_typer(config_cli.app, name="config")
app.command("serve")(serve)
app.command("bot")(bot)


def main() -> None:
    app()
