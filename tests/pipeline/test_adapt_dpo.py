"""Diffusion-DPO: the loss is the references' formula; at the adapter's zero initialisation
it is log 2 and only the LoRA weights get gradients; on a tiny pipeline that knows red and
blue images, a preference for red is learnt (held-out implicit accuracy) and the adapter's
images turn redder than its parent's from the same seeds; SDXL's conditioning, the latent
cache and resuming work; the pairs come from the database, an HPD folder or a
Pick-a-Pic-format folder as the issue and the references say."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import pipeline.adapt.lora_train as lora_train
from hps.settings import AdaptSettings
from hps.store import LocalImageStore
from pipeline.adapt.dpo_train import (
    DPOReport,
    doubled,
    dpo_loss,
    implicit_accuracy,
    pair_latents,
    pair_noise,
    preference_terms,
    train_dpo,
)
from pipeline.adapt.lora_train import ADAPTER_INFO, LoraTraining
from pipeline.adapt.pairs import Pair
from pipeline.generate import Generator, ImageRequest, SamplingParams
from tests.tiny_sd import COLOURS_CAPTION, colour_images

PARAMS = SamplingParams(steps=10, guidance_scale=1.0, width=32, height=32)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """The CPUs are shared: one thread each runs these tiny models many times faster than
    two threads contending with other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_loss_is_the_references_formula_on_small_tensors() -> None:
    # Three pairs: per-image MSEs, winners first.
    model = torch.tensor([1.0, 2.0, 1.0, 1.5, 1.0, 1.0])
    ref = torch.tensor([1.2, 2.0, 1.0, 1.4, 0.7, 1.0])
    loss, inside = dpo_loss(model, ref, beta=10)
    # -β/2 ((mse_w − mse_l) − (ref_w − ref_l)): -5 ((1 − 1.5) − (1.2 − 1.4)) = 1.5,
    # -5 ((2 − 1) − (2 − 0.7)) = 1.5, and 0 for a pair the adapter changes nothing on.
    assert inside.tolist() == pytest.approx([1.5, 1.5, 0.0], abs=1e-6)
    by_hand = (2 * math.log1p(math.exp(-1.5)) + math.log(2)) / 3  # mean of −log σ(inside)
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    assert implicit_accuracy(inside).item() == pytest.approx(2.5 / 3)  # a zero counts half
    # diffusers' LoRA script writes it −log σ(β' (ref_diff − model_diff)) with β' = β/2.
    model_diff = model[:3] - model[3:]
    ref_diff = ref[:3] - ref[3:]
    diffusers = -torch.nn.functional.logsigmoid(5 * (ref_diff - model_diff)).mean()
    assert diffusers.item() == pytest.approx(loss.item(), rel=1e-6)


