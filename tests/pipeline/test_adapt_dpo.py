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


def test_sdxl_trains_with_its_added_conditioning_from_cached_latents_and_resumes(
    tiny_sdxl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusers import StableDiffusionXLPipeline

    from pipeline.adapt.dpo_train import LatentCache, cache_latents

    store = LocalImageStore(tmp_path / "store")
    pairs = _pairs(store, 8, seed=2)
    keys = list(dict.fromkeys(k for p in pairs for k in (p.winner, p.loser)))
    cache = tmp_path / "latents"
    counts = cache_latents(keys[:5], store.get, sd_model=str(tiny_sdxl_dir), resolution=32,
                           flips=True, folder=cache, device="cpu", progress=False)  # fmt: skip
    assert counts == {"images": 5, "encoded": 5}
    counts = cache_latents(keys, store.get, sd_model=str(tiny_sdxl_dir), resolution=32,
                           flips=True, folder=cache, device="cpu", progress=False)  # fmt: skip
    assert counts == {"images": 16, "encoded": 11}  # only those not cached yet
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
