"""Diffusion-DPO (Wallace et al. 2023, arXiv 2311.12908) with LoRA: what differs from the
paper's fine-tuning; the rest is `pipeline.adapt.lora_train.LoraTraining`.

The loss, as SalesforceAIResearch/DiffusionDPO's train.py and diffusers'
`examples/research_projects/diffusion_dpo/` compute it: a batch holds B pairs (winner,
loser) of one prompt each; each pair draws one timestep and one noise, used for both its
images. The MSE of the noise (or velocity) prediction is taken for the trained model and
for the reference on each image, and

    loss = −log σ(−β/2 · ((mse_w − mse_l) − (ref_w − ref_l)))

averaged over the pairs, β = `adapt.dpo_beta` (train.py's default, 5000). The reference is
the model the adapter starts from, the base UNet: the same UNet with the adapter disabled
(diffusers' LoRA scripts), so there is no second copy in memory. Adapters are not stacked:
when an adapter serves, a new one still starts from (and is anchored to) the base. The
implicit accuracy is the share of pairs whose inner term is positive (the model already
prefers the winner more than the reference does), a zero counting half, as diffusers'
scripts log it: at the adapter's zero initialisation every term is zero, the accuracy 0.5
and the loss log 2.

Data: `PairsDataset`, pixels of both images (winner first, as the references concatenate
them) with one crop and flip drawn for the pair, or, with the latent cache
(`adapt.dpo_latent_cache`, `cache_latents`), the VAE's latent distribution of each image
computed once; the text's token ids; SDXL's size conditioning (`time_ids`: original size,
crop corner, target size). After training, the implicit accuracy and loss on the held-out
pairs (fixed draws of noise and timesteps) measure what the adapter learnt.

Outputs in `out_dir`: `metrics.jsonl` (one line per optimizer step: loss, implicit
accuracy, the model's and the reference's MSE, learning rate, seconds), `checkpoints/`,
`validation/step-<step>/` (each validation prompt as is, same seeds) and `adapter/`.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from hps.files import replacing
from hps.settings import AdaptSettings
from pipeline import devices
from pipeline.adapt.dataset import TrainTransform, image_transform
from pipeline.adapt.lora_train import (
    VALIDATION,
    DiffusionParts,
    LoraTraining,
    diffusion_mse,
    encode_latents,
    pipeline_kind,
)
from pipeline.adapt.pairs import Pair
from pipeline.adapt.progress import Progress
from pipeline.generate import SamplingParams
from pipeline.handlers import Cancelled

log = logging.getLogger(__name__)

LATENTS_DIR = "latents"
SHARD_IMAGES = 64  # images per latent-cache file


def dpo_loss(
    model_mse: torch.Tensor, ref_mse: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Diffusion-DPO's loss (the mean over pairs) and each pair's inner term, from the
    per-image MSEs of the model and the reference, winners first (shape [2B])."""
    model_w, model_l = model_mse.chunk(2)
    ref_w, ref_l = ref_mse.chunk(2)
    model_diff = model_w - model_l
    ref_diff = ref_w - ref_l
    inside = -0.5 * beta * (model_diff - ref_diff)
    return -F.logsigmoid(inside).mean(), inside


def implicit_accuracy(inside: torch.Tensor) -> torch.Tensor:
    """The share of pairs the model prefers the winner of, relative to the reference (a
    zero inner term counts half)."""
    n = inside.numel()
    return (inside > 0).sum().float() / n + 0.5 * (inside == 0).sum().float() / n


def preference_terms(
    unet: Any,
    model: Any,
    scheduler: Any,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    hidden: torch.Tensor,
    added: dict[str, Any] | None,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, inner terms, model MSE, reference MSE) of a batch of 2B images, winners
    first. `unet` is what runs (prepared by accelerate, or not); `model` the UNet with the
    adapter, whose adapter is disabled for the reference's prediction (no gradient)."""
    model_mse = diffusion_mse(unet, scheduler, latents, noise, timesteps, hidden, added)
    model.disable_adapters()
    try:
        with torch.no_grad():
            ref_mse = diffusion_mse(unet, scheduler, latents, noise, timesteps, hidden, added)
    finally:
        model.enable_adapters()
    loss, inside = dpo_loss(model_mse, ref_mse, beta)
    return loss, inside, model_mse, ref_mse


