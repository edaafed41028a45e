"""Diffusion-DPO as a recipe of stages (`pipeline.runs`), beside the paper's
(`pipeline.adapt.run`): run by `hps adapt run --recipe dpo` and by the `adapt_sd` job when
`adapt.recipe = dpo` (`pipeline.adapt.recipes`).

pairs (`pairs.py`: the database's, or a `--data` folder's) → latents (the optional latent
cache: the VAE once per image) → train (LoRA Diffusion-DPO, `dpo_train.py`) → eval (the
offline evaluation against the parent on held-out prompts, the same stage as the paper's
recipe: `run.EVAL`) → register (+ its gate: A/B testing or retired, `run.register_adapter`).
The live review then measures it against the incumbent like any adapter.

Adapters are not stacked: the LoRA starts from the base UNet, and Diffusion-DPO's reference
(what β anchors the adapter to) is the base, even when an adapter serves. The registry's
parent and the offline evaluation's opponent are the SD version serving when the run started
(that adapter, or the base), which the new adapter replaces if it wins.

A run lives in `runs_dir/<name>/`:

    manifest.json   the recipe (the adapt settings with `recipe = dpo`, the base model,
                    the sampling parameters, the `--data` folder, the split fractions),
                    the versions it started from, each finished stage
    pairs.jsonl     the pairs: caption, winner and loser image keys, side (train/heldout)
    prompts.json    the training captions, and the held-out prompts of the evaluation
    images/         a folder's pair images (a content-addressed store)
    latents/        the latent cache
    train/          metrics.jsonl, checkpoints/, validation/, adapter/
    eval/           pairs.jsonl and the paired images

The held-out prompts of the offline evaluation are those the paper's recipe uses (the
database's prompts that `adapt.heldout_fraction` holds out, and the prompt file's), which
no pair of either recipe trains on; with a `--data` folder, also its held-out pairs'
captions (up to `adapt.eval_prompts` in all). No pair whose caption is among them is
trained on (a Pick-a-Pic folder's validation captions can be in its train split too).
"""

from __future__ import annotations

import asyncio
import json
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from db import models
from hps.settings import AdaptSettings, Settings
from hps.storage import storage
from hps.store import ImageStore, LocalImageStore
from pipeline.adapt.pairs import (
    PAIRS_FILE,
    Pair,
    data_format,
    drop_missing,
    heldout_captions,
    hold_out_captions,
    pairs_from_db,
    pairs_from_folder,
    read_pairs_file,
    write_pairs,
)
from pipeline.adapt.prompts import is_held_out, read_prompt_file, sample_prompts
from pipeline.adapt.run import (
    EVAL,
    KIND,
    PROMPTS_FILE,
    TRAIN_DIR,
    USER_ERRORS,
    AdaptOutcome,
    NothingToDo,
    create_adapter_run,
    gate_of,
    register_adapter,
    sampling_of,
)
from pipeline.data import DatasetError
from pipeline.dataset_folder import PairFolderError
from pipeline.runs import Recipe, Run, RunContext, RunError, Stage

if TYPE_CHECKING:
    import asyncpg


class ResolutionError(Exception):
    """An SDXL base to be trained below the resolution it generates at."""


RECIPE = "dpo"
IMAGES_DIR = "images"
LATENTS_DIR = "latents"
TRAINING_FIGURES = (
    "steps", "loss", "implicit_accuracy", "heldout_accuracy", "heldout_loss", "beta", "seconds",
)  # fmt: skip


