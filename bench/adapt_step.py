"""Training steps/s of the SD adaptation's two recipes, the production loops (accelerate,
the diffusers LoRA recipe, checkpoints off during timing): the paper's LoRA fine-tuning
(`pipeline.adapt.lora_train.train_lora`) and Diffusion-DPO (`pipeline.adapt.dpo_train.
train_dpo`: per step, the adapted UNet's forward and backward and the reference's forward
with the adapter disabled, on both images of each pair).

- CPU, always: the tiny test pipelines (pipeline/tiny_models.py: SD, and SDXL for DPO; built into
  a temporary folder and loaded with `from_pretrained` like real ones), batch 4 (pairs, for
  DPO), one thread per run (the machine's cores are shared; see `machine`).
- GPU, when CUDA is available: real-size architectures (SD 1.5: UNet 860M, VAE, CLIP
  ViT-L/14 text encoder; built from their configs with random weights, since a machine
  without internet cannot download the weights; speed and memory do not depend on them)
  at 512 px, bf16 mixed precision: the paper's fine-tuning at 8 images per forward pass
  accumulated to its total batch of 40, with and without gradient checkpointing; DPO at
  the diffusers reference's batch (16 pairs × 2 accumulated) with gradient checkpointing;
  SDXL's DPO at its reference's (8 pairs × 2, 1024 px), on SDXL base's architecture (UNet
  2.6B, CLIP ViT-L and OpenCLIP bigG text encoders, VAE) built from its published configs
  the same way (`--gpu-model`, `--gpu-sdxl-model`: local folders instead). Optimizer
  steps/s, images/s and peak GPU memory.

Steps/s is read from the loop's own per-step timestamps (`metrics.jsonl`), after warm-up
steps, so model loading and the final save are not counted.

Memory: each run is measured in its own child process: its peak resident set
(`getrusage` high-water mark, which includes loading the models); on a GPU also the peak
memory torch allocated and reserved during the run.

    python bench/adapt_step.py

Results: bench/results/adapt_step.json.
"""

from __future__ import annotations

import argparse
import io
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


def synthetic_pairs(store: Any, n: int, size: int) -> list[Any]:
    """`n` pairs of noise images (the winner first) with captions, in `store`."""
    from pipeline.adapt.pairs import Pair

    rng = random.Random(0)
    pairs = []
    for i in range(n):
        keys = []
        for _ in range(2):
            pixels = bytes(rng.randrange(256) for _ in range(3 * 16 * 16))
            image = Image.frombytes("RGB", (16, 16), pixels).resize((size, size))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=90)
            keys.append(store.put(buffer.getvalue(), ".jpg").key)
        pairs.append(Pair(f"a photo of thing number {i}", keys[0], keys[1], "train", f"{i}"))
    return pairs


def timed_dpo_run(
    sd_model: str,
    folder: Path,
    pairs: list[Any],
    store: Any,
    steps: int,
    warmup: int,
    **recipe: Any,
) -> dict[str, Any]:
    """Train `steps` DPO steps; steps/s over those after `warmup`."""
    from pipeline.adapt.dpo_train import train_dpo

    settings = AdaptSettings(max_train_steps=steps, checkpointing_steps=10**9,
                             validation_images=0, num_workers=2, **recipe)  # fmt: skip
    out = folder / f"dpo-{len(list(folder.glob('dpo-*')))}"
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    report = train_dpo(pairs, store.get, settings, sd_model=sd_model, out_dir=out,
                       validation=SamplingParams(1, 7.5, 64, 64), progress=False)  # fmt: skip
    lines = [json.loads(x) for x in (out / METRICS).read_text().splitlines()]
    start, end = lines[warmup - 1]["elapsed"], lines[-1]["elapsed"]
    rate = (len(lines) - warmup) / (end - start)
    return {
        "steps_timed": len(lines) - warmup,
        "steps_per_s": round(rate, 3),
        "pairs_per_s": round(rate * report.total_batch_size, 2),
        "batch_pairs": settings.batch_size,
        "total_batch_pairs": report.total_batch_size,
        "grad_accumulation": report.grad_accumulation,
        "mixed_precision": report.mixed_precision,
        "gradient_checkpointing": settings.gradient_checkpointing,
        "rank": settings.rank,
        **memory_peaks(),
    }


