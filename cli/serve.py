"""`hps serve`: everything on one machine, as child processes of one supervisor.

The children are `python -m cli bot`, `python -m cli scheduler` and `python -m cli worker`,
sharing this process's settings, with the database URL resolved once here (so an embedded
PostgreSQL is started once and lives as long as the supervisor). SIGTERM or SIGINT is
passed on to every child, each stops cleanly (the worker finishes or releases its job),
and the supervisor exits 0. A child that exits on its own stops the others, and the
supervisor exits 1.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from types import FrameType

from cli.common import console, err_console, fail, settings

log_prefix = "[bold]hps serve:[/bold]"


def serve() -> None:
    """Run the platform on this machine: migrate the database, then run the bot, the
    scheduler and a local worker until SIGTERM or Ctrl-C."""
    import typer
    from pydantic import SecretStr

    from cli.store import adopt_local_models
    from db import migrate
    from db.connect import database_url
    from hps.storage import storage

    config = settings()
    storage(config).check()  # one clear line for a wrong bucket or credentials
    url = database_url(config)
    try:
        skipped = migrate.upgrade(url, analysts=config.analysts)
    except migrate.MigrationLockTimeout as exc:
        raise fail(str(exc)) from None
    for what in skipped:
        err_console.print(f"{log_prefix} [yellow]analysts' policy not applied:[/yellow] {what}")
    adopt_local_models(config.model_copy(update={"database_url": SecretStr(url)}))
    console.print(f"{log_prefix} database is up to date", highlight=False)
    services = ["scheduler", "worker"]
    if config.discord.token is None:
        err_console.print(
            f"{log_prefix} [yellow]no Discord bot token[/yellow] (set HPS_DISCORD__TOKEN in the "
            "environment or .env, or \\[discord] token in hps.toml): running the scheduler and a "
            "worker without the bot (`hps demo` shows the bot without Discord)",
            highlight=False,
        )
    else:
        services.insert(0, "bot")
    env = {**os.environ, "HPS_DATABASE_URL": url}
    grace = config.worker.shutdown_grace_seconds + 30
    raise typer.Exit(supervise(services, env, grace))


def supervise(services: list[str], env: dict[str, str], grace: float) -> int:
    """Run `python -m cli <service>` for each service until a signal or a child's exit."""
    stop_signal: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop_signal.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    children: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name in services:
            children[name] = subprocess.Popen([sys.executable, "-m", "cli", name], env=env)
            console.print(f"{log_prefix} started {name} (pid {children[name].pid})")
        died = None
        while not stop_signal and died is None:
            time.sleep(0.2)
            died = next((n for n, p in children.items() if p.poll() is not None), None)
        if died is not None:
            err_console.print(
                f"{log_prefix} [red]{died} exited with code {children[died].returncode}[/red]: "
                "stopping the others",
                highlight=False,
            )
        else:
            console.print(f"{log_prefix} {signal.Signals(stop_signal[0]).name}: stopping")
        codes = _stop(children, grace)
        # A child still starting up when the signal came has no handler yet and dies of the
        # SIGTERM we sent it: it had nothing in hand, so that is a clean stop too.
        failed = [n for n, code in codes.items() if code not in (0, -signal.SIGTERM)]
        return 1 if died is not None or failed else 0
    finally:
        _stop(children, 5)  # only children still running after an error here
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop(children: dict[str, subprocess.Popen[bytes]], grace: float) -> dict[str, int]:
    """SIGTERM every running child, wait up to `grace` seconds, then SIGKILL."""
    for process in children.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    codes = {}
    for name, process in children.items():
        try:
            codes[name] = process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            err_console.print(f"{log_prefix} {name} did not stop in time: killed")
            process.kill()
            codes[name] = process.wait()
    return codes
