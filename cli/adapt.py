"""`hps adapt run|label|train|eval|review`: adapting Stable Diffusion (the paper's HPS recipe
or Diffusion-DPO) and measuring adapters live."""

from __future__ import annotations

import getpass
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from cli.common import console, database, fail, run, settings
from cli.options import apply_changes, settings_options
from hps.settings import Settings

app = typer.Typer(
    help="Adapt Stable Diffusion (the paper's HPS recipe, or Diffusion-DPO on people's pairs) "
    "and measure adapters live.",
    no_args_is_help=True,
)

NAME_HELP = "Run name (runs_dir/NAME, and the version's name); an existing run resumes."


def _actor() -> str:
    return f"cli:{getpass.getuser()}"


def _resources(config: Settings, pool: Any) -> Any:
    """The generator, the serving HPS model and other reward models, loaded on first use,
    and the image store."""
    from hps.storage import storage
    from pipeline.devices import resolve_device
    from pipeline.generate import Generator
    from pipeline.runs import Resources
    from pipeline.score import serving_scorer

    loaded: dict[str, Any] = {}

    async def generator() -> Generator:
        if "generator" not in loaded:
            device = resolve_device(config.models.device)
            loaded["generator"] = Generator.from_settings(config.generation, device)
        return loaded["generator"]

    async def scorer() -> Any:
        return (await serving_scorer(pool, config, loaded))[0]

    async def judges(names: Any) -> Any:
        from pipeline.scorers import cached_scorers

        return await cached_scorers(names, config, loaded)

    return Resources(generator, scorer, judges, storage(config).images)


@contextmanager
def _stop_on_ctrl_c() -> Iterator[threading.Event]:
    """The first Ctrl-C sets the event (the stage in hand stops at its next batch or step,
    its work kept for resuming); a second one interrupts at once."""
    stop = threading.Event()

    def first(signum: int, frame: Any) -> None:
        stop.set()
        console.print("stopping after this step (Ctrl-C again to stop at once)")
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, first)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def _pipeline(until: str, name: str | None, changes: dict[str, Any], data: Path | None) -> None:
    from pipeline.adapt.recipes import RECIPES, USER_ERRORS, recipe_name
    from pipeline.handlers import Cancelled
    from pipeline.hps_model import ModelLoadError
    from pipeline.runs import run_recipe

    config = apply_changes(settings(), "adapt", changes)
    name = name or f"sd_adapter-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    exists = (config.runs_dir / name).exists()
    if exists and changes:
        console.print(
            f"run {name} exists: it resumes with the recipe it started with; "
            "the recipe options given are ignored",
            highlight=False,
        )
    recipe = RECIPES[recipe_name(config, name)]
    if data is not None and recipe is not RECIPES["dpo"]:
        raise fail("--data applies to --recipe dpo (pairs from a folder)")
    options = {"data": data} if data is not None and not exists else {}
    if until == "label":  # the stages before training, whichever the recipe
        names = [stage.name for stage in recipe.stages]
        until = names[names.index("train") - 1]

    async def _run(stop: threading.Event) -> Any:
        async with database(config) as pool:
            return await run_recipe(
                recipe,
                pool,
                config,
                name=name,
                resources=_resources(config, pool),
                until=until,
                actor=_actor(),
                cancelled=stop,
                **options,
            )

    try:
        with _stop_on_ctrl_c() as stop:
            outcome = run(_run(stop))
    except (*USER_ERRORS, ModelLoadError) as exc:
        raise fail(str(exc)) from None
    except Cancelled as exc:
        raise fail(f"{exc}; `hps adapt run --name {name}` resumes the run", 130) from None
    if outcome.main:
        console.print(f"run folder: {outcome.run.path}", highlight=False)
        console.print(outcome.summary, highlight=False)


DATA_HELP = (
    "With --recipe dpo: pairs from this folder instead of the database: an HPD-layout "
    "folder, or a Pick-a-Pic-format one (`hps export --format pickapic`, Pick-a-Pic's "
    "Parquet: caption, jpg_0, jpg_1, label_0, label_1)."
)


def _with_recipe(until: str, doc: str) -> Any:
    @settings_options("adapt")
    def command(
        name: str | None = typer.Option(None, "--name", help=NAME_HELP),
        data: Path | None = typer.Option(None, "--data", help=DATA_HELP),
        changes: dict[str, Any] | None = None,
    ) -> None:
        _pipeline(until, name, changes or {}, data)

    command.__doc__ = doc
    return command


