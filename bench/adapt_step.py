"""LoRA fine-tuning steps/s of the SD adaptation (`pipeline.adapt.lora_train.train_lora`,
the production loop: accelerate, the diffusers LoRA recipe, checkpoints off during timing).

- CPU, always: the tiny test pipeline (pipeline/tiny_models.py, built into a temporary folder and
  loaded with `from_pretrained` like a real one), 64 px, batch 4.
- GPU, when CUDA is available: a real-size SD 1.5 architecture (UNet 860M, VAE, CLIP
  ViT-L/14 text encoder, built from their configs with random weights, since a machine
  without internet cannot download the weights; speed and memory do not depend on them)
  at 512 px, bf16 mixed precision, 8 images per forward pass accumulated to the reference's
  total batch of 40, with and without gradient checkpointing: optimizer steps/s, images/s
  and peak GPU memory.

Steps/s is read from the loop's own per-step timestamps (`metrics.jsonl`), after warm-up
steps, so model loading and the final save are not counted.

Memory: the peak resident set of this process (`getrusage` high-water mark, so it includes
loading the models; the CPU run comes first, so its figure is its own) and of the largest
data-loader worker process; on a GPU also the peak memory torch allocated and reserved
during the run.

    python bench/adapt_step.py

Results: bench/results/adapt_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from hps.settings import AdaptSettings  # noqa: E402
from pipeline.adapt.dataset import Item  # noqa: E402
from pipeline.adapt.lora_train import METRICS, train_lora  # noqa: E402
from pipeline.generate import SamplingParams  # noqa: E402


def synthetic_items(folder: Path, n: int, size: int) -> list[Item]:
    """`n` noise images with captions (half with the identifier), like a labelled set."""
    rng = random.Random(0)
    items = []
    for i in range(n):
        pixels = bytes(rng.randrange(256) for _ in range(3 * 16 * 16))
        Image.frombytes("RGB", (16, 16), pixels).resize((size, size)).save(folder / f"{i}.jpg")
        caption = f"a photo of thing number {i}"
        items.append(Item(f"{i}.jpg", ("Weird image. " if i % 2 else "") + caption, "positive"))
    return items


def timed_run(
    sd_model: str, folder: Path, items: list[Item], steps: int, warmup: int, **recipe: Any
) -> dict[str, Any]:
    """Train `steps` steps; steps/s over those after `warmup`."""
    settings = AdaptSettings(
        max_train_steps=steps,
        checkpointing_steps=10**9,  # only the final one, after the timed steps
        validation_images=0,
        num_workers=2,
        **recipe,
    )
    out = folder / f"run-{len(list(folder.glob('run-*')))}"
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    report = train_lora(items, folder, settings, sd_model=sd_model, out_dir=out,
                        validation=SamplingParams(1, 7.5, 64, 64), progress=False)  # fmt: skip
    lines = [json.loads(x) for x in (out / METRICS).read_text().splitlines()]
    start, end = lines[warmup - 1]["elapsed"], lines[-1]["elapsed"]
    rate = (len(lines) - warmup) / (end - start)
    figures = {
        "steps_timed": len(lines) - warmup,
        "steps_per_s": round(rate, 3),
        "images_per_s": round(rate * report.total_batch_size, 2),
        "batch": settings.batch_size,
        "total_batch": report.total_batch_size,
        "grad_accumulation": report.grad_accumulation,
        "mixed_precision": report.mixed_precision,
        "gradient_checkpointing": settings.gradient_checkpointing,
        "rank": settings.rank,
    }
    figures.update(memory_peaks())
    return figures


def memory_peaks() -> dict[str, float]:
    """Peak RSS of this process and of its largest finished child (the data-loader workers)
    so far, in MiB (Linux reports KiB); on a GPU, torch's peaks since the last reset."""
    peaks = {
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_workers_mib": round(
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1
        ),
    }
    if torch.cuda.is_available():
        peaks["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        peaks["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    return peaks


def cpu(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.tiny_models import build_tiny_sd

    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sd = build_tiny_sd(folder / "tiny_sd")
        items = synthetic_items(folder, 32, 72)
        figures = timed_run(str(sd), folder, items, args.steps, args.warmup, resolution=64,
                            batch_size=4, total_batch_size=4, mixed_precision="no")  # fmt: skip
    return {"model": "pipeline/tiny_models.py (tiny UNet/VAE/CLIP)", "size": 64, **figures}


def build_sd15_architecture(folder: Path) -> Path:
    """SD 1.5's architecture (diffusers' defaults are its UNet and VAE; CLIP ViT-L/14's
    text tower) with random weights, saved as a pipeline folder."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from pipeline.tiny_models import write_clip_tokenizer_files

    tokenizer = CLIPTokenizer.from_pretrained(
        write_clip_tokenizer_files(folder / "bpe"), model_max_length=77
    )
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel(sample_size=64, cross_attention_dim=768),
        vae=AutoencoderKL(
            block_out_channels=[128, 256, 512, 512],
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            latent_channels=4,
            layers_per_block=2,
            sample_size=512,
        ),
        text_encoder=CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=77,
                hidden_act="quick_gelu",
            )
        ),
        tokenizer=tokenizer,
        scheduler=DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder / "sd15", safe_serialization=True)
    return folder / "sd15"


def gpu(args: argparse.Namespace) -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"measured": False, "reason": "not measured: no GPU lent"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sd = args.gpu_model or str(build_sd15_architecture(folder))
        items = synthetic_items(folder, 256, 576)
        runs = {
            name: timed_run(
                sd,
                folder,
                items,
                args.gpu_steps,
                args.warmup,
                resolution=512,
                batch_size=8,
                total_batch_size=40,
                mixed_precision="bf16",
                gradient_checkpointing=checkpointing,
            )
            for name, checkpointing in (("plain", False), ("gradient_checkpointing", True))
        }
    return {
        "measured": True,
        "model": args.gpu_model or "SD 1.5 architecture, random weights",
        "device": torch.cuda.get_device_name(),
        "size": 512,
        **runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="steps on the tiny pipeline")
    parser.add_argument("--warmup", type=int, default=10, help="steps not timed")
    parser.add_argument("--gpu-steps", type=int, default=30)
    parser.add_argument("--gpu-model", default=None, help="a local SD 1.x folder instead")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/adapt_step.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    report = {
        "benchmark": "adapt_step",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "loadavg_before": [round(x, 2) for x in load_before],
        },
        "cpu_tiny": cpu(args),
        "gpu_sd15": gpu(args),
    }
    report["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
