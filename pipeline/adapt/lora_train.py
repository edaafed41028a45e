"""LoRA fine-tuning of the Stable Diffusion UNet: diffusers' `train_text_to_image_lora.py`
(which the paper's reference code forked), in its order, split into functions.

accelerator → scheduler, tokenizer and models from the base pipeline → everything frozen,
LoRA (`peft.LoraConfig(r, lora_alpha=r, init_lora_weights="gaussian", target_modules=
["to_k", "to_q", "to_v", "to_out.0"])`) added to the UNet's attention → optimizer (AdamW on
the LoRA weights) → data → learning-rate schedule → `accelerator.prepare` → resume from the
latest checkpoint → loop: latents from the VAE, noise, a random timestep per image, the
ε (or v, per the scheduler config) MSE, gradient accumulation to the total batch, clipping,
optional EMA of the LoRA weights → checkpoints (`accelerator.save_state`, each written to a
temporary folder and renamed, so "latest" is always whole) with validation images → the
adapter saved in the diffusers LoRA format, loadable by `pipe.load_lora_weights(folder)`.

The VAE and the text encoder stay frozen; they and the UNet's base weights run in the
mixed-precision dtype, the LoRA weights train in float32 (a bf16 weight would not register
updates of a 1e-5 learning rate). `accelerate launch` runs the same function on several
GPUs; on the CPU it runs in float32.

Outputs in `out_dir`: `metrics.jsonl` (one line per optimizer step: loss, learning rate,
seconds since this attempt's loop started),
`checkpoints/checkpoint-<step>/` (resumable; each also a loadable LoRA folder),
`validation/step-<step>/` (images: the prompt as is, with the identifier before it, and
with the identifier as negative prompt, the same seeds each) and `adapter/`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from hps.files import replacing
from hps.settings import AdaptSettings
from pipeline import devices
from pipeline.adapt.dataset import (
    EpochShuffle,
    FinetuneDataset,
    Item,
    collate,
    image_transform,
    tokenize,
)
from pipeline.adapt.progress import Progress
from pipeline.generate import SamplingParams
from pipeline.handlers import Cancelled

log = logging.getLogger(__name__)

LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
CHECKPOINTS = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"
METRICS = "metrics.jsonl"
VALIDATION = "validation"
ADAPTER = "adapter"
ADAPTER_INFO = "hps_adapter.json"  # beside the weights: the identifier and the recipe
EMA_FILE = "ema.pt"
PROBE_SIZE = 8  # training examples of the fixed-noise probe loss


@dataclass
class TrainReport:
    steps: int
    resumed_from: int | None
    examples: int
    total_batch_size: int
    grad_accumulation: int
    processes: int
    mixed_precision: str
    loss: float | None  # mean step loss over the last (up to) 100 steps
    probe_loss_base: float  # the fixed-noise probe loss of the base UNet (LoRA off)
    probe_loss: float  # ... and of the trained one
    adapter: str
    seconds: float

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """The whole checkpoints (step, folder), oldest first."""
    found = []
    for path in (out_dir / CHECKPOINTS).glob(f"{CHECKPOINT_PREFIX}*"):
        step = path.name.removeprefix(CHECKPOINT_PREFIX)
        if step.isdigit() and path.is_dir():
            found.append((int(step), path))
    return sorted(found)


def record_step(path: Path, record: dict[str, Any]) -> None:
    """Append one optimizer step's line to the metrics file."""
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def _forget_steps_after(path: Path, step: int) -> None:
    """Drop the metrics lines a crashed attempt wrote after the checkpoint resumed from."""
    if not path.is_file():
        return
    kept = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= step
    ]
    path.write_text("".join(line + "\n" for line in kept))


def _check_pipeline(sd_model: str) -> None:
    from diffusers import DiffusionPipeline

    name = DiffusionPipeline.load_config(sd_model).get("_class_name", "")
    if name != "StableDiffusionPipeline":  # SD 1.x and 2.x alike
        raise ValueError(
            f"{sd_model} is a {name}: LoRA fine-tuning supports Stable Diffusion 1.x/2.x "
            "pipelines (one text encoder and a UNet)"
        )


