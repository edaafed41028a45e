"""`hps models list|promote|rollback`: the model registry."""

from __future__ import annotations

import getpass
import json
from typing import Any

import typer
from rich.table import Table

from cli.common import console, database, fail, run, settings

app = typer.Typer(help="The model registry: versions, promotion, rollback.", no_args_is_help=True)


def _actor() -> str:
    return f"cli:{getpass.getuser()}"


def _pct(value: Any) -> str:
    return f"{value:.1%}" if isinstance(value, int | float) else "-"


@app.command("list")
def list_(
    kind: str | None = typer.Option(None, "--kind", help="classifier, sd_base or sd_adapter."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Every version with its status and offline numbers (a classifier's test accuracy, an
    adapter's paired win rate and HPS gain over its parent) beside an adapter's recipe
    (hps, dpo) and live A/B numbers (fresh for those in testing, as of their last review
    for the others); then the live win rate of each recipe's adapters together."""
    from db import models, stats

    async def _list() -> Any:
        async with database(settings()) as pool:
            versions = await models.list_versions(pool, kind)
            live = await stats.live_records(pool, versions)
            return versions, live, await stats.live_by_recipe(pool)

    versions, live, by_recipe = run(_list())
    recipes = [_recipe_row(r) for r in by_recipe] if kind in (None, "sd_adapter") else []
    if as_json:
        rows = [
            {
                "name": v.name,
                "kind": v.kind,
                "recipe": models.recipe_of(v),
                "status": v.status,
                "parent_id": v.parent_id,
                "artifact": v.artifact,
                "sha256": v.sha256,
                "metrics": v.metrics,
                "live": live.get(v.id),
                "created_at": v.created_at.isoformat(),
            }
            for v in versions
        ]
        print(json.dumps(rows, indent=2))
        return
    names = {v.id: v.name for v in versions}
    table = Table(title="Model versions")
    columns = ("name", "kind", "recipe", "status", "created", "parent", "test top-1",
               "pairwise", "n")  # fmt: skip
    for column in (*columns, "offline win (HPS gain)", "live rounds", "live win"):
        table.add_column(column)
    for v in versions:
        test = v.metrics.get("test", {})
        offline = v.metrics.get("offline", {})
        record = live.get(v.id) or {}
        table.add_row(
            v.name,
            v.kind,
            models.recipe_of(v) or "-",
            v.status,
            f"{v.created_at:%Y-%m-%d %H:%M}",
            names.get(v.parent_id, "-") if v.parent_id else "-",
            _pct(test.get("top1")),
            _pct(test.get("pairwise")),
            str(test.get("n", "-")),
            _with_ci(offline.get("win_rate"), offline.get("win_rate_ci"))
            + (f" ({offline['hps_gain']:+.3f})" if offline.get("hps_gain") is not None else ""),
            f"{record.get('wins', 0)}/{record['rounds']}" if "rounds" in record else "-",
            _with_ci(record.get("win_rate"), record.get("win_rate_ci")),
        )
    console.print(table)
    if recipes:
        by = Table(title="Live win rate by recipe (adapters against their incumbents)")
        for column in ("recipe", "adapters tested", "rounds", "wins", "win rate (95% CI)"):
            by.add_column(column)
        for r in recipes:
            by.add_row(r["recipe"], str(r["versions"]), str(r["rounds"]), str(r["wins"]),
                       _with_ci(r["win_rate"], r["win_rate_ci"]))  # fmt: skip
        console.print(by)


def _recipe_row(row: dict[str, Any]) -> dict[str, Any]:
    """A recipe's live record with its win rate and Wilson 95% interval."""
    from pipeline.intervals import wilson_interval

    rounds, wins = row["rounds"], row["wins"]
    return {**row, "win_rate": wins / rounds, "win_rate_ci": list(wilson_interval(wins, rounds))}


def _with_ci(value: Any, interval: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    low, high = interval
    return f"{value:.1%} [{low:.1%}, {high:.1%}]"


@app.command("promote")
def promote(
    name: str = typer.Argument(..., help="Version name or id."),
    force: bool = typer.Option(
        False, "--force", help="Promote even without an evaluation that beats the serving one."
    ),
    reason: str | None = typer.Option(None, "--reason"),
) -> None:
    """Serve a version (the serving one of its kind retires). A classifier must have been
    evaluated against the serving one on the same test examples and beat it by the margin."""
    from db import models
    from db.promotion import check_promotable, configured_label

    config = settings()
    margin, configured = config.train.promote_margin, configured_label(config)

    async def _promote() -> models.Promotion:
        async with database(config) as pool:
            return await models.promote(
                pool,
                name,
                actor=_actor(),
                reason=reason,
                gate=None if force else (lambda v, s: check_promotable(v, s, margin, configured)),
            )

    try:
        result = run(_promote())
    except models.ModelError as exc:
        raise fail(str(exc)) from None
    assert result.promoted is not None
    retired = f"; {result.retired.name} retired" if result.retired else ""
    console.print(f"{result.promoted.name} is serving{retired}", highlight=False)


@app.command("rollback")
def rollback(
    kind: str = typer.Option("classifier", "--kind"),
    reason: str | None = typer.Option(None, "--reason"),
) -> None:
    """Stop serving the current version of a kind and serve again the one before it."""
    from db import models

    async def _rollback() -> models.Promotion:
        async with database(settings()) as pool:
            return await models.rollback(pool, kind, actor=_actor(), reason=reason)

    try:
        result = run(_rollback())
    except models.ModelError as exc:
        raise fail(str(exc)) from None
    assert result.retired is not None
    now = result.promoted.name if result.promoted else "the configured base model"
    console.print(f"{result.retired.name} rolled back; now serving: {now}", highlight=False)