def _png(image: torch.Tensor) -> bytes:
    pixels = ((image.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_at_the_zero_initialisation_the_loss_is_log_2_and_only_lora_weights_learn(
    tiny_sd_dir: Path, tmp_path: Path
) -> None:
    recipe = AdaptSettings(resolution=32, batch_size=2, total_batch_size=2, num_workers=0,
                           center_crop=True)  # fmt: skip
    training = LoraTraining(recipe, str(tiny_sd_dir), tmp_path / "train", device="cpu",
                            sdxl=False, what="DPO training")  # fmt: skip
    parts = training.parts
    images, _ = colour_images(torch.Generator().manual_seed(0), 4)
    batch = {
        "pixel_values": torch.cat([images[:2], images[2:]], dim=1),  # 2 pairs, winner first
        **parts.tokenize(["a red cube", "a blue ball"]),
    }
    latents = pair_latents(parts, batch)
    noise, timesteps = pair_noise(latents, parts.scheduler.config.num_train_timesteps)
    assert torch.equal(noise[:2], noise[2:]) and torch.equal(timesteps[:2], timesteps[2:])
    hidden, added = doubled(*parts.conditioning(batch))
    loss, inside, model_mse, ref_mse = preference_terms(
        parts.unet, parts.unet, parts.scheduler, latents, noise, timesteps, hidden, added, 5000.0
    )
    # LoRA's B matrices start at zero: the adapted UNet predicts what its parent does.
    assert torch.equal(model_mse, ref_mse) and torch.equal(inside, torch.zeros(2))
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
    assert implicit_accuracy(inside).item() == 0.5
    loss.backward()
    with_gradient = {
        f"{type(model).__name__}.{name}"
        for model in parts.frozen()
        for name, p in model.named_parameters()
        if p.grad is not None
    }
    assert with_gradient and all(".lora_" in name for name in with_gradient)
    assert all(name.startswith("UNet2DConditionModel.") for name in with_gradient)
    lora_b = [p.grad for name, p in parts.unet.named_parameters() if "lora_B" in name]
    assert lora_b and all(g is not None for g in lora_b) and any(g.abs().sum() > 0 for g in lora_b)


def _pairs(store: LocalImageStore, n: int, seed: int) -> list[Pair]:
    """`n` pairs of squares drawn from blue to red (`colour_images`), the redder one
    preferred, captioned as the pipeline was fitted; every fourth one held out."""
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for i in range(n):
        images, redness = colour_images(generator, 2)
        keys = [store.put(_png(image)).key for image in images]
        winner, loser = keys if redness[0] > redness[1] else keys[::-1]
        pairs.append(Pair(COLOURS_CAPTION, winner, loser, "heldout" if i % 4 == 0 else "train",
                          f"pair:{i}"))  # fmt: skip
    return pairs


def _redness(png: bytes) -> float:
    """The mean red channel less the mean blue one (0-255 levels)."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), float)
    return float(pixels[..., 0].mean() - pixels[..., 2].mean())


@pytest.mark.slow
def test_a_preference_for_red_is_learnt_and_the_adapters_images_turn_redder(
    tiny_sd_colours_dir: Path, tmp_path: Path
) -> None:
    store = LocalImageStore(tmp_path / "store")
    pairs = _pairs(store, 64, seed=1)
    # β sets how far the adapter may move from its parent: the tiny model's errors are
    # on another scale than SD's, and 100 steps are few, so a weaker pull than 5000.
    recipe = AdaptSettings(
        resolution=32, batch_size=8, total_batch_size=8, learning_rate=3e-3, dpo_beta=100,
        max_train_steps=100, checkpointing_steps=50, num_workers=0, center_crop=True,
        validation_prompts=[COLOURS_CAPTION], validation_images=1,
    )  # fmt: skip
    out = tmp_path / "train"
    report = train_dpo(pairs, store.get, recipe, sd_model=str(tiny_sd_colours_dir),
                       out_dir=out, validation=PARAMS, device="cpu", progress=False)  # fmt: skip
    assert (report.steps, report.pairs, report.heldout_pairs) == (100, 48, 16)
    assert report.beta == 100 and report.identifier == "" and not report.latent_cache
    # On pairs it never trained on, the adapter prefers the redder image far more often
    # than its parent does (0.5 and log 2 for the parent, by construction).
    assert report.heldout_accuracy >= 0.75
    assert report.heldout_loss < 0.9 * math.log(2)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 101))
    assert lines[0]["loss"] == pytest.approx(math.log(2)) and lines[0]["implicit_acc"] == 0.5
    assert lines[0]["model_mse"] == lines[0]["ref_mse"]
    assert np.mean([x["implicit_acc"] for x in lines[-20:]]) > 0.6
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-000050", "step-000100"]
    info = json.loads((Path(report.adapter) / ADAPTER_INFO).read_text())
    assert info["recipe"] == "dpo" and info["identifier"] == "" and info["beta"] == 100

    # Served as any adapter: the same seeds, with and without it.
    generator = Generator(str(tiny_sd_colours_dir), device="cpu", safety_checker=False)
    generator.load_adapter("dpo", report.adapter, "")
    seeds = range(16)
    before, after = (
        [_redness(i.png) for i in generator.generate(
            [ImageRequest(COLOURS_CAPTION, "", s, side) for s in seeds], PARAMS)]
        for side in (None, "dpo")
    )  # fmt: skip
    assert np.mean(after) > np.mean(before) + 4
    assert sum(a > b for a, b in zip(after, before, strict=True)) >= 14


@pytest.mark.slow
def test_sdxl_trains_with_its_added_conditioning_from_cached_latents_and_resumes(
    tiny_sdxl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusers import StableDiffusionXLPipeline

    from pipeline.adapt.dpo_train import LatentCache, cache_latents

    store = LocalImageStore(tmp_path / "store")
    pairs = _pairs(store, 8, seed=2)
    keys = list(dict.fromkeys(k for p in pairs for k in (p.winner, p.loser)))
    cache = tmp_path / "latents"
    counts = cache_latents(pairs[:3], store.get, sd_model=str(tiny_sdxl_dir), resolution=32,
                           flips=True, folder=cache, device="cpu", progress=False)  # fmt: skip
    assert counts == {"images": 6, "encoded": 6, "resized_losers": 0}
    counts = cache_latents(pairs, store.get, sd_model=str(tiny_sdxl_dir), resolution=32,
                           flips=True, folder=cache, device="cpu", progress=False)  # fmt: skip
    # only those not cached yet
    assert counts == {"images": 16, "encoded": 10, "resized_losers": 0}
    mean, std, time_ids = LatentCache(cache).get(keys[0], flip=True)
    assert mean.shape == std.shape == (4, 16, 16)
    assert time_ids.tolist() == [32, 32, 0, 0, 32, 32]  # original size, crop corner, target

    recipe = AdaptSettings(
        resolution=32, batch_size=2, total_batch_size=4, learning_rate=1e-3, max_train_steps=4,
        checkpointing_steps=2, num_workers=0, center_crop=True, random_flip=True,
        dpo_latent_cache=True, gradient_checkpointing=True, validation_prompts=["a red cube"],
        validation_images=1,
    )  # fmt: skip

    def train(out: Path) -> DPOReport:
        return train_dpo(pairs, store.get, recipe, sd_model=str(tiny_sdxl_dir), out_dir=out,
                         validation=PARAMS, cache=cache, device="cpu",
                         progress=False)  # fmt: skip

    whole = train(tmp_path / "whole")
    assert (whole.steps, whole.grad_accumulation, whole.latent_cache) == (4, 2, True)
    first = json.loads((tmp_path / "whole/metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2)) and first["implicit_acc"] == 0.5
    assert whole.heldout_pairs == 2 and 0 <= whole.heldout_accuracy <= 1

    real_record = lora_train.record_step

    def crash_at_three(path: Path, record: dict) -> None:
        if record["step"] == 3:
            raise RuntimeError("injected crash at step 3")
        real_record(path, record)

    monkeypatch.setattr(lora_train, "record_step", crash_at_three)
    with pytest.raises(RuntimeError, match="injected crash"):
        train(tmp_path / "crashed")
    monkeypatch.setattr(lora_train, "record_step", real_record)
    resumed = train(tmp_path / "crashed")
    assert resumed.resumed_from == 2 and resumed.steps == 4
    a = load_file(tmp_path / "whole/adapter/pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "crashed/adapter/pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("unet.") and "attn2" in k for k in a)

    # An SDXL pipeline loads it as any diffusers LoRA.
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.load_lora_weights(whole.adapter)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red cube", num_inference_steps=2, width=32, height=32,
                 generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
    assert image.size == (32, 32)
    assert sorted(p.name for p in (tmp_path / "whole/validation").iterdir()) == [
        "step-000002",
        "step-000004",
    ]


def test_the_latent_cache_resizes_a_loser_to_its_winners_size_as_the_pixel_path_does(
    tiny_sd_dir: Path, tmp_path: Path
) -> None:
    """A loser of another shape than its winner is resized to the winner's size before its
    crop (diffusers' SDXL script; `PairsDataset` on pixels): the cache trains on the same
    latents, not on the loser's own centre crop."""
    from diffusers import AutoencoderKL

    from pipeline.adapt.dataset import image_transform
    from pipeline.adapt.dpo_train import LatentCache, PairsDataset, cache_latents, loser_entry

    store = LocalImageStore(tmp_path / "store")
    rng = np.random.default_rng(3)

    def image(width: int, height: int) -> str:
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(
            buffer, format="PNG"
        )
        return store.put(buffer.getvalue()).key

    tall, wide, square = image(32, 64), image(64, 32), image(40, 40)
    pairs = [Pair("a", tall, wide, "train", "p:0"), Pair("b", square, tall, "train", "p:1"),
             Pair("c", wide, tall, "train", "p:2"), Pair("d", tall, image(32, 64), "train",
                                                          "p:3")]  # fmt: skip
    folder = tmp_path / "latents"
    counts = cache_latents(pairs, store.get, sd_model=str(tiny_sd_dir), resolution=32,
                           flips=False, folder=folder, device="cpu", progress=False)  # fmt: skip
    assert counts == {"images": 4, "encoded": 4, "resized_losers": 3}  # not p:3's, same size
    again = cache_latents(pairs, store.get, sd_model=str(tiny_sd_dir), resolution=32,
                          flips=False, folder=folder, device="cpu", progress=False)  # fmt: skip
    assert again == {"images": 4, "encoded": 0, "resized_losers": 0}

    def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.zeros(len(texts), 4, dtype=torch.long)}

    transform = image_transform(32, center_crop=True, random_flip=False)
    cache = LatentCache(folder)
    cached = PairsDataset(pairs, store.get, tokenize, transform, cache=cache)
    pixels = PairsDataset(pairs, store.get, tokenize, transform)
    vae = AutoencoderKL.from_pretrained(tiny_sd_dir, subfolder="vae", dtype=torch.float32).eval()
    for i, pair in enumerate(pairs):
        with torch.no_grad():
            expected = vae.encode(pixels[i]["pixel_values"][3:][None]).latent_dist.mean[0]
        loser = cached[i]["latent_mean"][1]
        assert torch.allclose(loser, expected.half().float(), atol=1e-3), pair.key
        assert torch.equal(cached[i]["time_ids"], pixels[i]["time_ids"])
    own_crop = cache.get(wide, flip=False)[0]  # the loser of p:0 cropped on its own: not it
    assert not torch.allclose(own_crop, cached[0]["latent_mean"][1], atol=1e-2)
    assert cache.has(loser_entry(wide, tall)) and not cache.has(loser_entry(pairs[3].loser, tall))


# -- pairs ---------------------------------------------------------------------------------


def _width(store: LocalImageStore, key: str) -> int:
    """A stored round's image p is 8p pixels wide (`tests.factories.stored_round`)."""
    with Image.open(io.BytesIO(store.get(key))) as image:
        return image.width


async def test_pairs_from_the_database_are_counted_picks_against_each_other_image(
    pool, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from db import users
    from pipeline.adapt.pairs import drop_missing, pairs_from_db
    from tests.pipeline.test_export_readers import _choices

    store = LocalImageStore(tmp_path / "store")
    made = await _choices(pool, store)  # prompts a, b in train, c in val, d in test
    prompts = made["prompts"]
    fractions = {"val_fraction": 0.1, "test_fraction": 0.1}

    async def pairs(held_out=lambda text: False, **recipe):  # type: ignore[no-untyped-def]
        found = await pairs_from_db(pool, AdaptSettings(**recipe), held_out=held_out, **fractions)
        return drop_missing(found, store)

    found = await pairs()
    # The requesters' picks: a among 3 (position 2) → 2 pairs, a among 4 (position 4) → 3;
    # c among 2 and among 3 (validation split) → 1 + 2 held out. The tie on b, the "none"
    # on a, the banned user's pick and the test prompt d give none.
    assert [(p.caption, p.side) for p in found.pairs] == [(prompts["a"], "train")] * 5 + [
        (prompts["c"], "heldout")
    ] * 3
    assert found.counts == {"source": "database", "picks": 4, "ties": 1, "test_picks": 1,
                            "missing_images": 0}  # fmt: skip
    # The winner is the image picked, against each other image of its round.
    widths = [(_width(store, p.winner), _width(store, p.loser)) for p in found.pairs]
    assert widths == [(16, 8), (16, 24), (32, 8), (32, 16), (32, 24), (8, 16), (24, 8), (24, 16)]
    # The prompts the offline evaluation holds out are never trained on.
    held = await pairs(held_out=lambda text: text == prompts["a"])
    assert {p.side for p in held.pairs} == {"heldout"}
    # Everyone's picks (adapt.dpo_choosers = all): the other voter's on a among 3 too.
    assert len((await pairs(dpo_choosers="all")).side("train")) == 7
    # At most dpo_max_pairs training pairs and dpo_heldout_pairs held-out ones, seeded.
    capped = await pairs(dpo_max_pairs=2, dpo_heldout_pairs=1)
    assert len(capped.side("train")) == 2 and len(capped.side("heldout")) == 1
    assert capped.pairs == (await pairs(dpo_max_pairs=2, dpo_heldout_pairs=1)).pairs
    # A shadow-banned or forgotten chooser's picks leave; so does a pair whose image is gone.
    await users.ban(pool, 2, shadow=True, reason="spam", actor="mod")
    await users.forget_user(pool, 4)
    store.delete(found.pairs[-1].loser)
    left = await pairs()
    assert [(_width(store, p.winner), p.side) for p in left.pairs] == [(16, "train")] * 2 + [
        (24, "heldout")
    ]
    assert left.counts["missing_images"] == 1


async def test_a_pick_a_pic_folder_gives_the_pairs_diffusion_dpo_trains_on(
    pool, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """Our export with ties kept (0.5/0.5 rows), read as Diffusion-DPO's train.py reads a
    folder named "pickapic" (`peer_readers`): the same pairs, winner first, ties dropped."""
    from pipeline.adapt.pairs import pairs_from_folder
    from tests.pipeline import peer_readers
    from tests.pipeline.test_export_readers import RESOLUTION, _choices, _dpo_transform, _export

    store = LocalImageStore(tmp_path / "store")
    made = await _choices(pool, store)
    out = tmp_path / "pickapic_export"
    await _export(pool, out, "pickapic", tmp_path / "store", ties="half")
    images = LocalImageStore(tmp_path / "run_images")
    found = pairs_from_folder(out, images, AdaptSettings(), held_out=lambda text: False,
                              val_fraction=0.1, test_fraction=0.1)  # fmt: skip
    assert found.counts["ties"] == 3 and found.counts["source"] == f"pickapic:{out}"
    train = found.side("train")
    batches = peer_readers.diffusion_dpo_batches(str(out), resolution=RESOLUTION,
                                                 cache_dir=str(tmp_path / "hf"))  # fmt: skip
    assert len(train) == len(batches) == 5
    for pair, batch in zip(train, batches, strict=True):
        assert pair.caption == batch["caption"][0] == made["prompts"]["a"]
        assert torch.equal(batch["pixel_values"][0, :3], _dpo_transform(images.get(pair.winner)))
        assert torch.equal(batch["pixel_values"][0, 3:], _dpo_transform(images.get(pair.loser)))
    # Its validation split is held out; its test splits are not read.
    assert [p.caption for p in found.side("heldout")] == [made["prompts"]["c"]] * 3


def test_an_hpd_folder_gives_each_records_pick_against_its_other_images(tmp_path: Path) -> None:
    from pipeline.adapt.pairs import data_format, pairs_from_folder
    from pipeline.data import DatasetError, examples_from_folder
    from tests.colour_task import write_colour_hpd

    folder = write_colour_hpd(tmp_path / "hpd", n_train=6, n_test=2, k=3)
    assert data_format(folder) == "hpd"
    images = LocalImageStore(tmp_path / "run_images")
    found = pairs_from_folder(folder, images, AdaptSettings(), held_out=lambda text: False,
                              val_fraction=0.1, test_fraction=0.1)  # fmt: skip
    examples = examples_from_folder(folder)
    kept = [e for e in examples if e.split != "test"]
    assert len(found.pairs) == 2 * len(kept) and found.counts["test_picks"] == 2
    first = kept[0]
    winner = Path(first.images[first.chosen]).read_bytes()
    assert images.get(found.pairs[0].winner) == winner
    with pytest.raises(DatasetError, match="holds no Parquet files"):
        data_format(tmp_path)


# -- the recipe ----------------------------------------------------------------------------

PROMPTS = [f"a {colour} {thing}" for colour in ("red", "green", "blue", "yellow")
           for thing in ("cube", "ball", "house", "tree")]  # fmt: skip


def _settings(tiny_sd_dir: Path, tiny_model: tuple[Path, Path], **adapt):  # type: ignore[no-untyped-def]
    from tests.pipeline.conftest import make_settings

    config, weights = tiny_model
    return make_settings(
        generation={"sd_model": str(tiny_sd_dir), "steps": 2, "width": 64, "height": 64,
                    "safety_checker": False},
        models={"hps_arch": str(config), "hps_pretrained": str(weights), "device": "cpu"},
        adapt={
            "recipe": "dpo", "dpo_min_pairs": 4, "heldout_fraction": 0.25, "eval_prompts": 4,
            "eval_seeds": 1, "sample_batch": 8, "resolution": 32, "batch_size": 4,
            "total_batch_size": 4, "learning_rate": 1e-3, "max_train_steps": 3,
            "checkpointing_steps": 2, "num_workers": 0, "validation_images": 0,
            "offline_gate": "none", "center_crop": True, "dpo_latent_cache": True, **adapt,
        },
    )  # fmt: skip


async def _job(pool, settings, store):  # type: ignore[no-untyped-def]
    from datetime import timedelta

    from db import jobs
    from pipeline.handlers import JobContext

    job, _ = await jobs.enqueue_training(pool, "sd", requested_by="test")
    [claimed] = await jobs.claim(pool, ["adapt_sd"], "gpu-1", timedelta(minutes=5))
    return job, JobContext(claimed, settings, pool, store, "gpu-1", "cpu", {})


async def test_the_adapt_sd_job_runs_dpo_on_peoples_pairs_and_registers_it_by_recipe(
    pool, tiny_sd_dir: Path, tiny_model, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from db import models, stats
    from db.choices import record_choice
    from db.prompts import prompt_hash
    from pipeline.adapt.prompts import is_held_out
    from pipeline.adapt.recipes import handle_adapt_sd
    from pipeline.data import assign_split
    from pipeline.report import live_by_recipe_section
    from pipeline.runs import Run
    from tests.factories import stored_round

    settings = _settings(tiny_sd_dir, tiny_model)
    store = LocalImageStore(settings.images_dir)
    for i, prompt in enumerate(PROMPTS):  # one round of 3 each, the requester's pick
        round_id = await stored_round(pool, store, requester=100 + i, prompt=prompt, k=3)
        await record_choice(pool, round_id=round_id, discord_user_id=100 + i, verdict="pick",
                            position=1 + i % 3)  # fmt: skip
    job, ctx = await _job(pool, settings, store)
    result = await handle_adapt_sd(ctx)

    name = f"sd_adapter-job{job.id}"
    assert result["status"] == "registered" and result["recipe"] == "dpo", result
    run = Run.open(settings.runs_dir / name)
    assert list(run.data["stages"]) == ["pairs", "latents", "train", "eval", "register"]
    split = {p: assign_split(prompt_hash(p), None, val_fraction=0.1, test_fraction=0.1)
             for p in PROMPTS}  # fmt: skip
    trained = [p for p in PROMPTS if split[p] == "train" and not is_held_out(p, 0.25)]
    pairs = run.stage("pairs")
    assert pairs["train"] == 2 * len(trained) and pairs["images"] == "store"
    assert pairs["test_picks"] == sum(s == "test" for s in split.values())
    shown = 3 * (len(PROMPTS) - pairs["test_picks"])  # every image of a round with pairs
    latents = run.stage("latents")
    assert (latents["cached"], latents["images"], latents["encoded"]) == (True, shown, shown)
    prompts = json.loads((run.path / "prompts.json").read_text())
    assert sorted(prompts["train"]) == sorted(trained)
    # The held-out prompts of the offline evaluation: by hash, as the paper's recipe's.
    assert sorted(prompts["heldout"]) == ["a blue ball", "a red house", "a yellow tree"]
    assert all(is_held_out(p, 0.25) for p in prompts["heldout"])
    assert not set(prompts["heldout"]) & set(prompts["train"])

    version = await models.get(pool, name)
    assert version.status == "testing" and models.recipe_of(version) == "dpo"
    assert version.config["identifier"] == "" and version.config["recipe"]["data"] is None
    assert version.config["recipe"]["adapt"]["dpo_beta"] == 5000
    training = version.metrics["training"]
    assert training["steps"] == 3 and training["beta"] == 5000 and "heldout_accuracy" in training
    assert version.metrics["data"]["train"] == pairs["train"]
    assert version.metrics["offline"]["pairs"] == 3 and version.metrics["offline"]["passed"]
    assert result["summary"].startswith(
        f"Diffusion-DPO run {name}: {pairs['train']} training pairs, {pairs['heldout']} held "
        "out, from database. LoRA r4, β 5000, 3 steps (batch 4): held-out implicit accuracy"
    )
    # The reference the accuracy is relative to is the base (adapters are not stacked).
    assert "% (base 50%)." in result["summary"]
    assert result["metrics"]["pairs"] == pairs["train"]

    # Live: the adapter's A/B rounds count for its recipe.
    from tests.factories import ready_round

    base = await models.get(pool, run.data["parent"]["id"])
    for user in range(4):
        round_id = await ready_round(pool, requester=500 + user, prompt=f"live {user}",
                                     model_version_ids={1: base.id, 2: version.id})  # fmt: skip
        await record_choice(pool, round_id=round_id, discord_user_id=500 + user,
                            verdict="pick", position=2 if user else 1)  # fmt: skip
    rows = await stats.live_by_recipe(pool)
    assert rows == [{"recipe": "dpo", "versions": 1, "rounds": 4, "wins": 3}]
    name, _, _, draw, table = live_by_recipe_section(rows)
    assert name == "live_by_recipe" and table[0]["win_rate"] == 0.75
    assert draw().startswith(b"\x89PNG")


async def test_too_few_pairs_skip_the_job_and_a_run_keeps_its_recipe(
    pool, tiny_sd_dir: Path, tiny_model, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from pipeline.adapt.recipes import handle_adapt_sd, recipe_name

    settings = _settings(tiny_sd_dir, tiny_model, dpo_min_pairs=5)
    store = LocalImageStore(settings.images_dir)
    job, ctx = await _job(pool, settings, store)
    result = await handle_adapt_sd(ctx)
    assert result["status"] == "skipped"
    assert result["reason"] == "0 training pairs, fewer than the 5 needed (adapt.dpo_min_pairs)"
    # The run started as dpo stays dpo, whatever adapt.recipe says now.
    name = f"sd_adapter-job{job.id}"
    assert recipe_name(settings.with_changes("adapt", recipe="hps"), name) == "dpo"
    assert recipe_name(settings.with_changes("adapt", recipe="hps"), "another") == "hps"


@pytest.mark.slow
def test_hps_adapt_run_takes_data_for_dpo_only_and_refuses_a_folder_it_cannot_read(
    database_url: str, tmp_path: Path
) -> None:
    from tests.test_cli import hps

    env = {"HPS_DATABASE_URL": database_url, "HPS_DATA_DIR": str(tmp_path / "data")}
    wrong = hps("adapt", "run", "--recipe", "hps", "--data", str(tmp_path), env=env)
    assert wrong.returncode == 1 and "--data applies to --recipe dpo" in wrong.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    refused = hps("adapt", "run", "--recipe", "dpo", "--data", str(empty), "--name", "d1",
                  env=env)  # fmt: skip
    assert refused.returncode == 1, refused.stderr
    assert f"{empty} holds no Parquet files (a Pick-a-Pic-format folder): --data takes" in (
        refused.stderr
    )
    assert "Traceback" not in refused.stderr and not (tmp_path / "data" / "runs").exists()


def _pickapic_folder(folder: Path, rows: dict[str, list[tuple[str, str, str, float]]]) -> Path:
    """A Pick-a-Pic-format folder: per file name under data/, rows of (caption, colour of
    jpg_0, colour of jpg_1, label_0)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def png(colour: str) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
        return buffer.getvalue()

    (folder / "data").mkdir(parents=True)
    for name, items in rows.items():
        table = pa.table({
            "caption": [c for c, *_ in items],
            "jpg_0": [png(a) for _, a, _, _ in items],
            "jpg_1": [png(b) for _, _, b, _ in items],
            "label_0": [label for *_, label in items],
            "label_1": [1 - label for *_, label in items],
        })  # fmt: skip
        pq.write_table(table, folder / "data" / name)
    return folder


def test_pick_a_pics_own_parquet_files_are_read_with_their_hub_names(tmp_path: Path) -> None:
    """Pick-a-Pic as published: `data/<split>-NNNNN-of-NNNNN-<hash>.parquet`, integer-like
    float labels, several files per split; the image labelled 1 wins, ties are dropped."""
    from pipeline.adapt.pairs import pairs_from_folder

    rows = {  # file → (caption, jpg_0, jpg_1, label_0)
        "train-00000-of-00002-1a2b.parquet": [("a cat", "red", "blue", 1.0),
                                              ("a dog", "green", "white", 0.5)],
        "train-00001-of-00002-3c4d.parquet": [("a cow", "black", "yellow", 0.0)],
        "test-00000-of-00001-5e6f.parquet": [("a fox", "red", "green", 1.0)],
    }  # fmt: skip
    _pickapic_folder(tmp_path, rows)
    images = LocalImageStore(tmp_path / "run_images")
    found = pairs_from_folder(tmp_path, images, AdaptSettings(),
                              held_out=lambda text: text == "a cow", val_fraction=0.1,
                              test_fraction=0.1)  # fmt: skip
    assert [(p.caption, p.side) for p in found.pairs] == [("a cat", "train"), ("a cow", "heldout")]
    assert found.counts["ties"] == 1
    colours = [
        tuple(Image.open(io.BytesIO(images.get(k))).getpixel((0, 0)))
        for p in found.pairs
        for k in (p.winner, p.loser)
    ]
    assert colours == [(255, 0, 0), (0, 0, 255), (255, 255, 0), (0, 0, 0)]


async def test_a_caption_the_offline_evaluation_uses_is_never_trained_on(
    pool, tiny_sd_dir: Path, tiny_model, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """A Pick-a-Pic folder's validation captions are evaluation prompts: a train-split pair
    of the same caption (spelt alike after normalisation) is held out too."""
    from pipeline.adapt.dpo import DIFFUSION_DPO
    from pipeline.adapt.pairs import PAIRS_FILE, read_pairs_file
    from pipeline.adapt.run import PROMPTS_FILE
    from pipeline.runs import run_recipe

    folder = _pickapic_folder(tmp_path / "pickapic", {
        "train-00000-of-00001.parquet": [("a cat", "red", "blue", 1.0),
                                         ("a dog", "green", "white", 0.0),
                                         ("A  Cat", "black", "yellow", 0.0)],
        "validation-00000-of-00001.parquet": [("a cat", "red", "green", 1.0)],
    })  # fmt: skip
    settings = _settings(tiny_sd_dir, tiny_model, heldout_fraction=0.01, dpo_min_pairs=1)
    outcome = await run_recipe(DIFFUSION_DPO, pool, settings, name="dpo-captions",
                               until="pairs", progress=False, data=folder)  # fmt: skip
    run = settings.runs_dir / "dpo-captions"
    pairs = read_pairs_file(run / PAIRS_FILE)
    assert [(p.caption, p.side, p.key) for p in pairs] == [
        ("a cat", "heldout", "pickapic:train:0"), ("a dog", "train", "pickapic:train:1"),
        ("A  Cat", "heldout", "pickapic:train:2"), ("a cat", "heldout", "pickapic:validation:0"),
    ]  # fmt: skip
    assert json.loads((run / PROMPTS_FILE).read_text()) == {
        "train": ["a dog"],
        "heldout": ["a cat"],
    }
    stage = outcome.stages["pairs"]
    assert (stage["train"], stage["heldout"], stage["evaluation_held_out"]) == (1, 3, 2)


async def test_an_sdxl_base_is_not_trained_below_the_resolution_it_generates_at(
    pool, tiny_sdxl_dir: Path, tiny_sd_dir: Path, tiny_model, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """SDXL's size conditioning would learn a target size it never serves at: refused,
    naming the setting, before any work (the tiny SDXL generates at 64 px, SDXL base at
    1024); SD 1.x trains at any resolution."""
    from pipeline.adapt.dpo import ResolutionError, open_dpo_run
    from pipeline.adapt.lora_train import native_resolution

    assert native_resolution(str(tiny_sdxl_dir)) == 64
    settings = _settings(tiny_sd_dir, tiny_model)  # resolution 32
    sdxl = settings.with_changes("generation", sd_model=str(tiny_sdxl_dir))
    with pytest.raises(ResolutionError) as refused:
        await open_dpo_run(pool, sdxl, "dpo-sdxl-32")
    assert str(refused.value) == (
        "adapt.resolution (HPS_ADAPT__RESOLUTION) is 32, below the 64 px the SDXL model "
        f"{tiny_sdxl_dir} generates at: its size conditioning would learn a target of 32 px "
        "while it serves at 64. Set adapt.resolution = 64 (Diffusion-DPO's SDXL runs train "
        "at 1024)"
    )
    assert not (settings.runs_dir / "dpo-sdxl-32").exists()
    run = await open_dpo_run(pool, sdxl.with_changes("adapt", resolution=64), "dpo-sdxl-64")
    assert run.recipe["adapt"]["resolution"] == 64
    assert (await open_dpo_run(pool, settings, "dpo-sd-32")).recipe["adapt"]["resolution"] == 32


def test_sdxl_conditioning_is_what_its_pipeline_computes_with_and_without_the_cache(
    tiny_sdxl_dir: Path, tmp_path: Path
) -> None:
    """`DiffusionParts.conditioning` on a batch of `PairsDataset` (pixels, or the latent
    cache) against `StableDiffusionXLPipeline`'s own helpers: `encode_prompt`'s prompt and
    pooled embeddings, `_get_add_time_ids` of the non-square original size, its centre
    crop's corner and the target size."""
    from diffusers import StableDiffusionXLPipeline

    from pipeline.adapt.dataset import image_transform
    from pipeline.adapt.dpo_train import LatentCache, PairsDataset, cache_latents, collate_pairs
    from pipeline.adapt.lora_train import DiffusionParts

    store = LocalImageStore(tmp_path / "store")
    rng = np.random.default_rng(5)

    def image(width: int, height: int) -> str:
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(
            buffer, format="PNG"
        )
        return store.put(buffer.getvalue()).key

    captions = ["a red cube on a table", "a lighthouse at dusk, oil painting"]
    pairs = [Pair(captions[0], image(48, 80), image(48, 80), "train", "p:0"),
             Pair(captions[1], image(90, 40), image(90, 40), "train", "p:1")]  # fmt: skip
    resolution = 32
    transform = image_transform(resolution, center_crop=True, random_flip=False)
    parts = DiffusionParts.load(str(tiny_sdxl_dir), torch.float32, sdxl=True)
    folder = tmp_path / "latents"
    cache_latents(pairs, store.get, sd_model=str(tiny_sdxl_dir), resolution=resolution,
                  flips=False, folder=folder, device="cpu", progress=False)  # fmt: skip
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    # Resized to 32 on the short side (h × w: 53 × 32, 32 × 72); the centre crop's corner.
    expected_ids = [[80, 48, 10, 0, 32, 32], [40, 90, 0, 20, 32, 32]]
    for cache in (None, LatentCache(folder)):
        dataset = PairsDataset(pairs, store.get, parts.tokenize, transform, cache=cache)
        batch = collate_pairs([dataset[0], dataset[1]])
        with torch.no_grad():
            hidden, added = parts.conditioning(batch)
        assert added is not None
        for i, pair in enumerate(pairs):
            with torch.no_grad():
                embeds, _, pooled, _ = pipe.encode_prompt(
                    pair.caption, device="cpu", do_classifier_free_guidance=False
                )
            assert torch.allclose(hidden[i], embeds[0], atol=1e-6)
            assert torch.allclose(added["text_embeds"][i], pooled[0], atol=1e-6)
            winner = Image.open(io.BytesIO(store.get(pair.winner)))
            original = (winner.height, winner.width)
            top, left, _ = transform.draw(transform.resize(winner).size, torch.Generator())
            time_ids = pipe._get_add_time_ids(
                original, (top, left), (resolution, resolution), dtype=torch.float32,
                text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
            )  # fmt: skip
            assert torch.equal(added["time_ids"][i], time_ids[0])
            assert added["time_ids"][i].tolist() == expected_ids[i]