app.command("run")(
    _with_recipe(
        "register",
        "The whole loop of the recipe (--recipe, adapt.recipe): hps = sample prompts, "
        "generate, score, label, fine-tune; dpo = take people's pairs (or --data's), "
        "optionally cache their latents, train with Diffusion-DPO. Then evaluate offline, "
        "register, start A/B testing. Resumes a run of the same --name after its last "
        "finished stage (training from its latest checkpoint), with its own recipe.",
    )
)
app.command("label")(
    _with_recipe(
        "label",
        "The stages before training: hps = sample prompts, generate and score their images, "
        "label them and write the fine-tuning set; dpo = take the pairs (and cache their "
        "latents).",
    )
)
app.command("train")(
    _with_recipe(
        "train",
        "Train the LoRA (after the earlier stages, run first if needed). Under "
        "`accelerate launch -m cli adapt train --name N` on several GPUs, after `hps adapt "
        "label --name N`; then `hps adapt run --name N` evaluates and registers.",
    )
)


@app.command("eval")
def evaluate(
    version: str | None = typer.Argument(
        None, help="An sd_adapter version (default: the newest candidate)."
    ),
) -> None:
    """Offline evaluation on held-out prompts: paired images (same seeds) of the adapter
    and its parent, scored by the serving HPS: mean HPS, gain, paired win rate (95% CI).
    Stored in the version's metrics; a candidate then enters A/B testing or is retired."""
    from db.models import ModelError
    from pipeline.adapt.evaluate import JudgeUnavailable
    from pipeline.adapt.prompts import PromptFileError
    from pipeline.adapt.run import evaluate_version
    from pipeline.hps_model import ModelLoadError

    config = settings()

    async def _eval() -> Any:
        async with database(config) as pool:
            return await evaluate_version(
                pool, config, version, resources=_resources(config, pool), actor=_actor()
            )

    try:
        evaluated, report, _, reason = run(_eval())
    except (ModelError, ModelLoadError, PromptFileError, JudgeUnavailable) as exc:
        raise fail(str(exc)) from None
    table = Table(title=f"{evaluated.name} against its parent (held-out prompts, same seeds)")
    for column in ("pairs", "prompts", "HPS adapted", "HPS parent", "gain (95% CI)", "win rate"):
        table.add_column(column, justify="right")
    if report.get("pairs"):
        gain_low, gain_high = report["hps_gain_ci"]
        low, high = report["win_rate_ci"]
        table.add_row(
            str(report["pairs"]),
            str(report["prompts"]),
            f"{report['hps_adapted']:.3f}",
            f"{report['hps_parent']:.3f}",
            f"{report['hps_gain']:+.3f} [{gain_low:+.3f}, {gain_high:+.3f}]",
            f"{report['win_rate']:.1%} [{low:.1%}, {high:.1%}]",
        )
    console.print(table)
    console.print(f"{evaluated.name} is {evaluated.status}: {reason}", highlight=False)


@app.command("review")
def review(
    dry_run: bool = typer.Option(False, "--dry-run", help="Decide, but change nothing."),
) -> None:
    """Review the adapters in A/B testing now (the scheduler does it every
    `schedules.review_adapters`): take the live test's planned looks that are due; promote
    the significantly better, retire the worse and, after the last look, the inconclusive."""
    from pipeline.adapt.live import Design
    from pipeline.adapt.live import review as review_adapters

    config = settings()

    async def _review() -> Any:
        async with database(config) as pool:
            return await review_adapters(pool, config.adapt, actor=_actor(), apply=not dry_run)

    reviews = run(_review())
    if not reviews:
        console.print("No adapter is in A/B testing.")
        return
    design = Design.of(config.adapt)
    table = Table(title="Adapters in A/B testing" + (" (dry run)" if dry_run else ""))
    columns = ("version", "against", "rounds", "wins", "win rate (95% CI)", "looks", "decision")
    for column in columns:
        table.add_column(column)
    for r in reviews:
        live = r.live
        table.add_row(
            r.version.name,
            r.opponent.name if r.opponent else "-",
            str(live.rounds if live else 0),
            str(live.wins if live else 0),
            f"{live.win_rate:.1%} [{live.low:.1%}, {live.high:.1%}]" if live else "-",
            f"{len(r.decision.looks)} of {design.looks} (every {design.every})",
            f"{r.decision.action}: {r.decision.reason}",
        )
    console.print(table)
