"""LoRA training of the Stable Diffusion UNet: what both adaptation recipes share
(`LoraTraining`), and the paper's fine-tuning with it (`train_lora`).

`LoraTraining` is diffusers' `train_text_to_image_lora.py` (which the paper's reference code
forked, and diffusers' Diffusion-DPO LoRA scripts follow), in its order, split into steps:
accelerator → scheduler, tokenizers and models from the base pipeline (`DiffusionParts`: SD
1.x/2.x, or SDXL with its second text encoder, pooled text embeddings and size
conditioning) → everything frozen, LoRA (`peft.LoraConfig(r, lora_alpha=r,
init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"])`) added
to the UNet's attention → optimizer (AdamW on the LoRA weights) → `fit`: data, learning-rate
schedule, `accelerator.prepare`, resume from the latest checkpoint, the loop (gradient
accumulation to the total batch, clipping, optional EMA of the LoRA weights, one metrics
line per optimizer step, a progress bar or log lines) with checkpoints (`accelerator.save_state`,
each written to a temporary folder and renamed, so "latest" is always whole) → the adapter
saved in the diffusers LoRA format, loadable by `pipe.load_lora_weights(folder)`. A recipe
brings only its data and its loss (`fit(dataset, loss)`), and what it checks after.

The VAE and the text encoders stay frozen; they and the UNet's base weights run in the
mixed-precision dtype (SDXL's VAE in float32, as diffusers' SDXL scripts keep it), the LoRA
weights train in float32 (a bf16 weight would not register updates of a 1e-5 learning
rate). `accelerate launch` runs the same function on several GPUs; on the CPU it runs in
float32.

`train_lora`, the paper's recipe: the ε (or v, per the scheduler config) MSE on the
fine-tuning set. Outputs in `out_dir`: `metrics.jsonl` (one line per optimizer step: loss,
learning rate, seconds since this attempt's loop started),
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

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
PIPELINES = {"StableDiffusionPipeline": False, "StableDiffusionXLPipeline": True}  # → SDXL

# A batch's loss and the figures logged with it (means over the batch).
LossFn = Callable[[dict[str, Any]], tuple[torch.Tensor, dict[str, torch.Tensor]]]


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


def pipeline_kind(sd_model: str, *, sdxl: bool = True) -> bool:
    """Whether `sd_model` is an SDXL pipeline (else SD 1.x/2.x); ValueError for any other
    kind, or for SDXL when `sdxl` is false (a recipe that supports SD 1.x/2.x only)."""
    from diffusers import DiffusionPipeline

    name = DiffusionPipeline.load_config(sd_model).get("_class_name", "")
    if name not in PIPELINES or (PIPELINES[name] and not sdxl):
        supported = "Stable Diffusion 1.x/2.x" + (" and SDXL" if sdxl else "")
        raise ValueError(
            f"{sd_model} is a {name}: LoRA fine-tuning supports {supported} pipelines "
            f"({'one or two text encoders' if sdxl else 'one text encoder'} and a UNet)"
        )
    return PIPELINES[name]


def native_resolution(sd_model: str) -> int:
    """The pixels `sd_model` generates at by default: its UNet's sample size times the
    VAE's scale (SDXL base: 128 × 8 = 1024; SD 1.5: 64 × 8 = 512), read from the configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel.load_config(sd_model, subfolder="unet")
    vae = AutoencoderKL.load_config(sd_model, subfolder="vae")
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