def pair_noise(
    latents: torch.Tensor, num_timesteps: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One noise and one timestep per pair, the same for its two images (winners first):
    the references' `randn_like(latents).chunk(2)[0].repeat(2, 1, 1, 1)` and
    `randint(...).repeat(2)`; from `generator` (on the CPU) when given, for fixed draws."""
    pairs = latents.shape[0] // 2
    if generator is None:
        noise = torch.randn_like(latents).chunk(2)[0]
        timesteps = torch.randint(0, num_timesteps, (pairs,), device=latents.device)
    else:
        noise = torch.randn(latents[:pairs].shape, generator=generator)
        timesteps = torch.randint(0, num_timesteps, (pairs,), generator=generator)
    noise = noise.to(latents.device, latents.dtype).repeat(2, 1, 1, 1)
    return noise, timesteps.to(latents.device).long().repeat(2)


def doubled(hidden: torch.Tensor, added: dict[str, Any] | None) -> tuple[Any, Any]:
    """A pair's conditioning for both its images (the references' `.repeat(2, ...)`)."""
    twice = {k: v.repeat(2, *([1] * (v.ndim - 1))) for k, v in (added or {}).items()}
    return hidden.repeat(2, 1, 1), (twice if added is not None else None)


# -- data --------------------------------------------------------------------------------


def loser_entry(loser: str, winner: str) -> str:
    """The cache entry of `loser` resized to its winner's size (they differ) before the
    crop, as the pixel path and diffusers' SDXL script do."""
    return f"{loser}|as|{winner}"


class LatentCache:
    """The VAE's latent distribution (mean and standard deviation, unscaled) of each pair
    image, centre-cropped at the training resolution, and flipped too with `random_flip`,
    with SDXL's size conditioning of the crop: `latents/shard-*.safetensors` (float16),
    each written whole (a temporary file renamed), so a resumed cache adds only the images
    it lacks. A loser of another size than its winner also has an entry resized to the
    winner's size first (`loser_entry`), which its pair trains on."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._index: dict[str, Path] | None = None

    @property
    def index(self) -> dict[str, Path]:
        """Tensor name → its shard (read once per process)."""
        if self._index is None:
            from safetensors import safe_open

            self._index = {}
            for shard in sorted(self.folder.glob("shard-*.safetensors")):
                with safe_open(shard, "pt") as f:
                    self._index.update(dict.fromkeys(f.keys(), shard))
        return self._index

    def has(self, key: str) -> bool:
        return f"{key}|time" in self.index

    def sizes(self) -> dict[str, tuple[int, int]]:
        """Each cached image's original (height, width), from its size conditioning."""
        from safetensors import safe_open

        found = {}
        for shard in sorted(set(self.index.values())):
            with safe_open(shard, "pt") as f:
                for name in f.keys():  # noqa: SIM118 (a safetensors file, not a dict)
                    if name.endswith("|time") and "|as|" not in name:
                        height, width = f.get_tensor(name)[:2].tolist()
                        found[name.removesuffix("|time")] = (int(height), int(width))
        return found

    def get(self, key: str, flip: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, std, time_ids) of an image, as float32."""
        from safetensors import safe_open

        name = f"{key}|flip" if flip else key
        with safe_open(self.index[f"{key}|time"], "pt") as f:
            mean = f.get_tensor(f"{name}|mean").float()
            std = f.get_tensor(f"{name}|std").float()
            time_ids = f.get_tensor(f"{key}|time").float()
        return mean, std, time_ids

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers read their own index
        return {"folder": self.folder, "_index": None}


def _open(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def _size_ids(original: tuple[int, int], top: int, left: int, resolution: int) -> torch.Tensor:
    """SDXL's `time_ids`: original (height, width), crop (top, left), target size."""
    height, width = original
    return torch.tensor([height, width, top, left, resolution, resolution], dtype=torch.float32)