@devices.on_its_device
def train_lora(
    items: Sequence[Item],
    root: Path,
    recipe: AdaptSettings,
    *,
    sd_model: str,
    out_dir: Path,
    validation: SamplingParams,
    device: str = "auto",
    progress: bool = True,
    context: dict[str, Any] | None = None,
    cancelled: threading.Event | None = None,
) -> TrainReport:
    """Fine-tune LoRA weights on the UNet of `sd_model` with `items` (files relative to
    `root`), resuming from the latest checkpoint in `out_dir`; returns what it did. `device`
    "cpu" trains on the CPU where a GPU is visible, "cuda:N" on GPU N; otherwise the
    process's current GPU (or those `accelerate launch` assigns). Raises `Cancelled` at the
    next batch once `cancelled` is set (the latest checkpoint stays, to resume from)."""
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel, cast_training_params
    from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import CLIPTextModel, CLIPTokenizer

    if not items:
        raise ValueError("the fine-tuning set is empty: nothing to train on")
    started = time.monotonic()
    _check_pipeline(sd_model)

    # 1. The accelerator (`pipeline.devices`: precision, and a state reset between runs).
    processes = devices.process_state(device).num_processes
    accumulation = max(1, math.ceil(recipe.total_batch_size / (recipe.batch_size * processes)))
    total_batch = recipe.batch_size * processes * accumulation
    if total_batch != recipe.total_batch_size:
        log.warning(
            "total batch %d is not a multiple of %d per device × %d processes: using %d",
            recipe.total_batch_size,
            recipe.batch_size,
            processes,
            total_batch,
        )
    accelerator = devices.accelerator(
        device,
        recipe.mixed_precision,
        gradient_accumulation_steps=accumulation,
        project_config=ProjectConfiguration(project_dir=str(out_dir)),
    )
    main = accelerator.is_main_process
    set_seed(recipe.seed)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)

    # 2. Scheduler, tokenizer and models, as a downloaded pipeline's parts; the frozen
    # weights in the mixed-precision dtype (loaded so, which keeps the modules that must
    # stay float32 in float32).
    weight_dtype = devices.dtype(accelerator.mixed_precision)
    noise_scheduler = DDPMScheduler.from_pretrained(sd_model, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(sd_model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(
        sd_model, subfolder="text_encoder", dtype=weight_dtype
    )
    vae = AutoencoderKL.from_pretrained(sd_model, subfolder="vae", dtype=weight_dtype)
    unet = UNet2DConditionModel.from_pretrained(sd_model, subfolder="unet", dtype=weight_dtype)

    # 3. Freeze everything; only the LoRA weights added below train.
    unet.requires_grad_(False)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.to(accelerator.device)
    vae.to(accelerator.device)
    text_encoder.to(accelerator.device)
    unet.add_adapter(
        LoraConfig(
            r=recipe.rank,
            lora_alpha=recipe.rank,
            init_lora_weights="gaussian",  # B = 0: the adapter starts as a no-op
            target_modules=LORA_TARGETS,
        )
    )
    if weight_dtype != torch.float32:
        cast_training_params(unet, dtype=torch.float32)
    if recipe.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    lora_params = [p for p in unet.parameters() if p.requires_grad]
    ema = EMAModel(lora_params, decay=recipe.ema_decay) if recipe.use_ema else None

    # 4. Optimizer.
    optimizer = torch.optim.AdamW(
        lora_params,
        lr=recipe.learning_rate,
        betas=(recipe.adam_beta1, recipe.adam_beta2),
        weight_decay=recipe.weight_decay,
        eps=recipe.adam_epsilon,
    )

    # 5. Data.
    transform = image_transform(
        recipe.resolution, center_crop=recipe.center_crop, random_flip=recipe.random_flip
    )
    dataset = FinetuneDataset(
        items, root, tokenizer, transform, recipe.prompt_dropout, seed=recipe.seed
    )
    sampler = EpochShuffle(len(dataset), recipe.seed)
    loader = DataLoader(
        dataset,
        batch_size=recipe.batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=recipe.num_workers,
        # Its own generator: each new iterator draws a seed from it, which would otherwise
        # come from the global one and shift the noise of a run resumed mid-epoch.
        generator=torch.Generator().manual_seed(recipe.seed),
    )

    # 6. Schedule (stepped once per process by the prepared scheduler, hence the factor).
    lr_scheduler = get_scheduler(
        recipe.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=recipe.lr_warmup_steps * processes,
        num_training_steps=recipe.max_train_steps * processes,
    )
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(
        unet, optimizer, loader, lr_scheduler
    )

    # 7. Checkpoints hold the LoRA weights only (in the diffusers format), not the UNet.
    # (The UNet is the one prepared model; only the main process saves.)
    def save_model_hook(models: list[Any], weights: list[Any], output_dir: str) -> None:
        layers = get_peft_model_state_dict(accelerator.unwrap_model(models[0]))
        weights.pop()  # accelerate must not save the whole UNet as well
        StableDiffusionPipeline.save_lora_weights(
            output_dir,
            unet_lora_layers=convert_state_dict_to_diffusers(layers),
            safe_serialization=True,
        )
        if ema is not None:
            torch.save(ema.state_dict(), Path(output_dir) / EMA_FILE)

    def load_model_hook(models: list[Any], input_dir: str) -> None:
        model = accelerator.unwrap_model(models.pop())  # popped: accelerate loads nothing
        state, _ = StableDiffusionPipeline.lora_state_dict(input_dir)
        state = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
        set_peft_model_state_dict(model, convert_unet_state_dict_to_peft(state), "default")
        if weight_dtype != torch.float32:
            cast_training_params([model], dtype=torch.float32)
        if ema is not None:
            ema.load_state_dict(torch.load(Path(input_dir) / EMA_FILE, weights_only=True))

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    updates_per_epoch = math.ceil(len(loader) / accumulation)
    epochs = math.ceil(recipe.max_train_steps / updates_per_epoch)
    log.info(
        "fine-tuning LoRA r%d on %s: %d examples, %d steps, batch %d (%d × %d processes × %d "
        "accumulated), %s",
        recipe.rank,
        sd_model,
        len(dataset),
        recipe.max_train_steps,
        total_batch,
        recipe.batch_size,
        processes,
        accumulation,
        accelerator.mixed_precision,
        extra=context,
    )

    # 8. Resume from the latest whole checkpoint.
    step = 0
    resumed_from = None
    found = checkpoints(out_dir)
    if found:
        step, path = found[-1]
        accelerator.load_state(str(path))
        resumed_from = step
        log.info("resuming from %s", path, extra=context)
    metrics = out_dir / METRICS
    if main:
        _forget_steps_after(metrics, step)
    first_epoch, skip = divmod(step, updates_per_epoch)
    skip *= accumulation  # batches of the first epoch already trained on

    # 9. The loop.
    recent: list[float] = []
    bar = Progress(
        recipe.max_train_steps,
        "fine-tuning",
        bar=progress and main,
        context=context,
        initial=step,
        unit="step",
    )
    loop_started = time.monotonic()
    with bar:
        for epoch in range(first_epoch, epochs):
            if step >= recipe.max_train_steps:
                break
            unet.train()
            loader.set_epoch(epoch)
            dataset.set_epoch(epoch)  # accelerate does not, with several processes
            batches = accelerator.skip_first_batches(loader, skip) if skip else loader
            skip = 0
            losses: list[float] = []  # of the batches accumulated into this step
            for batch in batches:
                if cancelled is not None and cancelled.is_set():
                    raise Cancelled(f"fine-tuning cancelled at step {step}")
                with accelerator.accumulate(unet):
                    latents = encode_latents(vae, batch["pixel_values"].to(dtype=weight_dtype))
                    noise = torch.randn_like(latents)
                    timesteps = torch.randint(
                        0,
                        noise_scheduler.config.num_train_timesteps,
                        (latents.shape[0],),
                        device=latents.device,
                    ).long()
                    hidden = text_encoder(batch["input_ids"], return_dict=False)[0]
                    mse = diffusion_mse(unet, noise_scheduler, latents, noise, timesteps, hidden)
                    loss = mse.mean()
                    # The mean over every process's batch, for the log.
                    gathered = accelerator.gather(loss.detach().repeat(recipe.batch_size))
                    losses.append(gathered.mean().item())
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(lora_params, recipe.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad()
                if not accelerator.sync_gradients:
                    continue
                if ema is not None:
                    ema.step(lora_params)
                step += 1
                # A mean over the batches accumulated (fewer at an epoch's end).
                step_loss, losses = sum(losses) / len(losses), []
                recent = [*recent[-99:], step_loss]
                lr = lr_scheduler.get_last_lr()[0]
                if main:
                    elapsed = round(time.monotonic() - loop_started, 4)
                    record_step(
                        metrics, {"step": step, "loss": step_loss, "lr": lr, "elapsed": elapsed}
                    )
                bar.update(1, loss=step_loss)
                at_checkpoint = step % recipe.checkpointing_steps == 0
                if main and (at_checkpoint or step == recipe.max_train_steps):
                    _save_checkpoint(accelerator, out_dir, step, recipe)
                    with _ema_weights(ema, lora_params):
                        _validate(
                            accelerator,
                            sd_model,
                            unet,
                            vae,
                            text_encoder,
                            tokenizer,
                            recipe,
                            validation,
                            out_dir / VALIDATION / f"step-{step:06d}",
                            weight_dtype,
                        )
                    unet.train()
                if step >= recipe.max_train_steps:
                    break

    # 10. The adapter (the EMA weights if kept), and the probe loss of base and adapter.
    accelerator.wait_for_everyone()
    if ema is not None:
        ema.copy_to(lora_params)
    model = accelerator.unwrap_model(unet)
    probe = _probe_batch(items, root, tokenizer, recipe)
    model.disable_adapters()
    base_loss = _probe_loss(accelerator, model, vae, text_encoder, noise_scheduler, probe, recipe)
    model.enable_adapters()
    trained_loss = _probe_loss(
        accelerator, model, vae, text_encoder, noise_scheduler, probe, recipe
    )
    adapter = out_dir / ADAPTER
    if main:
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
        _save_adapter(adapter, layers, recipe, sd_model, step)
    report = TrainReport(
        steps=step,
        resumed_from=resumed_from,
        examples=len(dataset),
        total_batch_size=total_batch,
        grad_accumulation=accumulation,
        processes=processes,
        mixed_precision=accelerator.mixed_precision,
        loss=sum(recent) / len(recent) if recent else None,
        probe_loss_base=base_loss,
        probe_loss=trained_loss,
        adapter=str(adapter),
        seconds=round(time.monotonic() - started, 3),
    )
    accelerator.free_memory()
    log.info(
        "fine-tuned %d steps: probe loss %.5f (base %.5f)",
        step,
        trained_loss,
        base_loss,
        extra=context,
    )
    return report


def encode_latents(vae: Any, pixels: torch.Tensor, *, sample: bool = True) -> torch.Tensor:
    """The scaled VAE latents of `pixels` (in [-1, 1]): drawn from the encoder's
    distribution, as training does, or its mean (`sample` false, for fixed draws)."""
    dist = vae.encode(pixels).latent_dist
    return (dist.sample() if sample else dist.mean) * vae.config.scaling_factor


def diffusion_mse(
    unet: Any,
    scheduler: Any,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    encoder_states: torch.Tensor,
) -> torch.Tensor:
    """The denoising error of each example (shape [batch], float32): the mean squared error
    between what `unet` predicts for `latents` noised with `noise` at `timesteps`, given
    the text encoder's `encoder_states`, and its target, the noise (ε-prediction) or the
    velocity (v-prediction) as the scheduler's config says. The LoRA fine-tuning's loss is
    its mean; Diffusion-DPO compares it between the trained and the reference UNet."""
    prediction = scheduler.config.prediction_type
    if prediction == "epsilon":
        target = noise
    elif prediction == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unknown prediction type {prediction!r}")
    noisy = scheduler.add_noise(latents, noise, timesteps)
    predicted = unet(noisy, timesteps, encoder_states, return_dict=False)[0]
    return (predicted.float() - target.float()).pow(2).mean(dim=tuple(range(1, predicted.ndim)))


def _save_checkpoint(accelerator: Any, out_dir: Path, step: int, recipe: AdaptSettings) -> None:
    """`save_state` into a temporary folder renamed into place; older ones pruned."""
    folder = out_dir / CHECKPOINTS
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{CHECKPOINT_PREFIX}{step}"
    # (One there was saved by an attempt that crashed before recording later steps.)
    with replacing(target, folder=True, unique=False) as tmp:
        accelerator.save_state(str(tmp))
    for _, old in checkpoints(out_dir)[: -recipe.checkpoints_total_limit]:
        shutil.rmtree(old, ignore_errors=True)
    log.info("saved checkpoint %s", target)


@contextlib.contextmanager
def _ema_weights(ema: Any, params: list[torch.nn.Parameter]) -> Iterator[None]:
    """With EMA, the EMA weights stand in for the trained ones inside the block."""
    if ema is not None:
        ema.store(params)
        ema.copy_to(params)
    try:
        yield
    finally:
        if ema is not None:
            ema.restore(params)


def _validate(
    accelerator: Any,
    sd_model: str,
    unet: Any,
    vae: Any,
    text_encoder: Any,
    tokenizer: Any,
    recipe: AdaptSettings,
    params: SamplingParams,
    folder: Path,
    weight_dtype: torch.dtype,
) -> None:
    """The reference's validation images: each prompt as is, with the identifier before
    it, and with the identifier as negative prompt, from the same seeds."""
    if not recipe.validation_prompts or not recipe.validation_images:
        return
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        sd_model,
        unet=accelerator.unwrap_model(unet),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        safety_checker=None,
        requires_safety_checker=False,
        dtype=weight_dtype,
    )
    pipe.set_progress_bar_config(disable=True)
    folder.mkdir(parents=True, exist_ok=True)
    identifier = recipe.identifier
    variants = {
        "neutral": lambda p: (p, None),
        "identifier": lambda p: (identifier + p, None),
        "negative": lambda p: (p, identifier),
    }
    with torch.no_grad(), accelerator.autocast():
        for i, prompt in enumerate(recipe.validation_prompts):
            for variant, make in variants.items():
                text, negative = make(prompt)
                n = recipe.validation_images
                images = pipe(
                    prompt=[text] * n,
                    negative_prompt=[negative] * n if negative else None,
                    num_inference_steps=params.steps,
                    guidance_scale=params.guidance_scale,
                    width=params.width,
                    height=params.height,
                    generator=[
                        torch.Generator("cpu").manual_seed(recipe.seed + j) for j in range(n)
                    ],
                ).images
                for j, image in enumerate(images):
                    image.save(folder / f"p{i}-{variant}-{j}.png")


def _probe_batch(
    items: Sequence[Item], root: Path, tokenizer: Any, recipe: AdaptSettings
) -> dict[str, torch.Tensor]:
    """A fixed sample of the training set, centre-cropped, with fixed noise and timesteps."""
    picked = sorted(range(len(items)), key=lambda i: (i * 2_654_435_761) % 2**32)[:PROBE_SIZE]
    transform = image_transform(recipe.resolution, center_crop=True, random_flip=False)
    dataset = FinetuneDataset([items[i] for i in picked], root, tokenizer, transform)
    batch = collate([dataset[i] for i in range(len(dataset))])
    batch["input_ids"] = tokenize(tokenizer, [items[i].caption for i in picked])
    return batch


@torch.no_grad()
def _probe_loss(
    accelerator: Any,
    unet: Any,
    vae: Any,
    text_encoder: Any,
    scheduler: Any,
    batch: dict[str, torch.Tensor],
    recipe: AdaptSettings,
) -> float:
    """The denoising loss on the probe batch with noise and timesteps fixed by the seed, so
    that two models (the base UNet and the adapted one) are compared on the same draws."""
    unet.eval()
    generator = torch.Generator("cpu").manual_seed(recipe.seed)
    device, dtype = accelerator.device, next(vae.parameters()).dtype
    losses: list[float] = []
    n = batch["pixel_values"].shape[0]
    with accelerator.autocast():
        for start in range(0, n, recipe.batch_size):
            pixels = batch["pixel_values"][start : start + recipe.batch_size]
            ids = batch["input_ids"][start : start + recipe.batch_size]
            latents = encode_latents(vae, pixels.to(device, dtype), sample=False)
            noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
            t = torch.randint(
                0, scheduler.config.num_train_timesteps, (len(pixels),), generator=generator
            ).to(device)
            hidden = text_encoder(ids.to(device), return_dict=False)[0]
            losses += diffusion_mse(unet, scheduler, latents, noise, t, hidden).tolist()
    return sum(losses) / len(losses)


def _save_adapter(
    target: Path, layers: dict[str, torch.Tensor], recipe: AdaptSettings, sd_model: str, steps: int
) -> None:
    """The adapter in the diffusers LoRA format, with what it needs at inference (its
    identifier, the negative prompt) beside it; written to a temporary folder, renamed."""
    from diffusers import StableDiffusionPipeline

    info = {
        "format": "diffusers-lora",
        "base_model": sd_model,
        "identifier": recipe.identifier,
        "negative_prompt": recipe.identifier,
        "rank": recipe.rank,
        "steps": steps,
        "usage": "pipe.load_lora_weights(folder); pipe(prompt, negative_prompt=identifier)",
    }
    with replacing(target, folder=True, unique=False) as tmp:
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers=layers, safe_serialization=True
        )
        (tmp / ADAPTER_INFO).write_text(json.dumps(info, indent=2) + "\n")
