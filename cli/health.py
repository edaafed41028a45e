"""`hps health [bot|worker|scheduler ...] [--here]`: are the processes alive?

Each process heartbeats a row in the database: the bot and the scheduler in `services`
(every `health.heartbeat_seconds`; the bot with whether its gateway connection is up),
workers in `workers` (every `worker.heartbeat_seconds`). A process is healthy while its
last heartbeat is younger than `health.stale_seconds` (workers: `worker.lease_seconds`, the
age at which their jobs are taken over) and, for the bot, its shards are connected to
Discord's gateway. The exit code is 0 when every kind asked for has a healthy process, 1
otherwise (and when the database cannot be reached), so container health checks use it:
`hps health bot --here` in the bot's container checks that container's bot, and
`hps health --here` whatever runs there (the Dockerfile's HEALTHCHECK).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import datetime, timedelta

import typer

from cli.common import console, database, err_console, run, settings

KINDS = ("bot", "worker", "scheduler")


@dataclass(frozen=True)
class Seen:
    kind: str
    id: str
    hostname: str
    last_seen: datetime
    healthy: bool
    note: str


async def _seen(kinds: list[str]) -> tuple[list[Seen], datetime]:
    from db import jobs, services

    config = settings()
    stale = timedelta(seconds=config.health.stale_seconds)
    lease = timedelta(seconds=config.worker.lease_seconds)
    seen: list[Seen] = []
    async with database(config) as pool:
        now = await pool.fetchval("SELECT now()")
        for kind in kinds:
            if kind == "worker":
                live = {w[0] for w in await services.live_workers(pool, lease)}
                for worker in await jobs.list_workers(pool):
                    note = f"{','.join(worker.kinds)} on {worker.device}"
                    if worker.stopped_at:
                        note += ", stopped"
                    healthy = worker.id in live
                    seen.append(
                        Seen(kind, worker.id, worker.hostname, worker.last_seen_at, healthy, note)
                    )
                continue
            for service in await services.list_services(pool, kind, stale):
                healthy, note = service.alive, "stopped" if service.stopped_at else ""
                if kind == "bot" and service.alive:
                    connected = bool(service.state.get("gateway"))
                    healthy = connected
                    note = (
                        f"connected to the gateway, {service.state.get('guilds', 0)} guild(s)"
                        if connected
                        else "NOT connected to the gateway"
                    )
                seen.append(
                    Seen(kind, service.id, service.hostname, service.last_seen_at, healthy, note)
                )
    return seen, now


def _ago(then: datetime, now: datetime) -> str:
    seconds = max(0, int((now - then).total_seconds()))
    return f"{seconds} s ago" if seconds < 120 else f"{seconds // 60} min ago"


def health(
    kinds: list[str] = typer.Argument(None, help="bot, worker, scheduler (default: all three)."),
    here: bool = typer.Option(
        False, "--here", help="Only the processes of this machine (container): a health check."
    ),
) -> None:
    """Whether the bot (connected to Discord's gateway), the workers and the scheduler are
    alive, from their heartbeats in the database; exit 1 if a kind has none. With --here
    and no KIND: the kinds that run on this machine."""
    asked = list(dict.fromkeys(kinds or KINDS))
    unknown = [k for k in asked if k not in KINDS]
    if unknown:
        err_console.print(
            f"[red]error:[/red] unknown kind {', '.join(unknown)}: use {', '.join(KINDS)}"
        )
        raise typer.Exit(2)
    seen, now = run(_seen(asked))
    host = socket.gethostname()
    if here:
        seen = [s for s in seen if s.hostname == host]
        if not kinds:  # the kinds that run on this machine (a container runs one)
            asked = [k for k in KINDS if any(s.kind == k for s in seen)]
            if not asked:
                console.print(f"[red]down[/red] nothing of ours has run on this machine ({host})")
                raise typer.Exit(1)
    missing = []
    for kind in asked:
        mine = [s for s in seen if s.kind == kind]
        for s in mine:
            mark = "[green]ok[/green]  " if s.healthy else "[red]down[/red]"
            note = f" ({s.note})" if s.note else ""
            console.print(
                f"{mark} {kind:<9} {s.id}: last heartbeat {_ago(s.last_seen, now)}{note}",
                highlight=False,
            )
        if not any(s.healthy for s in mine):
            missing.append(kind)
            where = f" on this machine ({host})" if here else ""
            console.print(f"[red]down[/red] {kind:<9} none healthy{where}", highlight=False)
    if missing:
        raise typer.Exit(1)