@dataclass(frozen=True)
class CaptionTokens:
    """Captions → their token ids for each text encoder: `input_ids`, SDXL's `input_ids_2`."""

    tokenizers: tuple[Any, ...]

    def __call__(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        names = ("input_ids", "input_ids_2")[: len(self.tokenizers)]
        return {name: tokenize(t, captions) for name, t in zip(names, self.tokenizers, strict=True)}


@dataclass
class DiffusionParts:
    """The parts of a base pipeline that training uses, loaded as a downloaded pipeline's
    (`from_pretrained` of each subfolder): the noise scheduler (DDPM, as training draws
    noise), the tokenizers and text encoders (one; SDXL: two), the VAE and the UNet."""

    sd_model: str
    sdxl: bool
    scheduler: Any
    tokenizers: list[Any]
    text_encoders: list[Any]
    vae: Any
    unet: Any

    @classmethod
    def load(cls, sd_model: str, weight_dtype: torch.dtype, *, sdxl: bool) -> DiffusionParts:
        """The frozen weights in the mixed-precision dtype (loaded so, which keeps the
        modules that must stay float32 in float32); SDXL's VAE in float32, whose fp16
        activations overflow."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        scheduler = DDPMScheduler.from_pretrained(sd_model, subfolder="scheduler")
        suffixes = ["", "_2"] if sdxl else [""]
        encoders = [CLIPTextModel, CLIPTextModelWithProjection] if sdxl else [CLIPTextModel]
        tokenizers = [
            CLIPTokenizer.from_pretrained(sd_model, subfolder=f"tokenizer{s}") for s in suffixes
        ]
        text_encoders = [
            model.from_pretrained(sd_model, subfolder=f"text_encoder{s}", dtype=weight_dtype)
            for model, s in zip(encoders, suffixes, strict=True)
        ]
        vae_dtype = torch.float32 if sdxl else weight_dtype
        vae = AutoencoderKL.from_pretrained(sd_model, subfolder="vae", dtype=vae_dtype)
        unet = UNet2DConditionModel.from_pretrained(sd_model, subfolder="unet", dtype=weight_dtype)
        return cls(sd_model, sdxl, scheduler, tokenizers, text_encoders, vae, unet)

    @property
    def pipeline_class(self) -> Any:
        """The pipeline class whose LoRA loader saves and reads this UNet's adapters."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        return StableDiffusionXLPipeline if self.sdxl else StableDiffusionPipeline

    def frozen(self) -> list[Any]:
        return [self.vae, *self.text_encoders, self.unet]

    @property
    def tokenize(self) -> CaptionTokens:
        """Token ids of captions for each text encoder, as a batch holds them (a function
        that data-loader workers can take: no model in it)."""
        return CaptionTokens(tuple(self.tokenizers))

    def conditioning(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any] | None]:
        """What the UNet is conditioned on for a batch: the text encoder's last hidden
        states (SD), or SDXL's (both encoders' penultimate hidden states side by side, as
        its pipeline and training scripts do) with its `added_cond_kwargs`: the second
        encoder's pooled, projected embedding and the size conditioning (`time_ids`:
        original height and width, crop top and left, target height and width)."""
        device = self.text_encoders[0].device
        if not self.sdxl:
            return self.text_encoders[0](batch["input_ids"].to(device), return_dict=False)[0], None
        states = []
        for encoder, name in zip(self.text_encoders, ("input_ids", "input_ids_2"), strict=True):
            output = encoder(batch[name].to(device), output_hidden_states=True)
            pooled = output[0]  # the last encoder's: its projected text embedding
            states.append(output.hidden_states[-2])
        time_ids = batch["time_ids"].to(device, dtype=states[0].dtype)
        return torch.cat(states, dim=-1), {"text_embeds": pooled, "time_ids": time_ids}