class DPOOutcome(AdaptOutcome):
    title = "Diffusion-DPO"

    def figures(self) -> list[str]:
        parts = []
        pairs = self.stages.get("pairs", {})
        if pairs:
            parts.append(
                f"{pairs['train']} training pairs, {pairs['heldout']} held out, from "
                f"{pairs['source']}."
            )
        train = self.stages.get("train", {})
        if train:
            accuracy = train.get("heldout_accuracy")
            parts.append(
                f"LoRA r{self.run.recipe['adapt']['rank']}, β {train['beta']:g}, "
                f"{train['steps']} steps (batch {train['total_batch_size']}): held-out "
                + ("implicit accuracy n/a." if accuracy is None else
                   f"implicit accuracy {accuracy:.1%} (base 50%).")
            )  # fmt: skip
        return parts

    def metrics(self) -> dict[str, Any]:
        pairs = self.stages.get("pairs", {})
        train = self.stages.get("train", {})
        return {
            "pairs": pairs.get("train"),
            "heldout_pairs": pairs.get("heldout"),
            "heldout_accuracy": train.get("heldout_accuracy"),
        }


async def open_dpo_run(
    pool: asyncpg.Pool, settings: Settings, name: str, *, data: Path | None = None
) -> Run:
    """The run `name`, created if it does not exist: on the database's pairs, or on the
    `data` folder's (an HPD-layout or Pick-a-Pic-format folder, checked before any work)."""
    run = Run.open(settings.runs_dir / models.check_name(name))
    if run is not None:
        if run.recipe["adapt"].get("recipe", "hps") != RECIPE:
            raise RunError(f"run {name} was started by another recipe; choose another name")
        return run
    folder = None
    if data is not None:
        data_format(data)
        folder = str(await asyncio.to_thread(Path(data).resolve))
    if settings.adapt.prompt_file is not None:
        read_prompt_file(settings.adapt.prompt_file)
    await asyncio.to_thread(check_resolution, settings.generation.sd_model, settings.adapt)
    t = settings.train
    split = {"val_fraction": t.val_fraction, "test_fraction": t.test_fraction}
    return await create_adapter_run(pool, settings, name, recipe=RECIPE, data=folder, split=split)


def check_resolution(sd_model: str, options: AdaptSettings) -> None:
    """Refuse (`ResolutionError`, naming the setting) to train an SDXL base below the
    resolution it generates at (1024 px for SDXL base): its size conditioning (`time_ids`)
    would teach target size `adapt.resolution` while it serves at its own, and the
    references train SDXL at 1024. SD 1.x/2.x train at any resolution, 512 by default."""
    from pipeline.adapt.lora_train import native_resolution, pipeline_kind

    if not pipeline_kind(sd_model):
        return
    native = native_resolution(sd_model)
    if options.resolution < native:
        raise ResolutionError(
            f"adapt.resolution (HPS_ADAPT__RESOLUTION) is {options.resolution}, below the "
            f"{native} px the SDXL model {sd_model} generates at: its size conditioning would "
            f"learn a target of {options.resolution} px while it serves at {native}. Set "
            f"adapt.resolution = {native} (Diffusion-DPO's SDXL runs train at 1024)"
        )


def _platform_store(rc: RunContext) -> ImageStore:
    assert rc.resources is not None and rc.resources.store is not None, "needs the image store"
    return rc.resources.store


async def _reader(rc: RunContext, pairs: list[Pair]) -> Any:
    """How the pairs' images are read (in DataLoader worker processes): from the run's own
    store (a folder's images), or from the image store, through the run's copies when that
    is an object store (`Storage.reader`: its client does not survive a fork)."""
    if rc.run.stage("pairs")["images"] == "run":
        return LocalImageStore(rc.run.path / IMAGES_DIR).get
    store = storage(rc.settings)
    if store.is_local:
        return _platform_store(rc).get
    return await store.reader((k for p in pairs for k in (p.winner, p.loser)), rc.image_copies)