class PairsDataset(Dataset):
    """The pairs as a batch holds them: `pixel_values` [6, res, res] (winner's channels
    first) or, from the latent cache, `latent_mean` and `latent_std` [2, C, h, w]; the
    caption's token ids (`input_ids`, SDXL's `input_ids_2`); `time_ids` [6]. The crop and
    flip (one for the pair) and the prompt dropout are drawn from a generator seeded by
    (seed, epoch, index), as `FinetuneDataset` does, never from the global ones. A loser
    of another size than its winner is resized to it first (diffusers' SDXL script)."""

    def __init__(
        self,
        pairs: Sequence[Pair],
        read: Callable[[str], bytes],
        tokenize: Callable[[Sequence[str]], dict[str, torch.Tensor]],
        transform: TrainTransform,
        *,
        cache: LatentCache | None = None,
        prompt_dropout: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.pairs = list(pairs)
        self.read, self.tokenize, self.transform = read, tokenize, transform
        self.cache, self.prompt_dropout, self.seed = cache, prompt_dropout, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        pair = self.pairs[index]
        generator = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + self.epoch) * 1_000_003 + index
        )
        transform = self.transform
        if self.cache is not None:
            flip = bool(transform.random_flip and torch.rand(1, generator=generator) < 0.5)
            mean_w, std_w, time_ids = self.cache.get(pair.winner, flip)
            mean_l, std_l, loser_ids = self.cache.get(pair.loser, flip)
            if not torch.equal(loser_ids[:2], time_ids[:2]):  # resized to the winner's first
                mean_l, std_l, _ = self.cache.get(loser_entry(pair.loser, pair.winner), flip)
            item = {
                "latent_mean": torch.stack([mean_w, mean_l]),
                "latent_std": torch.stack([std_w, std_l]),
                "time_ids": time_ids,
            }
        else:
            winner, loser = _open(self.read(pair.winner)), _open(self.read(pair.loser))
            if loser.size != winner.size:
                loser = loser.resize(winner.size)
            original = (winner.height, winner.width)
            winner, loser = transform.resize(winner), transform.resize(loser)
            top, left, flip = transform.draw(winner.size, generator)
            pixels = [transform.apply(image, top, left, flip) for image in (winner, loser)]
            item = {
                "pixel_values": torch.cat(pixels),
                "time_ids": _size_ids(original, top, left, transform.resolution),
            }
        dropped = bool(torch.rand((), generator=generator) < self.prompt_dropout)
        ids = self.tokenize(["" if dropped else pair.caption])
        return {**item, **{name: value[0] for name, value in ids.items()}}


def collate_pairs(examples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    batch = {name: torch.stack([e[name] for e in examples]) for name in examples[0]}
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(memory_format=torch.contiguous_format)
        batch["pixel_values"] = batch["pixel_values"].float()
    return batch


def pair_latents(
    parts: DiffusionParts, batch: dict[str, torch.Tensor], *, sample: bool = True
) -> torch.Tensor:
    """The scaled latents of a batch's images, winners first ([2B, C, h, w]): encoded
    by the VAE, or drawn from the cached distributions (their mean, unless `sample`)."""
    vae = parts.vae
    if "pixel_values" in batch:
        pixels = torch.cat(batch["pixel_values"].chunk(2, dim=1))  # (B, 6, …) → (2B, 3, …)
        return encode_latents(vae, pixels.to(vae.dtype), sample=sample)
    mean = torch.cat(batch["latent_mean"].unbind(1))  # (B, 2, C, h, w) → (2B, C, h, w)
    std = torch.cat(batch["latent_std"].unbind(1))
    drawn = mean + std * torch.randn_like(std) if sample else mean
    return drawn * vae.config.scaling_factor


# A cache entry to make: its name, the image's key, the size (width, height) to resize the
# image to first (a loser to its winner's), if any.
_Entry = tuple[str, str, tuple[int, int] | None]


@devices.on_its_device
def cache_latents(
    pairs: Sequence[Pair],
    read: Callable[[str], bytes],
    *,
    sd_model: str,
    resolution: int,
    flips: bool,
    folder: Path,
    device: str = "auto",
    batch: int = 16,
    progress: bool = True,
    context: dict[str, Any] | None = None,
    cancelled: threading.Event | None = None,
) -> dict[str, int]:
    """Encode each image of `pairs` not cached in `folder` yet (`LatentCache`), `batch`
    images per VAE call, the VAE in float32; then each loser of another size than its
    winner, resized to the winner's size first (`loser_entry`), as the pixel path does.
    Returns the images, those encoded, and the losers encoded resized."""
    from diffusers import AutoencoderKL

    folder.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for p in pairs for k in (p.winner, p.loser)))
    todo: list[_Entry] = [(k, k, None) for k in keys if not LatentCache(folder).has(k)]
    vae = None

    def encode(entries: list[_Entry], what: str) -> None:
        nonlocal vae
        if not entries:
            return
        if vae is None:
            vae = AutoencoderKL.from_pretrained(sd_model, subfolder="vae", dtype=torch.float32)
            vae.to(devices.resolve_device(device)).eval()
        transform = image_transform(resolution, center_crop=True, random_flip=False)
        _encode_entries(vae, entries, read, transform, flips, batch, folder, what,
                        progress=progress, context=context, cancelled=cancelled)  # fmt: skip

    encode(todo, "latent cache")
    cache = LatentCache(folder)
    sizes = cache.sizes()
    resized: dict[str, _Entry] = {}
    for p in pairs:
        name = loser_entry(p.loser, p.winner)
        if sizes[p.loser] != sizes[p.winner] and not cache.has(name):
            height, width = sizes[p.winner]
            resized[name] = (name, p.loser, (width, height))
    encode(list(resized.values()), "latent cache (losers at their winners' size)")
    return {"images": len(keys), "encoded": len(todo), "resized_losers": len(resized)}