def cpu_lora(steps: int, warmup: int) -> dict[str, Any]:
    from pipeline.tiny_models import build_tiny_sd

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sd = build_tiny_sd(folder / "tiny_sd")
        items = synthetic_items(folder, 32, 72)
        figures = timed_run(str(sd), folder, items, steps, warmup, resolution=64,
                            batch_size=4, total_batch_size=4, mixed_precision="no")  # fmt: skip
    return {"model": "pipeline/tiny_models.py (tiny UNet/VAE/CLIP)", "size": 64, **figures}


def cpu_dpo(steps: int, warmup: int, sdxl: bool) -> dict[str, Any]:
    from hps.store import LocalImageStore
    from pipeline.tiny_models import build_tiny_sd, build_tiny_sdxl

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sd = (build_tiny_sdxl if sdxl else build_tiny_sd)(folder / "tiny")
        store = LocalImageStore(folder / "store")
        pairs = synthetic_pairs(store, 32, 72)
        figures = timed_dpo_run(str(sd), folder, pairs, store, steps, warmup, resolution=64,
                                batch_size=4, total_batch_size=4, mixed_precision="no",
                                center_crop=True)  # fmt: skip
    model = (
        "pipeline/tiny_models.py build_tiny_sdxl (two text encoders, text_time)"
        if sdxl
        else ("pipeline/tiny_models.py (tiny UNet/VAE/CLIP)")
    )
    return {"model": model, "size": 64, **figures}