async def take_pairs(rc: RunContext) -> dict[str, Any]:
    """The pairs (`pairs.py`) and the prompts of the offline evaluation."""
    options, recipe = rc.options, rc.run.recipe
    prompts = await sample_prompts(rc.pool, options)

    def held_out(text: str) -> bool:
        return is_held_out(text, options.heldout_fraction)

    if recipe["data"] is not None:
        images = LocalImageStore(rc.run.path / IMAGES_DIR)
        found = await asyncio.to_thread(
            pairs_from_folder, Path(recipe["data"]), images, options, held_out=held_out,
            **recipe["split"],
        )  # fmt: skip
        source = "run"
    else:
        assert rc.pool is not None
        found = await pairs_from_db(rc.pool, options, held_out=held_out, **recipe["split"])
        found = await asyncio.to_thread(drop_missing, found, _platform_store(rc))
        source = "store"
    heldout = prompts.heldout
    if recipe["data"] is not None:
        heldout = list(dict.fromkeys(heldout + heldout_captions(found.pairs, options.eval_prompts)))
    heldout = heldout[: options.eval_prompts]
    # A folder's validation caption may be in its train split too: never trained on.
    found = hold_out_captions(found, heldout)
    write_pairs(rc.run.path / PAIRS_FILE, found.pairs)
    train = list(dict.fromkeys(p.caption for p in found.side("train")))
    (rc.run.path / PROMPTS_FILE).write_text(
        json.dumps({"train": train, "heldout": heldout}, indent=1) + "\n"
    )
    return {
        "train": len(found.side("train")),
        "heldout": len(found.side("heldout")),
        "images": source,
        **found.counts,
    }


def _enough_pairs(rc: RunContext) -> None:
    train, needed = rc.run.stage("pairs")["train"], rc.options.dpo_min_pairs
    if train < needed:
        raise NothingToDo(
            f"{train} training pairs, fewer than the {needed} needed (adapt.dpo_min_pairs)"
        )


async def cache_stage(rc: RunContext) -> dict[str, Any]:
    """With `adapt.dpo_latent_cache`, each pair image's latents, once (resumes)."""
    from pipeline.adapt.dpo_train import cache_latents

    options = rc.options
    if not options.dpo_latent_cache:
        return {"cached": False}
    pairs = read_pairs_file(rc.run.path / PAIRS_FILE)
    counts = await asyncio.to_thread(
        cache_latents,
        pairs,
        await _reader(rc, pairs),
        sd_model=rc.run.recipe["sd_model"],
        resolution=options.resolution,
        flips=options.random_flip,
        folder=rc.run.path / LATENTS_DIR,
        device=rc.device,
        batch=options.sample_batch,
        progress=rc.progress,
        context=rc.context,
        cancelled=rc.cancelled,
    )
    return {"cached": True, **counts}


async def train(rc: RunContext) -> dict[str, Any]:
    """LoRA Diffusion-DPO (resumes from its latest checkpoint)."""
    from pipeline.adapt.dpo_train import train_dpo

    cached = rc.run.stage("latents")["cached"]
    pairs = read_pairs_file(rc.run.path / PAIRS_FILE)
    report = await asyncio.to_thread(
        train_dpo,
        pairs,
        await _reader(rc, pairs),
        rc.options,
        sd_model=rc.run.recipe["sd_model"],
        out_dir=rc.run.path / TRAIN_DIR,
        validation=sampling_of(rc.run),
        cache=rc.run.path / LATENTS_DIR if cached else None,
        device=rc.device,
        progress=rc.progress,
        context=rc.context,
        cancelled=rc.cancelled,
    )
    return report.as_json()


DIFFUSION_DPO = Recipe(
    kind=KIND,
    section="adapt",
    title="Diffusion-DPO",
    stages=(
        Stage("pairs", take_pairs, check=_enough_pairs),
        Stage("latents", cache_stage),
        Stage("train", train, every_process=True),
        EVAL,
        Stage("register", partial(register_adapter, data_stage="pairs", figures=TRAINING_FIGURES)),
    ),
    open=open_dpo_run,
    gate=gate_of,
    outcome=DPOOutcome,
    passed="testing",
    skip=(NothingToDo,),
    user_errors=(*USER_ERRORS, DatasetError, PairFolderError, ResolutionError),
)
