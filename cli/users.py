"""`hps users banned|ban|unban|forget`: what maintainers do in Discord, by Discord id.

Discord ids: Developer Mode (User Settings → Advanced), then right-click a user → Copy User
ID. `forget` is the one to run for a deletion request that comes by email.
"""

from __future__ import annotations

import getpass

import typer
from rich.table import Table

from cli.common import console, database, fail, run, settings

app = typer.Typer(help="Users: bans and forgetting, by Discord id.", no_args_is_help=True)


def _actor() -> str:
    return f"cli:{getpass.getuser()}"


@app.command("banned")
def banned() -> None:
    """Every banned and shadow-banned user."""
    from db import users

    async def _list() -> list[users.User]:
        async with database(settings()) as pool:
            return await users.banned_users(pool)

    rows = run(_list())
    table = Table(title="Banned users")
    for column in ("discord id", "ban", "since", "by", "reason"):
        table.add_column(column, overflow="fold")
    for user in rows:
        table.add_row(
            str(user.discord_id or "(forgotten)"),
            "shadow" if user.shadow_banned else "ban",
            user.banned_at.strftime("%Y-%m-%d %H:%M") if user.banned_at else "",
            user.banned_by or "",
            user.ban_reason or "",
        )
    console.print(table)


@app.command("ban")
def ban(
    discord_id: int = typer.Argument(..., help="The user's Discord id."),
    shadow: bool = typer.Option(
        False, "--shadow", help="Accept their clicks silently, stored flagged."
    ),
    reason: str | None = typer.Option(None, "--reason", help="Why (kept with the ban)."),
) -> None:
    """Ban a user from /dream and voting (as the /ban command does)."""
    from db import users

    async def _ban() -> None:
        async with database(settings()) as pool:
            await users.ban(pool, discord_id, shadow=shadow, reason=reason, actor=_actor())

    run(_ban())
    console.print(f"{'Shadow-banned' if shadow else 'Banned'} {discord_id}.")


@app.command("unban")
def unban(discord_id: int = typer.Argument(..., help="The user's Discord id.")) -> None:
    """Lift a user's ban."""
    from db import users

    async def _unban() -> bool:
        async with database(settings()) as pool:
            return await users.unban(pool, discord_id) is not None

    if not run(_unban()):
        raise fail(f"{discord_id} is unknown here; nothing changed")
    console.print(f"{discord_id} may dream and vote again.")


@app.command("forget")
def forget(
    discord_id: int = typer.Argument(..., help="The user's Discord id."),
    yes: bool = typer.Option(False, "--yes", help="Do not ask for confirmation."),
) -> None:
    """Delete a user's rounds (with their images and the votes on them), choices and clicks,
    as /forget-me does. The image files are deleted right after (those the store cannot
    delete now stay recorded, and the bot deletes them later); the bot deletes its Discord
    messages of those rounds (queued here; done at once while a bot runs, else when one
    starts). Not reached: exported datasets, backups, and training runs' files
    (data_dir/runs: prompt lists, image keys and choice ids)."""
    from db import images, users
    from db.locks import LockTimeout
    from hps.storage import storage

    if not yes:
        typer.confirm(
            f"Forget Discord user {discord_id}: delete their rounds, images, votes and "
            "choices? This cannot be undone",
            abort=True,
        )
    config = settings()

    async def _forget() -> bool:
        store = storage(config).images  # a folder or the bucket
        async with database(config) as pool:
            result = await users.forget_user(pool, discord_id)
            if result is None:
                return False
            # Committed: say so before anything else can fail.
            keys = result.orphaned_image_keys
            copies = (
                f" (and {result.imported_rounds_deleted} imported copy/copies of their rounds)"
                if result.imported_rounds_deleted
                else ""
            )
            console.print(
                f"Forgot {discord_id}: deleted {result.rounds_deleted} round(s){copies}, "
                f"{result.choices_deleted} choice(s) and {result.events_deleted} click "
                f"event(s); {len(keys)} image file(s) to delete.",
                highlight=False,
            )
            sweep = await images.delete_pending(pool, store.delete, keys=keys)
            left = await images.pending_deletions(pool, keys)
        console.print(f"Deleted {sweep.deleted} image file(s).", highlight=False)
        if left:
            why = f" ({sweep.error})" if sweep.error else ""
            console.print(
                f"{left} image file(s) could not be deleted now{why}: they are recorded "
                "(image_deletions) and the bot deletes them as soon as the store answers "
                "(it tries every minute; `hps health bot` tells whether it runs).",
                highlight=False,
            )
        if result.messages_queued:
            console.print(
                f"{result.messages_queued} Discord message(s) of those rounds are queued for "
                "the bot to delete (at once while it runs, else when it starts); "
                "`hps health bot` tells whether it runs.",
                highlight=False,
            )
        return True

    try:
        found = run(_forget())
    except LockTimeout as exc:
        raise fail(str(exc)) from None  # it says that nothing was deleted
    if not found:
        raise fail(f"no data about {discord_id}; nothing changed")
    console.print(
        "Not reached: exported datasets, backups, and training runs' files "
        f"({config.runs_dir}: their prompt lists, and the image keys and choice ids of their "
        "examples); delete their copies by hand if the request covers them.",
        highlight=False,
    )