def _encode_entries(
    vae: Any,
    entries: list[_Entry],
    read: Callable[[str], bytes],
    transform: TrainTransform,
    flips: bool,
    batch: int,
    folder: Path,
    what: str,
    *,
    progress: bool,
    context: dict[str, Any] | None,
    cancelled: threading.Event | None,
) -> None:
    """Encode `entries` into new shards of `folder`, `SHARD_IMAGES` a shard."""
    from safetensors.torch import save_file

    shard = len(list(folder.glob("shard-*.safetensors")))
    with Progress(len(entries), what, bar=progress, context=context) as bar:
        for start in range(0, len(entries), SHARD_IMAGES):
            if cancelled is not None and cancelled.is_set():
                raise Cancelled(f"latent cache cancelled after {start} images")
            tensors = _encode_shard(vae, entries[start : start + SHARD_IMAGES], read,
                                    transform, flips, batch)  # fmt: skip
            with replacing(folder / f"shard-{shard:05d}.safetensors") as tmp:
                save_file(tensors, str(tmp))
            shard += 1
            bar.update(min(SHARD_IMAGES, len(entries) - start))


@torch.no_grad()
def _encode_shard(
    vae: Any,
    entries: Sequence[_Entry],
    read: Callable[[str], bytes],
    transform: TrainTransform,
    flips: bool,
    batch: int,
) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    device = vae.device
    for start in range(0, len(entries), batch):
        chunk = [name for name, _, _ in entries[start : start + batch]]
        pixels, times = [], []
        for _, key, size in entries[start : start + batch]:
            image = _open(read(key))
            if size is not None and image.size != size:
                image = image.resize(size)  # as `PairsDataset` resizes a loser
            original = (image.height, image.width)
            resized = transform.resize(image)
            top, left, _ = transform.draw(resized.size, torch.Generator())
            pixels.append(transform.apply(resized, top, left, False))
            times.append(_size_ids(original, top, left, transform.resolution))
        stacked = torch.stack(pixels).to(device)
        variants = {"": stacked, "|flip": stacked.flip(-1)} if flips else {"": stacked}
        for suffix, images in variants.items():
            dist = vae.encode(images).latent_dist
            for key, mean, std in zip(chunk, dist.mean, dist.std, strict=True):
                tensors[f"{key}{suffix}|mean"] = mean.half().cpu().contiguous()
                tensors[f"{key}{suffix}|std"] = std.half().cpu().contiguous()
        for key, time_ids in zip(chunk, times, strict=True):
            tensors[f"{key}|time"] = time_ids
    return tensors


# -- training ----------------------------------------------------------------------------


