"""`hps jobs list|dead|show|retry|cancel`: the job queue, without SQL.

A generate job belongs to a round: retrying it retries the round (queued again, its
requester's message updated by the bot), and cancelling it fails the round with a reason
its requester sees, in the same transaction, so no round is left waiting for a job that
will never run.
"""

from __future__ import annotations

import json

import typer
from rich.table import Table

from cli.common import console, database, fail, run, settings

app = typer.Typer(help="The job queue: list, dead letters, retry, cancel.", no_args_is_help=True)

CANCELLED_ROUND = "A maintainer cancelled this round's generation. You can retry it."


def _last_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[-1][:120] if lines else ""


def _table(rows: list, title: str) -> Table:  # type: ignore[type-arg]
    table = Table(title=title)
    for column in ("id", "kind", "state", "attempts", "created", "finished", "error"):
        table.add_column(column, overflow="fold")
    for job in rows:
        table.add_row(
            str(job.id),
            job.kind,
            job.state,
            f"{job.attempts}/{job.max_attempts}",
            job.created_at.strftime("%Y-%m-%d %H:%M"),
            job.finished_at.strftime("%Y-%m-%d %H:%M") if job.finished_at else "",
            _last_line(job.error),
        )
    return table


@app.command("list")
def list_(
    kind: str | None = typer.Option(None, "--kind", help="Only this kind (e.g. generate)."),
    state: str | None = typer.Option(
        None, "--state", help="queued, running, done, dead or cancelled."
    ),
    limit: int = typer.Option(50, "--limit", min=1, help="Newest first, at most this many."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """The newest jobs, with their state, attempts and last error line."""
    from db import jobs

    async def _list() -> list[jobs.Job]:
        async with database(settings()) as pool:
            return await jobs.list_jobs(pool, kind=kind, state=state, limit=limit)

    rows = run(_list())
    if as_json:
        print(json.dumps([_as_json(j) for j in rows], indent=2, default=str))
        return
    console.print(_table(rows, "Jobs" if not state else f"Jobs ({state})"))


@app.command("dead")
def dead(limit: int = typer.Option(50, "--limit", min=1)) -> None:
    """The dead letters: jobs that failed every attempt (`hps jobs show ID` for the whole
    traceback, `hps jobs retry ID` once the cause is fixed)."""
    list_(kind=None, state="dead", limit=limit, as_json=False)


def _as_json(job) -> dict:  # type: ignore[no-untyped-def, type-arg]
    from dataclasses import asdict

    return asdict(job)


@app.command("show")
def show(job_id: int = typer.Argument(..., help="The job's id.")) -> None:
    """One job in full: payload, result and error (the traceback of a dead job)."""
    from db import jobs

    async def _get() -> jobs.Job | None:
        async with database(settings()) as pool:
            return await jobs.get(pool, job_id)

    job = run(_get())
    if job is None:
        raise fail(f"no job {job_id}")
    print(json.dumps(_as_json(job), indent=2, default=str))


@app.command("retry")
def retry(job_ids: list[int] = typer.Argument(..., help="Dead or cancelled jobs.")) -> None:
    """Queue dead or cancelled jobs again with fresh attempts (a generate job: its failed
    round, whose message in Discord then says a maintainer queued it again)."""
    from db import jobs, rounds

    async def _retry() -> list[str]:
        said = []
        async with database(settings()) as pool:
            for job_id in job_ids:
                job = await jobs.get(pool, job_id)
                if job is None:
                    said.append(f"job {job_id}: no such job")
                    continue
                round_id = job.payload.get("round_id") if job.kind == "generate" else None
                if isinstance(round_id, int):
                    again = await rounds.retry_round(pool, round_id)
                    said.append(
                        f"job {job_id}: round {round_id} queued again (job {again.id})"
                        if again
                        else f"job {job_id}: its round {round_id} is not failed; nothing to retry"
                    )
                    continue
                again = await jobs.retry(pool, job_id)
                said.append(
                    f"job {job_id}: queued again"
                    if again
                    else f"job {job_id}: is {job.state}, not dead or cancelled; nothing to retry"
                )
        return said

    lines = run(_retry())
    for line in lines:
        console.print(line, highlight=False)
    if any("queued again" not in line for line in lines):
        raise typer.Exit(1)


@app.command("cancel")
def cancel(job_ids: list[int] = typer.Argument(..., help="Queued jobs.")) -> None:
    """Cancel queued jobs (running ones finish). A generate job's round fails with a reason
    its requester sees, and may be retried."""
    from db import jobs, rounds
    from db.connect import transaction

    async def _cancel() -> list[str]:
        said = []
        async with database(settings()) as pool:
            for job_id in job_ids:
                async with transaction(pool) as conn:
                    job = await jobs.get(conn, job_id)
                    if job is None or not await jobs.cancel(conn, [job_id]):
                        state = job.state if job else "unknown"
                        said.append(f"job {job_id}: is {state}, not queued; nothing cancelled")
                        continue
                    round_id = job.payload.get("round_id") if job.kind == "generate" else None
                    if isinstance(round_id, int):
                        await rounds.fail_round(conn, round_id, CANCELLED_ROUND)
                        said.append(f"job {job_id}: cancelled; round {round_id} failed")
                    else:
                        said.append(f"job {job_id}: cancelled")
        return said

    lines = run(_cancel())
    for line in lines:
        console.print(line, highlight=False)
    if any("nothing cancelled" in line for line in lines):
        raise typer.Exit(1)
