"""The adaptation recipes by name (`adapt.recipe`): `hps`, the paper's (`run.SD_ADAPTATION`),
and `dpo`, Diffusion-DPO (`dpo.DIFFUSION_DPO`). Both make `sd_adapter` versions that go
through the same offline evaluation, gate, A/B testing and live review, so the live test
says which one serves the community better. A run keeps the recipe it started with: a
resumed run (a retried job, the same `--name` again) runs on with it, whatever
`adapt.recipe` says now."""

from __future__ import annotations

from typing import Any

from hps.settings import Settings
from pipeline.adapt.dpo import DIFFUSION_DPO
from pipeline.adapt.run import KIND, SD_ADAPTATION
from pipeline.handlers import JobContext
from pipeline.runs import Recipe, Run, run_job

RECIPES: dict[str, Recipe] = {"hps": SD_ADAPTATION, "dpo": DIFFUSION_DPO}
# Errors a person causes, in either recipe.
USER_ERRORS = tuple(dict.fromkeys(e for r in RECIPES.values() for e in r.user_errors))


def recipe_name(settings: Settings, run_name: str, asked: str | None = None) -> str:
    """The recipe of the run `run_name`: the one it started with if it exists, else
    `asked` (a job's payload), else `adapt.recipe`."""
    run = Run.open(settings.runs_dir / run_name)
    if run is not None:
        return str(run.recipe["adapt"].get("recipe", "hps"))
    return asked if asked in RECIPES else settings.adapt.recipe


async def handle_adapt_sd(ctx: JobContext) -> dict[str, Any]:
    """The `adapt_sd` job (/retrain sd, the schedule): the whole run of the recipe
    `adapt.recipe` names (a payload's `recipe` overrides it), on the database's data
    (`pipeline.runs.run_job`)."""
    payload = ctx.job.payload if isinstance(ctx.job.payload, dict) else {}
    name = recipe_name(ctx.settings, f"{KIND}-job{ctx.job.id}", payload.get("recipe"))
    return await run_job(ctx, RECIPES[name])
