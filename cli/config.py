"""`hps config show`."""

from __future__ import annotations

import json

import typer

from cli.common import console, settings

app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)


@app.command("show")
def show(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Print the effective settings with every secret redacted."""
    data = settings().redacted()
    if as_json:
        print(json.dumps(data, indent=2, default=str))
        return
    for section, value in data.items():
        if isinstance(value, dict):
            console.print(f"[bold]\\[{section}][/bold]")
            for key, item in value.items():
                console.print(f"  {key} = {json.dumps(item, default=str)}", highlight=False)
        else:
            console.print(f"{section} = {json.dumps(value, default=str)}", highlight=False)