@dataclass
class DPOReport:
    steps: int
    resumed_from: int | None
    pairs: int  # training pairs
    heldout_pairs: int
    total_batch_size: int
    grad_accumulation: int
    processes: int
    mixed_precision: str
    beta: float
    latent_cache: bool
    loss: float | None  # mean step loss over the last (up to) 100 steps
    implicit_accuracy: float | None  # ... and the training batches' implicit accuracy
    heldout_accuracy: float | None  # implicit accuracy on the held-out pairs (0.5 = the base)
    heldout_loss: float | None  # the DPO loss on them (log 2 = the base)
    adapter: str
    identifier: str  # none: a DPO adapter needs no negative prompt
    seconds: float

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@devices.on_its_device
def train_dpo(
    pairs: Sequence[Pair],
    read: Callable[[str], bytes],
    recipe: AdaptSettings,
    *,
    sd_model: str,
    out_dir: Path,
    validation: SamplingParams,
    cache: Path | None = None,
    device: str = "auto",
    progress: bool = True,
    context: dict[str, Any] | None = None,
    cancelled: threading.Event | None = None,
) -> DPOReport:
    """Train a LoRA adapter on `sd_model`'s UNet (SD 1.x/2.x or SDXL) with Diffusion-DPO on
    the `train` side of `pairs` (images read by key with `read`, or from the latent cache
    in `cache`), resuming from the latest checkpoint in `out_dir`; then measure it on the
    `heldout` side. Raises `Cancelled` at the next batch once `cancelled` is set."""
    train = [p for p in pairs if p.side == "train"]
    heldout = [p for p in pairs if p.side == "heldout"]
    if not train:
        raise ValueError("there are no training pairs: nothing to train on")
    sdxl = pipeline_kind(sd_model)
    training = LoraTraining(recipe, sd_model, out_dir, device=device, sdxl=sdxl,
                            what="DPO training", progress=progress, context=context,
                            cancelled=cancelled)  # fmt: skip
    parts = training.parts
    latents = LatentCache(cache) if cache is not None else None
    transform = image_transform(
        recipe.resolution, center_crop=recipe.center_crop, random_flip=recipe.random_flip
    )
    dataset = PairsDataset(train, read, parts.tokenize, transform, cache=latents,
                           prompt_dropout=recipe.prompt_dropout, seed=recipe.seed)  # fmt: skip
    num_timesteps = parts.scheduler.config.num_train_timesteps

    def loss_of(batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        latents = pair_latents(parts, batch).to(training.weight_dtype)
        noise, timesteps = pair_noise(latents, num_timesteps)
        hidden, added = doubled(*parts.conditioning(batch))
        model = training.accelerator.unwrap_model(training.unet)
        loss, inside, model_mse, ref_mse = preference_terms(
            training.unet, model, parts.scheduler, latents, noise, timesteps, hidden, added,
            recipe.dpo_beta,
        )  # fmt: skip
        logged = {
            "implicit_acc": implicit_accuracy(inside),
            "model_mse": model_mse.mean(),
            "ref_mse": ref_mse.mean(),
        }
        return loss, logged

    variants: dict[str, Callable[[str], tuple[str, str | None]]] = {"neutral": lambda p: (p, None)}
    training.fit(
        dataset,
        loss_of,
        collate_fn=collate_pairs,
        on_checkpoint=lambda step: training.validate(
            validation, out_dir / VALIDATION / f"step-{step:06d}", variants
        ),
    )
    model = training.adapter_model()
    fixed = image_transform(recipe.resolution, center_crop=True, random_flip=False)
    held = PairsDataset(heldout, read, parts.tokenize, fixed, cache=latents, seed=recipe.seed)
    accuracy, heldout_loss = heldout_figures(training, model, held) if heldout else (None, None)
    info = {
        "recipe": "dpo",
        "identifier": "",
        "beta": recipe.dpo_beta,
        "rank": recipe.rank,
        "steps": training.steps,
        "usage": "pipe.load_lora_weights(folder); pipe(prompt)",
    }
    adapter = training.save_adapter(model, info)
    report = DPOReport(
        steps=training.steps,
        resumed_from=training.resumed_from,
        pairs=len(train),
        heldout_pairs=len(heldout),
        total_batch_size=training.total_batch,
        grad_accumulation=training.accumulation,
        processes=training.processes,
        mixed_precision=training.accelerator.mixed_precision,
        beta=recipe.dpo_beta,
        latent_cache=latents is not None,
        loss=training.recent_mean("loss"),
        implicit_accuracy=training.recent_mean("implicit_acc"),
        heldout_accuracy=accuracy,
        heldout_loss=heldout_loss,
        adapter=str(adapter),
        identifier="",
        seconds=training.finish(),
    )
    log.info(
        "DPO-trained %d steps on %d pairs: held-out implicit accuracy %s",
        training.steps,
        len(train),
        "n/a" if accuracy is None else f"{accuracy:.3f}",
        extra=context,
    )
    return report


@torch.no_grad()
def heldout_figures(
    training: LoraTraining, model: Any, dataset: PairsDataset
) -> tuple[float, float]:
    """The implicit accuracy and the mean DPO loss of the adapter on `dataset`'s pairs,
    with noise and timesteps fixed by the seed and the latents' means (the same draws for
    any adapter of the run: 0.5 and log 2 for the base, the reference)."""
    model.eval()
    recipe, parts, accelerator = training.recipe, training.parts, training.accelerator
    generator = torch.Generator("cpu").manual_seed(recipe.seed)
    num_timesteps = parts.scheduler.config.num_train_timesteps
    insides, losses = [], []
    with accelerator.autocast():
        for start in range(0, len(dataset), recipe.batch_size):
            items = [dataset[i] for i in range(start, min(start + recipe.batch_size, len(dataset)))]
            batch = {k: v.to(accelerator.device) for k, v in collate_pairs(items).items()}
            latents = pair_latents(parts, batch, sample=False).to(training.weight_dtype)
            noise, timesteps = pair_noise(latents, num_timesteps, generator)
            hidden, added = doubled(*parts.conditioning(batch))
            loss, inside, _, _ = preference_terms(
                model, model, parts.scheduler, latents, noise, timesteps, hidden, added,
                recipe.dpo_beta,
            )  # fmt: skip
            insides.append(inside.float().cpu())
            losses.append(loss.item() * len(items))
    inside = torch.cat(insides)
    return implicit_accuracy(inside).item(), sum(losses) / len(inside)
