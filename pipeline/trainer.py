"""The training loop of the HPS classifier: the paper's recipe on `accelerate`.

The recipe (Wu et al. 2023, §3): start from CLIP; freeze the lower blocks of both towers and
train the last ones (10 image blocks and 6 text blocks by default, each tower's final norm
and projection with them, and the logit scale); per example, cross-entropy of the softmax
over its K image-text logits against the choice (`pipeline.loss`); AdamW (lr 1.7e-5, weight
decay 3.1e-3), batches of 5 examples, a cosine schedule after a linear warm-up, gradient
clipping, mixed precision on GPUs, gradient accumulation. `accelerate` runs the same loop on
the CPU, one GPU or several (`accelerate launch -m cli train ...`); the schedule's length is
counted in the steps each process takes (`schedule_lengths`), so it ends with the training
however many processes share it.

A run writes `metrics.jsonl` (one line per epoch) and `checkpoints/epoch-N/` (saved models,
each written atomically) with `checkpoints/best` pointing at the best by validation top-1
accuracy, the early-stopping criterion.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from hps.files import replacing
from hps.settings import TrainSettings
from pipeline import devices
from pipeline.batches import ChoiceDataset, collate
from pipeline.data import Example, Reader
from pipeline.evaluate import evaluate
from pipeline.handlers import Cancelled
from pipeline.hps_model import HPSModel, ModelSpec
from pipeline.loss import MAX_LOGIT_SCALE, preference_loss

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    best: Path | None  # the best checkpoint folder
    best_epoch: int | None
    best_val_top1: float | None
    epochs_run: int
    steps: int
    stopped_early: bool
    initial: dict[str, Any] | None  # the untrained model's test report
    history: list[dict[str, Any]] = field(default_factory=list)


def freeze_lower_blocks(clip: torch.nn.Module, image_blocks: int, text_blocks: int) -> int:
    """Freeze all but the last blocks of each tower (with the tower's final norm and
    projection), using open_clip's own locking; the logit scale stays trainable. Returns
    the number of trainable parameters."""
    # open_clip's groups end with [last block, final norm] and [projection]: N blocks and
    # the projection are N + 1 groups.
    clip.lock_image_tower(unlocked_groups=image_blocks + 1 if image_blocks else 0)
    clip.lock_text_tower(unlocked_layers=text_blocks + 1 if text_blocks else 0)
    clip.logit_scale.requires_grad = True
    return sum(p.numel() for p in clip.parameters() if p.requires_grad)


def _param_groups(clip: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # As open_clip's trainer: no decay on gains, biases, embeddings' 1-d params, logit scale.
    decay, no_decay = [], []
    for name, param in clip.named_parameters():
        if not param.requires_grad:
            continue
        plain = param.ndim < 2 or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if plain else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def schedule_lengths(
    batches_per_process: int,
    *,
    grad_accumulation: int,
    epochs: int,
    warmup_fraction: float,
    ticks_per_step: int,
) -> tuple[int, int]:
    """(total, warm-up) length of the LR schedule, in calls of the scheduler's own `step`.

    Each process takes ceil(batches / accumulation) optimizer steps an epoch over its shard
    of the data (`batches_per_process`: the prepared loader's length). accelerate's
    scheduler wrapper steps the schedule `ticks_per_step` times per optimizer step: the
    number of processes (the batch of a step is that many batches), or 1 with split
    batches. Counting the same way, the schedule ends exactly when the training does."""
    steps = math.ceil(batches_per_process / grad_accumulation) * epochs
    warmup = int(warmup_fraction * steps)
    return steps * ticks_per_step, warmup * ticks_per_step


def _scheduler(optimizer: torch.optim.Optimizer, total: int, warmup: int) -> Any:
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    cosine = CosineAnnealingLR(optimizer, T_max=max(1, total - warmup))
    if warmup == 0:
        return cosine
    ramp = LinearLR(optimizer, start_factor=1.0 / warmup, total_iters=warmup)
    return SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])


@devices.on_its_device
def train(
    examples: Sequence[Example],
    read: Reader,
    recipe: TrainSettings,
    *,
    base: ModelSpec,
    out_dir: Path,
    device: str = "auto",
    progress: bool = True,
    context: dict[str, Any] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    cancelled: threading.Event | None = None,
) -> TrainResult:
    """Train `base` on the `train` split with the `recipe`, early-stop on `val`, keep the
    best checkpoint in `out_dir`. Also evaluates the untrained model on `test` (the untuned
    baseline, exactly as it started). `device` "cpu" trains on the CPU where a GPU is
    visible, "cuda:N" on GPU N. Raises `Cancelled` at the next step once `cancelled` is set."""
    from accelerate.utils import set_seed

    accelerator = devices.accelerator(
        device, recipe.mixed_precision, gradient_accumulation_steps=recipe.grad_accumulation
    )
    set_seed(recipe.seed)
    # Loaded with its own preprocessing: the untuned baseline (and the serving model, when
    # that is the base) is evaluated as it serves; training then switches to the recipe's.
    hps = HPSModel.load(
        base.model,
        pretrained=base.pretrained,
        checkpoint=base.checkpoint,
        device=str(accelerator.device),
        precision="fp32",
    )
    by_split = {s: [e for e in examples if e.split == s] for s in ("train", "val", "test")}
    if not by_split["train"]:
        raise ValueError("no training examples")
    main = accelerator.is_main_process
    checkpoints = out_dir / "checkpoints"
    if main:
        checkpoints.mkdir(parents=True, exist_ok=True)

    def evaluate_on(split: str) -> dict[str, Any] | None:
        if not by_split[split]:
            return None
        report = evaluate(hps, by_split[split], read)
        hps.clip.train()
        return report

    initial = evaluate_on("test")
    hps.set_resize_mode(recipe.resize_mode)
    trainable = freeze_lower_blocks(hps.clip, recipe.image_blocks, recipe.text_blocks)
    log.info("training %s: %d trainable parameters", base.describe(), trainable, extra=context)
    optimizer = torch.optim.AdamW(
        _param_groups(hps.clip, recipe.weight_decay), lr=recipe.learning_rate
    )
    generator = torch.Generator().manual_seed(recipe.seed)
    loader = DataLoader(
        ChoiceDataset(by_split["train"], hps.transform, read),
        batch_size=recipe.batch_size,
        shuffle=True,
        generator=generator,
        collate_fn=collate,
        num_workers=recipe.num_workers,
        persistent_workers=recipe.num_workers > 0,
    )
    raw_optimizer = optimizer
    clip, optimizer, loader = accelerator.prepare(hps.clip, optimizer, loader)
    # After `prepare`, the loader's length is this process's shard of the batches.
    total, warmup = schedule_lengths(
        len(loader),
        grad_accumulation=recipe.grad_accumulation,
        epochs=recipe.epochs,
        warmup_fraction=recipe.warmup_fraction,
        ticks_per_step=1 if accelerator.split_batches else accelerator.num_processes,
    )
    scheduler = accelerator.prepare(_scheduler(raw_optimizer, total, warmup))
    tokenizer = hps.tokenizer

    result = TrainResult(None, None, None, 0, 0, False, initial)
    best_top1 = -1.0
    stale = 0
    for epoch in range(1, recipe.epochs + 1):
        started = time.monotonic()
        clip.train()
        losses = []
        bar = tqdm(loader, desc=f"epoch {epoch}/{recipe.epochs}", disable=not (progress and main))
        for batch in bar:
            if cancelled is not None and cancelled.is_set():
                raise Cancelled(f"training cancelled at step {result.steps}")
            with accelerator.accumulate(clip):
                tokens = tokenizer(batch["prompts"]).to(accelerator.device)
                # forward() of the prepared model: DDP gradient sync and autocast apply.
                image_features, text_features = clip(batch["pixels"], tokens)[:2]
                loss = preference_loss(
                    image_features,
                    text_features,
                    batch["counts"],
                    batch["targets"],
                    batch["weights"],
                    accelerator.unwrap_model(clip).logit_scale,
                )
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(clip.parameters(), recipe.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                result.steps += 1
                with torch.no_grad():  # as open_clip's trainer: keep the scale in range
                    accelerator.unwrap_model(clip).logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        result.epochs_run = epoch
        val = evaluate_on("val")
        val_top1 = val["top1"] if val else None
        record = {
            "epoch": epoch,
            "steps": result.steps,
            "train_loss": sum(losses) / len(losses),
            "val_top1": val_top1,
            "val_n": val["n"] if val else 0,
            "lr": scheduler.get_last_lr()[0],
            "logit_scale": float(accelerator.unwrap_model(clip).logit_scale.detach().exp()),
            "seconds": round(time.monotonic() - started, 3),
        }
        # Without a validation split every epoch counts as an improvement (the last wins).
        improved = val_top1 is None or val_top1 > best_top1
        if improved:
            best_top1 = val_top1 if val_top1 is not None else best_top1
            stale = 0
            if main:
                result.best = _save_best(hps, checkpoints, epoch, recipe, base, record)
            result.best_epoch, result.best_val_top1 = epoch, val_top1
        else:
            stale += 1
        record["best"] = improved
        result.history.append(record)
        if main:
            with open(out_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")
        if on_epoch is not None:
            on_epoch(record)
        log.info("epoch %d: %s", epoch, record, extra=context)
        if stale >= recipe.patience:
            result.stopped_early = epoch < recipe.epochs
            break
    accelerator.wait_for_everyone()
    return result


def _save_best(
    hps: HPSModel,
    checkpoints: Path,
    epoch: int,
    recipe: TrainSettings,
    base: ModelSpec,
    record: dict[str, Any],
) -> Path:
    """Save this epoch's model and point `best` at it (an atomic symlink swap); the folder
    of the previous best is removed only afterwards."""
    folder = checkpoints / f"epoch-{epoch}"
    config = {**recipe.model_dump(mode="json"), "base": base.as_dict()}
    hps.save(folder, {"training": {"epoch": epoch, "config": config, **record}})
    best = checkpoints / "best"
    previous = best.resolve() if best.is_symlink() else None
    with replacing(best, durable=False) as link:
        link.symlink_to(folder.name)
    if previous is not None and previous != folder.resolve():
        shutil.rmtree(previous, ignore_errors=True)
    return best