class LoraTraining:
    """One LoRA training of `sd_model`'s UNet (module docstring): `__init__` sets up the
    accelerator, the models, the adapter and the optimizer; `fit` trains it with a
    recipe's data and loss; `adapter_model` is the trained UNet (the EMA weights if kept);
    `save_adapter` writes it in the diffusers format. `what` names the training in the
    progress bar and messages ("fine-tuning")."""

    def __init__(
        self,
        recipe: AdaptSettings,
        sd_model: str,
        out_dir: Path,
        *,
        device: str,
        sdxl: bool,
        what: str,
        progress: bool = True,
        context: dict[str, Any] | None = None,
        cancelled: threading.Event | None = None,
    ) -> None:
        from accelerate.utils import ProjectConfiguration, set_seed
        from diffusers.training_utils import EMAModel, cast_training_params
        from peft import LoraConfig

        self.recipe, self.sd_model, self.out_dir = recipe, sd_model, out_dir
        self.what, self.progress, self.context, self.cancelled = what, progress, context, cancelled
        self.started = time.monotonic()

        # 1. The accelerator (`pipeline.devices`: precision, and a state reset between runs).
        self.processes = devices.process_state(device).num_processes
        per_step = recipe.batch_size * self.processes
        self.accumulation = max(1, math.ceil(recipe.total_batch_size / per_step))
        self.total_batch = per_step * self.accumulation
        if self.total_batch != recipe.total_batch_size:
            log.warning(
                "total batch %d is not a multiple of %d per device × %d processes: using %d",
                recipe.total_batch_size,
                recipe.batch_size,
                self.processes,
                self.total_batch,
            )
        self.accelerator = devices.accelerator(
            device,
            recipe.mixed_precision,
            gradient_accumulation_steps=self.accumulation,
            project_config=ProjectConfiguration(project_dir=str(out_dir)),
        )
        self.main = self.accelerator.is_main_process
        set_seed(recipe.seed)
        if self.main:
            out_dir.mkdir(parents=True, exist_ok=True)

        # 2. Scheduler, tokenizers and models, as a downloaded pipeline's parts.
        self.weight_dtype = devices.dtype(self.accelerator.mixed_precision)
        self.parts = DiffusionParts.load(sd_model, self.weight_dtype, sdxl=sdxl)

        # 3. Freeze everything; only the LoRA weights added below train.
        for model in self.parts.frozen():
            model.requires_grad_(False)
            model.to(self.accelerator.device)
        unet = self.parts.unet
        unet.add_adapter(
            LoraConfig(
                r=recipe.rank,
                lora_alpha=recipe.rank,
                init_lora_weights="gaussian",  # B = 0: the adapter starts as a no-op
                target_modules=LORA_TARGETS,
            )
        )
        if self.weight_dtype != torch.float32:
            cast_training_params(unet, dtype=torch.float32)
        if recipe.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.lora_params = [p for p in unet.parameters() if p.requires_grad]
        self.ema = EMAModel(self.lora_params, decay=recipe.ema_decay) if recipe.use_ema else None

        # 4. Optimizer.
        self.optimizer = torch.optim.AdamW(
            self.lora_params,
            lr=recipe.learning_rate,
            betas=(recipe.adam_beta1, recipe.adam_beta2),
            weight_decay=recipe.weight_decay,
            eps=recipe.adam_epsilon,
        )
        self.unet = unet  # prepared (wrapped) by `fit`
        self.steps = 0
        self.resumed_from: int | None = None
        self.recent: list[dict[str, float]] = []  # the last 100 steps' logged means

    def fit(
        self,
        dataset: Dataset,
        loss_of: LossFn,
        *,
        collate_fn: Callable[[list[Any]], dict[str, Any]],
        on_checkpoint: Callable[[int], None] | None = None,
    ) -> None:
        """Train to `recipe.max_train_steps` optimizer steps on `dataset` (which has
        `set_epoch`) with the loss `loss_of(batch)`, resuming from the latest checkpoint in
        `out_dir`. `on_checkpoint(step)` runs in the main process after each checkpoint
        (validation images), with the EMA weights in place if kept. Raises `Cancelled` at
        the next batch once `cancelled` is set (the latest checkpoint stays)."""
        recipe, accelerator = self.recipe, self.accelerator

        # 5. Data.
        sampler = EpochShuffle(len(dataset), recipe.seed)  # type: ignore[arg-type]
        loader = DataLoader(
            dataset,
            batch_size=recipe.batch_size,
            sampler=sampler,
            collate_fn=collate_fn,
            num_workers=recipe.num_workers,
            # Its own generator: each new iterator draws a seed from it, which would otherwise
            # come from the global one and shift the noise of a run resumed mid-epoch.
            generator=torch.Generator().manual_seed(recipe.seed),
        )

        # 6. Schedule (stepped once per process by the prepared scheduler, hence the factor).
        from diffusers.optimization import get_scheduler

        lr_scheduler = get_scheduler(
            recipe.lr_scheduler,
            optimizer=self.optimizer,
            num_warmup_steps=recipe.lr_warmup_steps * self.processes,
            num_training_steps=recipe.max_train_steps * self.processes,
        )
        unet, optimizer, loader, lr_scheduler = accelerator.prepare(
            self.unet, self.optimizer, loader, lr_scheduler
        )
        self.unet = unet
        self._register_hooks()

        updates_per_epoch = math.ceil(len(loader) / self.accumulation)
        epochs = math.ceil(recipe.max_train_steps / updates_per_epoch)
        log.info(
            "%s: LoRA r%d on %s: %d examples, %d steps, batch %d (%d × %d processes × %d "
            "accumulated), %s",
            self.what,
            recipe.rank,
            self.sd_model,
            len(dataset),  # type: ignore[arg-type]
            recipe.max_train_steps,
            self.total_batch,
            recipe.batch_size,
            self.processes,
            self.accumulation,
            accelerator.mixed_precision,
            extra=self.context,
        )

        # 8. Resume from the latest whole checkpoint.
        step = 0
        found = checkpoints(self.out_dir)
        if found:
            step, path = found[-1]
            accelerator.load_state(str(path))
            self.resumed_from = step
            log.info("resuming from %s", path, extra=self.context)
        metrics = self.out_dir / METRICS
        if self.main:
            _forget_steps_after(metrics, step)
        first_epoch, skip = divmod(step, updates_per_epoch)
        skip *= self.accumulation  # batches of the first epoch already trained on

        # 9. The loop.
        bar = Progress(
            recipe.max_train_steps,
            self.what,
            bar=self.progress and self.main,
            context=self.context,
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
                dataset.set_epoch(epoch)  # type: ignore[attr-defined]  # accelerate does not, with several processes
                batches = accelerator.skip_first_batches(loader, skip) if skip else loader
                skip = 0
                figures: list[dict[str, float]] = []  # of the batches accumulated into this step
                for batch in batches:
                    if self.cancelled is not None and self.cancelled.is_set():
                        raise Cancelled(f"{self.what} cancelled at step {step}")
                    with accelerator.accumulate(unet):
                        loss, logged = loss_of(batch)
                        # Means over every process's batch, for the log.
                        figures.append(
                            {
                                name: accelerator.gather(
                                    value.detach().float().repeat(recipe.batch_size)
                                )
                                .mean()
                                .item()
                                for name, value in {"loss": loss, **logged}.items()
                            }
                        )
                        accelerator.backward(loss)
                        if accelerator.sync_gradients:
                            accelerator.clip_grad_norm_(self.lora_params, recipe.max_grad_norm)
                        optimizer.step()
                        lr_scheduler.step()
                        optimizer.zero_grad()
                    if not accelerator.sync_gradients:
                        continue
                    if self.ema is not None:
                        self.ema.step(self.lora_params)
                    step += 1
                    # Means over the batches accumulated (fewer at an epoch's end).
                    means = {k: sum(f[k] for f in figures) / len(figures) for k in figures[0]}
                    figures = []
                    self.recent = [*self.recent[-99:], means]
                    lr = lr_scheduler.get_last_lr()[0]
                    if self.main:
                        elapsed = round(time.monotonic() - loop_started, 4)
                        record_step(metrics, {"step": step, **means, "lr": lr, "elapsed": elapsed})
                    bar.update(1, **means)
                    at_checkpoint = step % recipe.checkpointing_steps == 0
                    if self.main and (at_checkpoint or step == recipe.max_train_steps):
                        self._save_checkpoint(step)
                        if on_checkpoint is not None:
                            with self.ema_weights():
                                on_checkpoint(step)
                        unet.train()
                    if step >= recipe.max_train_steps:
                        break
        self.steps = step

    def _register_hooks(self) -> None:
        """Checkpoints hold the LoRA weights only (in the diffusers format), not the UNet.
        (The UNet is the one prepared model; only the main process saves.)"""
        from diffusers.training_utils import cast_training_params
        from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

        accelerator, ema, pipeline = self.accelerator, self.ema, self.parts.pipeline_class

        def save_model_hook(models: list[Any], weights: list[Any], output_dir: str) -> None:
            layers = get_peft_model_state_dict(accelerator.unwrap_model(models[0]))
            weights.pop()  # accelerate must not save the whole UNet as well
            pipeline.save_lora_weights(
                output_dir,
                unet_lora_layers=convert_state_dict_to_diffusers(layers),
                safe_serialization=True,
            )
            if ema is not None:
                torch.save(ema.state_dict(), Path(output_dir) / EMA_FILE)

        def load_model_hook(models: list[Any], input_dir: str) -> None:
            model = accelerator.unwrap_model(models.pop())  # popped: accelerate loads nothing
            state, _ = pipeline.lora_state_dict(input_dir)
            state = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
            set_peft_model_state_dict(model, convert_unet_state_dict_to_peft(state), "default")
            if self.weight_dtype != torch.float32:
                cast_training_params([model], dtype=torch.float32)
            if ema is not None:
                ema.load_state_dict(torch.load(Path(input_dir) / EMA_FILE, weights_only=True))

        accelerator.register_save_state_pre_hook(save_model_hook)
        accelerator.register_load_state_pre_hook(load_model_hook)

    def _save_checkpoint(self, step: int) -> None:
        """`save_state` into a temporary folder renamed into place; older ones pruned."""
        folder = self.out_dir / CHECKPOINTS
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{CHECKPOINT_PREFIX}{step}"
        # (One there was saved by an attempt that crashed before recording later steps.)
        with replacing(target, folder=True, unique=False) as tmp:
            self.accelerator.save_state(str(tmp))
        for _, old in checkpoints(self.out_dir)[: -self.recipe.checkpoints_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("saved checkpoint %s", target)

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """With EMA, the EMA weights stand in for the trained ones inside the block."""
        if self.ema is not None:
            self.ema.store(self.lora_params)
            self.ema.copy_to(self.lora_params)
        try:
            yield
        finally:
            if self.ema is not None:
                self.ema.restore(self.lora_params)

    def adapter_model(self) -> Any:
        """After `fit`, in every process: the trained UNet (unwrapped; the EMA weights if
        kept), its adapter enabled."""
        self.accelerator.wait_for_everyone()
        if self.ema is not None:
            self.ema.copy_to(self.lora_params)
        return self.accelerator.unwrap_model(self.unet)

    def save_adapter(self, model: Any, info: dict[str, Any]) -> Path:
        """The adapter in the diffusers LoRA format in `out_dir/adapter`, with `info` (what
        it needs at inference, the recipe) beside it in `ADAPTER_INFO`; written to a
        temporary folder and renamed (main process only). Returns the folder."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        target = self.out_dir / ADAPTER
        if self.main:
            layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
            info = {"format": "diffusers-lora", "base_model": self.sd_model, **info}
            with replacing(target, folder=True, unique=False) as tmp:
                self.parts.pipeline_class.save_lora_weights(
                    tmp, unet_lora_layers=layers, safe_serialization=True
                )
                (tmp / ADAPTER_INFO).write_text(json.dumps(info, indent=2) + "\n")
        return target

    def recent_mean(self, name: str = "loss") -> float | None:
        """The mean of a logged figure over the last (up to) 100 steps of this attempt."""
        values = [step[name] for step in self.recent]
        return sum(values) / len(values) if values else None

    def validate(
        self,
        params: SamplingParams,
        folder: Path,
        variants: dict[str, Callable[[str], tuple[str, str | None]]],
    ) -> None:
        """Validation images: each of `recipe.validation_prompts` in each variant (a
        prompt → (prompt, negative prompt)), from the same seeds, by a pipeline of the base
        model's parts with the UNet in training."""
        recipe = self.recipe
        if not recipe.validation_prompts or not recipe.validation_images:
            return
        parts = self.parts
        components: dict[str, Any] = {
            "unet": self.accelerator.unwrap_model(self.unet),
            "vae": parts.vae,
            "text_encoder": parts.text_encoders[0],
            "tokenizer": parts.tokenizers[0],
        }
        if parts.sdxl:
            components.update(
                text_encoder_2=parts.text_encoders[1], tokenizer_2=parts.tokenizers[1]
            )
        else:
            components.update(safety_checker=None, requires_safety_checker=False)
        pipe = parts.pipeline_class.from_pretrained(
            self.sd_model, **components, dtype=self.weight_dtype
        )
        pipe.set_progress_bar_config(disable=True)
        folder.mkdir(parents=True, exist_ok=True)
        with torch.no_grad(), self.accelerator.autocast():
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

    def finish(self) -> float:
        """Free the accelerator's references; the seconds since set-up."""
        self.accelerator.free_memory()
        return round(time.monotonic() - self.started, 3)


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
    added_cond_kwargs: dict[str, Any] | None = None,
) -> torch.Tensor:
    """The denoising error of each example (shape [batch], float32): the mean squared error
    between what `unet` predicts for `latents` noised with `noise` at `timesteps`, given
    the text encoder's `encoder_states` (and SDXL's `added_cond_kwargs`), and its target,
    the noise (ε-prediction) or the velocity (v-prediction) as the scheduler's config says.
    The LoRA fine-tuning's loss is its mean; Diffusion-DPO compares it between the trained
    and the reference UNet."""
    prediction = scheduler.config.prediction_type
    if prediction == "epsilon":
        target = noise
    elif prediction == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unknown prediction type {prediction!r}")
    noisy = scheduler.add_noise(latents, noise, timesteps)
    predicted = unet(
        noisy, timesteps, encoder_states, added_cond_kwargs=added_cond_kwargs, return_dict=False
    )[0]
    return (predicted.float() - target.float()).pow(2).mean(dim=tuple(range(1, predicted.ndim)))


# -- The paper's recipe: fine-tuning on the labelled set ------------------------------------


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
    if not items:
        raise ValueError("the fine-tuning set is empty: nothing to train on")
    sdxl = pipeline_kind(sd_model, sdxl=False)
    training = LoraTraining(recipe, sd_model, out_dir, device=device, sdxl=sdxl,
                            what="fine-tuning", progress=progress, context=context,
                            cancelled=cancelled)  # fmt: skip
    parts = training.parts
    transform = image_transform(
        recipe.resolution, center_crop=recipe.center_crop, random_flip=recipe.random_flip
    )
    dataset = FinetuneDataset(
        items, root, parts.tokenizers[0], transform, recipe.prompt_dropout, seed=recipe.seed
    )

    def loss_of(batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pixels = batch["pixel_values"].to(dtype=parts.vae.dtype)
        latents = encode_latents(parts.vae, pixels).to(training.weight_dtype)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(
            0,
            parts.scheduler.config.num_train_timesteps,
            (latents.shape[0],),
            device=latents.device,
        ).long()
        hidden, added = parts.conditioning(batch)
        mse = diffusion_mse(training.unet, parts.scheduler, latents, noise, timesteps, hidden,
                            added)  # fmt: skip
        return mse.mean(), {}

    identifier = recipe.identifier
    variants: dict[str, Callable[[str], tuple[str, str | None]]] = {
        "neutral": lambda p: (p, None),
        "identifier": lambda p: (identifier + p, None),
        "negative": lambda p: (p, identifier),
    }
    training.fit(
        dataset,
        loss_of,
        collate_fn=collate,
        on_checkpoint=lambda step: training.validate(
            validation, out_dir / VALIDATION / f"step-{step:06d}", variants
        ),
    )

    # 10. The adapter (the EMA weights if kept), and the probe loss of base and adapter.
    model = training.adapter_model()
    probe = _probe_batch(items, root, parts.tokenizers[0], recipe)
    model.disable_adapters()
    base_loss = _probe_loss(training, model, probe)
    model.enable_adapters()
    trained_loss = _probe_loss(training, model, probe)
    info = {
        "identifier": recipe.identifier,
        "negative_prompt": recipe.identifier,
        "recipe": "hps",
        "rank": recipe.rank,
        "steps": training.steps,
        "usage": "pipe.load_lora_weights(folder); pipe(prompt, negative_prompt=identifier)",
    }
    adapter = training.save_adapter(model, info)
    report = TrainReport(
        steps=training.steps,
        resumed_from=training.resumed_from,
        examples=len(dataset),
        total_batch_size=training.total_batch,
        grad_accumulation=training.accumulation,
        processes=training.processes,
        mixed_precision=training.accelerator.mixed_precision,
        loss=training.recent_mean(),
        probe_loss_base=base_loss,
        probe_loss=trained_loss,
        adapter=str(adapter),
        seconds=training.finish(),
    )
    log.info(
        "fine-tuned %d steps: probe loss %.5f (base %.5f)",
        training.steps,
        trained_loss,
        base_loss,
        extra=context,
    )
    return report


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
def _probe_loss(training: LoraTraining, unet: Any, batch: dict[str, torch.Tensor]) -> float:
    """The denoising loss on the probe batch with noise and timesteps fixed by the seed, so
    that two models (the base UNet and the adapted one) are compared on the same draws."""
    unet.eval()
    recipe, parts, accelerator = training.recipe, training.parts, training.accelerator
    generator = torch.Generator("cpu").manual_seed(recipe.seed)
    device, dtype = accelerator.device, parts.vae.dtype
    scheduler = parts.scheduler
    losses: list[float] = []
    n = batch["pixel_values"].shape[0]
    with accelerator.autocast():
        for start in range(0, n, recipe.batch_size):
            pixels = batch["pixel_values"][start : start + recipe.batch_size]
            ids = batch["input_ids"][start : start + recipe.batch_size]
            latents = encode_latents(parts.vae, pixels.to(device, dtype), sample=False)
            noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
            t = torch.randint(
                0, scheduler.config.num_train_timesteps, (len(pixels),), generator=generator
            ).to(device)
            hidden, added = parts.conditioning({"input_ids": ids})
            losses += diffusion_mse(unet, scheduler, latents, noise, t, hidden, added).tolist()
    return sum(losses) / len(losses)