def _in_child(function: Any, *args: Any) -> dict[str, Any]:
    """`function(*args)` in a fresh process (one torch thread), so that its peak memory is
    its own."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # (Not a multiprocessing.Pool: its daemonic workers may not start data-loader workers.)
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn, initializer=_one_thread) as pool:
        return pool.submit(function, *args).result()


def _one_thread() -> None:
    import multiprocessing

    torch.set_num_threads(1)
    # Data-loader workers forked, as in a worker process (a spawned child would spawn them,
    # re-importing torch at every epoch).
    multiprocessing.set_start_method("fork", force=True)


def build_sd15_architecture(folder: Path) -> Path:
    """SD 1.5's architecture (diffusers' defaults are its UNet and VAE; CLIP ViT-L/14's
    text tower) with random weights, saved as a pipeline folder."""
    from diffusers import (
        AutoencoderKL,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from pipeline.tiny_models import sd_scheduler, write_clip_tokenizer_files

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
        scheduler=sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder / "sd15", safe_serialization=True)
    return folder / "sd15"


# SDXL base 1.0's published configs (stabilityai/stable-diffusion-xl-base-1.0: unet/,
# vae/, text_encoder/, text_encoder_2/, scheduler/ config.json), the numbers that make the
# architecture; the rest are diffusers' and transformers' defaults, as in those files.
SDXL_UNET = {
    "sample_size": 128,  # latents: 1024 px / 8
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),  # heads per block (diffusers' historical name)
    "cross_attention_dim": 2048,  # 768 (CLIP-L) + 1280 (bigG) hidden states side by side
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 6 size ids × 256 + bigG's pooled 1280
}
SDXL_VAE = {  # SD's VAE, another scale
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "latent_channels": 4,
    "layers_per_block": 2,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}
SDXL_TEXT_ENCODERS = (
    # CLIP ViT-L/14's text tower (text_encoder: CLIPTextModel)
    {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
     "num_attention_heads": 12, "hidden_act": "quick_gelu", "projection_dim": 768},
    # OpenCLIP ViT-bigG/14's (text_encoder_2: CLIPTextModelWithProjection)
    {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
     "num_attention_heads": 20, "hidden_act": "gelu", "projection_dim": 1280},
)  # fmt: skip


def build_sdxl_architecture(folder: Path) -> Path:
    """SDXL base's architecture (`SDXL_UNET`, `SDXL_VAE`, `SDXL_TEXT_ENCODERS`) with random
    weights, saved in bf16 (half the 14 GB of float32; training loads the frozen weights in
    bf16 and SDXL's VAE in float32 anyway) as a pipeline folder. Built on a GPU machine
    only: it takes about 14 GB of memory."""
    from diffusers import (
        AutoencoderKL,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    from pipeline.tiny_models import sdxl_scheduler, write_clip_tokenizer_files

    bpe = write_clip_tokenizer_files(folder / "bpe")
    tokenizer = CLIPTokenizer.from_pretrained(bpe, model_max_length=77)
    tokenizer_2 = CLIPTokenizer.from_pretrained(bpe, model_max_length=77, pad_token="!")

    def text_config(tokenizer: Any, values: dict[str, Any]) -> Any:
        return CLIPTextConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **values,
        )

    clip_l, big_g = SDXL_TEXT_ENCODERS
    pipe = StableDiffusionXLPipeline(
        unet=UNet2DConditionModel(**SDXL_UNET),
        vae=AutoencoderKL(**SDXL_VAE),
        text_encoder=CLIPTextModel(text_config(tokenizer, clip_l)),
        text_encoder_2=CLIPTextModelWithProjection(text_config(tokenizer_2, big_g)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=sdxl_scheduler(),
    )
    pipe.to(torch.bfloat16)
    pipe.save_pretrained(folder / "sdxl", safe_serialization=True)
    return folder / "sdxl"


def gpu(args: argparse.Namespace) -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"measured": False, "reason": "not measured (no GPU lent)"}
    from hps.store import LocalImageStore

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sd = args.gpu_model or str(build_sd15_architecture(folder))
        items = synthetic_items(folder, 256, 576)
        runs: dict[str, Any] = {
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
        store = LocalImageStore(folder / "store")
        pairs = synthetic_pairs(store, 128, 576)
        runs["dpo_sd15"] = timed_dpo_run(
            sd, folder, pairs, store, args.gpu_steps, args.warmup, resolution=512,
            batch_size=16, total_batch_size=32, mixed_precision="bf16",
            gradient_checkpointing=True, center_crop=True, rank=8,
        )  # fmt: skip
        sdxl = args.gpu_sdxl_model or str(build_sdxl_architecture(folder))
        big = synthetic_pairs(store, 64, 1088)
        runs["dpo_sdxl"] = {
            "model": args.gpu_sdxl_model or "SDXL base architecture, random weights",
            "size": 1024,
            **timed_dpo_run(
                sdxl, folder, big, store, args.gpu_steps, args.warmup, resolution=1024,
                batch_size=8, total_batch_size=16, mixed_precision="bf16",
                gradient_checkpointing=True, center_crop=True, rank=8,
            ),
        }  # fmt: skip
    return {
        "measured": True,
        "model": args.gpu_model or "SD 1.5 architecture, random weights",
        "device": torch.cuda.get_device_name(),
        "size": 512,
        **runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="steps on the tiny pipelines")
    parser.add_argument("--warmup", type=int, default=10, help="steps not timed")
    parser.add_argument("--gpu-steps", type=int, default=30)
    parser.add_argument("--gpu-model", default=None, help="a local SD 1.x folder instead")
    parser.add_argument("--gpu-sdxl-model", default=None, help="a local SDXL folder instead (DPO)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/adapt_step.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    report = {
        "benchmark": "adapt_step",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads_per_run": 1,
            "loadavg_before": [round(x, 2) for x in load_before],
        },
        "cpu_tiny": _in_child(cpu_lora, args.steps, args.warmup),
        "cpu_tiny_dpo_sd": _in_child(cpu_dpo, args.steps, args.warmup, False),
        "cpu_tiny_dpo_sdxl": _in_child(cpu_dpo, args.steps, args.warmup, True),
        "gpu_sd15": gpu(args),
    }
    report["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
