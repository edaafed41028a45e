"""LoRA fine-tuning on the tiny diffusers pipeline: it learns, the saved adapter is a plain
diffusers LoRA that reproduces its images elsewhere, and a crashed run resumes exactly."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import pipeline.adapt.lora_train as lora_train
from hps.settings import AdaptSettings
from pipeline import devices
from pipeline.adapt.dataset import Item
from pipeline.adapt.lora_train import ADAPTER_INFO, train_lora
from pipeline.generate import Generator, ImageRequest, SamplingParams
from tests.colour_task import COLOURS, colour_image

PARAMS = SamplingParams(steps=2, guidance_scale=7.5, width=64, height=64)
IDENTIFIER = "Weird image. "
VALIDATION_PROMPT = "a red cube"


def _items(root: Path) -> list[Item]:
    """Eight colour images: the even ones preferred, the odd ones not (identifier first)."""
    rng = random.Random(0)
    items = []
    for i, colour in enumerate(list(COLOURS)[:8]):
        colour_image(colour, rng, size=72).save(root / f"{i}.jpg")
        prompt = f"a {colour} cube"
        if i % 2:
            items.append(Item(f"{i}.jpg", IDENTIFIER + prompt, "negative"))
        else:
            items.append(Item(f"{i}.jpg", prompt, "positive"))
    return items


def _recipe(**changes) -> AdaptSettings:  # type: ignore[no-untyped-def]
    values = {
        "resolution": 64,
        "batch_size": 4,
        "total_batch_size": 4,
        "learning_rate": 3e-2,
        "max_train_steps": 30,
        "checkpointing_steps": 10,
        "num_workers": 0,
        "validation_prompts": [VALIDATION_PROMPT],
        "validation_images": 1,
        "identifier": IDENTIFIER,
        **changes,
    }
    return AdaptSettings(**values)


def _pixels(png: bytes | Path) -> np.ndarray:
    data = png.read_bytes() if isinstance(png, Path) else png
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def test_fine_tuning_learns_and_the_adapter_reproduces_its_images_anywhere(
    tiny_sd_dir: Path, tmp_path: Path
) -> None:
    items = _items(tmp_path)
    out = tmp_path / "train"
    report = train_lora(items, tmp_path, _recipe(), sd_model=str(tiny_sd_dir), out_dir=out,
                        validation=PARAMS, progress=False)  # fmt: skip
    assert (report.steps, report.resumed_from, report.examples) == (30, None, 8)
    assert (report.total_batch_size, report.grad_accumulation) == (4, 1)
    # The training loss, measured on fixed draws of noise and timesteps, went down.
    assert report.probe_loss < 0.95 * report.probe_loss_base
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, 31))
    assert all(line["lr"] == pytest.approx(3e-2) for line in lines)  # constant schedule
    assert [p.name for _, p in lora_train.checkpoints(out)] == ["checkpoint-20", "checkpoint-30"]
    for step in ("000010", "000020", "000030"):
        shown = sorted(p.name for p in (out / "validation" / f"step-{step}").iterdir())
        assert shown == ["p0-identifier-0.png", "p0-negative-0.png", "p0-neutral-0.png"]
    adapter = Path(report.adapter)
    assert json.loads((adapter / ADAPTER_INFO).read_text())["identifier"] == IDENTIFIER
    weights = load_file(adapter / "pytorch_lora_weights.safetensors")
    assert weights and all(k.startswith("unet.") and "lora" in k for k in weights)

    # Served: the generator loads it with load_lora_weights and puts the identifier in the
    # negative prompt, which is the validation's "negative" image, pixel for pixel.
    generator = Generator(str(tiny_sd_dir), device="cpu", safety_checker=False)
    generator.load_adapter("tuned", str(adapter), IDENTIFIER)
    [served] = generator.generate([ImageRequest(VALIDATION_PROMPT, "", 42, "tuned")], PARAMS)
    last = out / "validation" / "step-000030"
    assert np.array_equal(_pixels(served.png), _pixels(last / "p0-negative-0.png"))
    # The identifier prompt: a fresh pipeline with the adapter makes the validation image;
    # without the adapter the same seed makes another one.
    from diffusers import StableDiffusionPipeline

    fresh = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    fresh.set_progress_bar_config(disable=True)

    def draw() -> np.ndarray:
        image = fresh(
            prompt=[IDENTIFIER + VALIDATION_PROMPT],
            num_inference_steps=PARAMS.steps,
            guidance_scale=PARAMS.guidance_scale,
            width=64,
            height=64,
            generator=[torch.Generator("cpu").manual_seed(42)],
        ).images[0]
        return np.asarray(image, dtype=np.int16)

    untuned = draw()
    fresh.load_lora_weights(str(adapter))
    tuned = draw()
    assert np.array_equal(tuned, _pixels(last / "p0-identifier-0.png"))
    assert np.abs(tuned - untuned).mean() > 1.0


def test_a_crash_mid_fine_tune_resumes_from_the_latest_checkpoint_exactly(
    tiny_sd_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    items = _items(tmp_path)
    # EMA and gradient checkpointing on: their state is part of what must resume.
    recipe = _recipe(max_train_steps=7, checkpointing_steps=3, batch_size=2,
                     use_ema=True, ema_decay=0.9, gradient_checkpointing=True,
                     validation_images=0)  # fmt: skip

    def run(out: Path) -> lora_train.TrainReport:
        return train_lora(items, tmp_path, recipe, sd_model=str(tiny_sd_dir), out_dir=out,
                          validation=PARAMS, progress=False)  # fmt: skip

    whole = run(tmp_path / "whole")
    assert (whole.total_batch_size, whole.grad_accumulation) == (4, 2)

    real_record = lora_train.record_step

    def crash_at_five(path: Path, record: dict) -> None:
        if record["step"] == 5:
            raise RuntimeError("injected crash at step 5")
        real_record(path, record)

    monkeypatch.setattr(lora_train, "record_step", crash_at_five)
    with pytest.raises(RuntimeError, match="injected crash"):
        run(tmp_path / "crashed")
    crashed = tmp_path / "crashed"
    assert [s for s, _ in lora_train.checkpoints(crashed)] == [3]
    assert not (crashed / "adapter").exists()
    monkeypatch.setattr(lora_train, "record_step", real_record)

    resumed = run(crashed)
    assert resumed.resumed_from == 3 and resumed.steps == 7
    lines = [json.loads(x) for x in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 8))
    expected = [json.loads(x) for x in (tmp_path / "whole/metrics.jsonl").read_text().splitlines()]
    assert [x["loss"] for x in lines] == [x["loss"] for x in expected]
    a = load_file(tmp_path / "whole/adapter/pytorch_lora_weights.safetensors")
    b = load_file(crashed / "adapter/pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.probe_loss == whole.probe_loss
    # The EMA weights are what was saved, not the last step's.
    last = load_file(crashed / "checkpoints/checkpoint-7/pytorch_lora_weights.safetensors")
    assert any(not torch.equal(last[k], b[k]) for k in b)


def test_an_empty_set_or_an_sdxl_pipeline_is_refused(tiny_sd_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="the fine-tuning set is empty"):
        train_lora([], tmp_path, _recipe(), sd_model=str(tiny_sd_dir), out_dir=tmp_path / "o",
                   validation=PARAMS)  # fmt: skip
    xl = tmp_path / "xl"
    xl.mkdir()
    (xl / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ValueError, match=r"supports Stable Diffusion 1\.x/2\.x pipelines"):
        train_lora(_items(tmp_path), tmp_path, _recipe(), sd_model=str(xl),
                   out_dir=tmp_path / "o", validation=PARAMS)  # fmt: skip


def test_a_cancelled_fine_tune_stops_at_the_next_step(
    tiny_sd_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from pipeline.handlers import Cancelled

    cancelled = threading.Event()
    real_record = lora_train.record_step

    def cancel_after_two(path: Path, record: dict) -> None:
        real_record(path, record)
        if record["step"] == 2:
            cancelled.set()  # as the worker does when it gives the job up

    monkeypatch.setattr(lora_train, "record_step", cancel_after_two)
    out = tmp_path / "train"
    with pytest.raises(Cancelled, match="fine-tuning cancelled at step 2"):
        train_lora(_items(tmp_path), tmp_path, _recipe(max_train_steps=6, checkpointing_steps=2,
                   validation_images=0), sd_model=str(tiny_sd_dir), out_dir=out,
                   validation=PARAMS, device="cpu", cancelled=cancelled)  # fmt: skip
    assert [s for s, _ in lora_train.checkpoints(out)] == [2]  # to resume from
    assert not (out / "adapter").exists()


def test_training_runs_on_the_gpu_the_device_names(
    tiny_sd_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`models.device = cuda:1`: the whole fine-tuning runs with GPU 1 current, where a
    single-process Accelerator puts its models (on this CPU-only machine accelerate falls
    back to the CPU, and `torch.cuda.device` is a stand-in that records its use)."""
    import contextlib

    events: list[str] = []

    @contextlib.contextmanager
    def current_device(index: int):  # type: ignore[no-untyped-def]
        events.append(f"cuda:{index} current")
        yield
        events.append("restored")

    monkeypatch.setattr(torch.cuda, "device", current_device)
    real_record = lora_train.record_step

    def record(path: Path, line: dict) -> None:
        events.append(f"step {line['step']}")
        real_record(path, line)

    monkeypatch.setattr(lora_train, "record_step", record)
    recipe = _recipe(max_train_steps=2, checkpointing_steps=2, validation_images=0)
    train_lora(_items(tmp_path), tmp_path, recipe, sd_model=str(tiny_sd_dir),
               out_dir=tmp_path / "train", validation=PARAMS, device="cuda:1",
               progress=False)  # fmt: skip
    assert events == ["cuda:1 current", "step 1", "step 2", "restored"]
    # No index, the CPU, or `accelerate launch` (which assigns each process its GPU): as is.
    for device in ("cuda", "cpu", "auto"):
        assert isinstance(devices.on_device(device), contextlib.nullcontext)


def test_fetching_an_item_leaves_the_global_generators_alone(
    tiny_sd_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With num_workers = 0 the items are fetched in the training process, between noise
    draws on the GPU: seeding the global generators there would make every step's noise a
    function of the last item fetched. Crops and flips come from a local generator, fixed
    by (seed, epoch, index)."""
    from transformers import CLIPTokenizer

    from pipeline.adapt.dataset import FinetuneDataset, image_transform

    reseeded: list[int] = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded.append)
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd_dir, subfolder="tokenizer")
    transform = image_transform(64, center_crop=False, random_flip=True)
    dataset = FinetuneDataset(_items(tmp_path), tmp_path, tokenizer, transform, 0.5, seed=42)
    torch.manual_seed(0)
    reseeded.clear()
    state = torch.get_rng_state()
    first = [dataset[i]["pixel_values"] for i in range(8)]
    assert reseeded == [] and torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, dataset[i]["pixel_values"]) for i, a in enumerate(first))
    dataset.set_epoch(1)  # other crops and flips in another epoch
    assert any(not torch.equal(a, dataset[i]["pixel_values"]) for i, a in enumerate(first))
    assert first[0].shape == (3, 64, 64) and -1 <= first[0].min() < first[0].max() <= 1
