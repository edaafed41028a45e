"""The Human Preference Score model: an open_clip CLIP whose image-text cosine is the score.

HPS = 100 × cos(image embedding, text embedding), both L2-normalised (the paper's scale;
the `hpsv2` package returns the raw cosine). Scores compare images of one prompt; comparing
them across prompts means little.

`HPSModel.load(spec)` takes, in this order of interpretation:

- a folder saved by `HPSModel.save` (one of our trained versions): open_clip's `local-dir`
  layout (`open_clip_config.json` with the architecture and preprocessing, weights in
  `model.safetensors`) plus our `hps.json`, so any open_clip program can load it too;
- a weights file (`.pth`, `.pt`, `.bin`, `.safetensors`) in the OpenAI CLIP format, such as
  the paper's `hpc.pth` (`{"state_dict": ...}`, `module.` prefixes from DDP tolerated): the
  architecture is read from the tensors' shapes;
- a model-config JSON file (registered with `open_clip.add_model_config`), how tests build
  tiny models;
- an open_clip architecture name (`ViT-L-14`) with an optional `pretrained` tag or file.

An optional `checkpoint` (an OpenAI-format or open_clip state dict) replaces the weights.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import open_clip
import torch
from open_clip.factory import load_state_dict
from open_clip.transform import PreprocessCfg, image_transform_v2
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as torchvision_transforms

from hps.files import replacing, sha256_file
from pipeline import devices
from pipeline.images import ImageError, ImageInput, open_image
from pipeline.model_files import (
    METADATA_FILE,
    OPEN_CLIP_CONFIG_FILE,
    SCALE,
    WEIGHTS_FILE,
    ModelSpec,
    write_json,
)

log = logging.getLogger(__name__)

RESIZE_MODES = ("longest", "shortest", "squash")
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")
# Re-exported: what a user of the scorer needs comes from this module.
__all__ = [
    "SCALE",
    "HPSModel",
    "ImageError",
    "ImageInput",
    "ModelLoadError",
    "ModelSpec",
    "open_image",
    "sha256_file",
]


class ModelLoadError(Exception):
    """The model cannot be loaded as specified; the message says why and what to do."""


def openai_model_cfg(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The open_clip config of an OpenAI-format ViT state dict, read from tensor shapes.

    Mirrors `open_clip.model.build_model_from_openai_state_dict`, which we do not call: it
    returns no config (needed to save fine-tuned versions) and rounds the weights through
    fp16. OpenAI's conventions: QuickGELU, 64-wide attention heads."""
    if "visual.proj" not in state_dict:
        raise ModelLoadError(
            "only ViT models in the OpenAI format can be loaded from a bare weights file; "
            "give the architecture name too (models.hps_arch with models.hps_checkpoint)"
        )
    vision_width = state_dict["visual.conv1.weight"].shape[0]
    patch_size = state_dict["visual.conv1.weight"].shape[-1]
    grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = state_dict["ln_final.weight"].shape[0]

    def blocks(prefix: str) -> int:
        return len({k[len(prefix) :].split(".")[0] for k in state_dict if k.startswith(prefix)})

    return {
        "embed_dim": state_dict["text_projection"].shape[1],
        "quick_gelu": True,
        "vision_cfg": {
            "image_size": patch_size * grid,
            "layers": blocks("visual.transformer.resblocks."),
            "width": vision_width,
            "patch_size": patch_size,
        },
        "text_cfg": {
            "context_length": state_dict["positional_embedding"].shape[0],
            "vocab_size": state_dict["token_embedding.weight"].shape[0],
            "width": text_width,
            "heads": text_width // 64,
            "layers": blocks("transformer.resblocks."),
        },
    }


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from any of the usual checkpoint layouts (`state_dict` key, DDP's
    `module.` prefixes, an OpenAI JIT archive), via open_clip's own reader."""
    try:
        state_dict = load_state_dict(str(path), weights_only=True)
    except Exception as exc:
        try:  # an OpenAI JIT archive (what `clip.load` downloads) is not a plain pickle
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                state_dict = torch.jit.load(str(path), map_location="cpu").state_dict()
        except Exception:
            raise ModelLoadError(f"{path} is not a readable model checkpoint ({exc})") from None
    for key in ("input_resolution", "context_length", "vocab_size"):
        state_dict.pop(key, None)
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


class _Images(Dataset):
    """Decoding and preprocessing in DataLoader workers."""

    def __init__(self, images: Sequence[ImageInput], transform: Any, max_pixels: int | None):
        self.images = images
        self.transform = transform
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        try:
            return self.transform(open_image(self.images[index], self.max_pixels))
        except ImageError as exc:
            raise ImageError(f"image {index + 1}: {exc}") from None


class _BatchPreprocess:
    """The model's preprocessing of a batch of images, in two halves: `load` (decoding and
    the PIL steps, in a background thread) and `finish` (the tensor steps, once per batch,
    on the model's device). open_clip's inference transforms are PIL steps (resize, crop or
    pad, mode), then `ToTensor` and `Normalize`, which are elementwise: doing those on the
    stacked batch gives what the per-image transform and `torch.stack` give, bit for bit.
    A transform of another shape runs whole, per image, in `load`."""

    def __init__(self, transform: Any) -> None:
        steps = list(getattr(transform, "transforms", []))
        cut = next(
            (i for i, t in enumerate(steps) if isinstance(t, torchvision_transforms.ToTensor)),
            None,
        )
        tail = steps[cut + 1 :] if cut is not None else []
        self.transform = transform
        self.split = cut is not None and all(
            isinstance(t, torchvision_transforms.Normalize) for t in tail
        )
        self.pil_steps = torchvision_transforms.Compose(steps[:cut] if self.split else [])
        self.tensor_steps = tail if self.split else []

    def load(
        self, images: Sequence[ImageInput], offset: int, max_pixels: int | None
    ) -> torch.Tensor:
        """Decoded and resized: uint8 [N, 3, H, W] (float, finished, for another transform).
        `offset` numbers the images in errors. For open_clip's transforms this is PIL and
        numpy only, no torch kernels: it runs beside the model's forward pass, which has the
        torch threads."""
        return self.prepare(decode_images(images, offset, max_pixels))

    def prepare(self, decoded: Sequence[Any]) -> torch.Tensor:
        """`load` of images decoded already (RGB PIL images): what every scorer of a
        multi-scorer pass gets from one decoding (`pipeline.scorers.score_all`)."""
        if not self.split:
            return torch.stack([self.transform(image) for image in decoded])
        arrays = np.stack([np.asarray(self.pil_steps(image)) for image in decoded])  # NHWC
        return torch.from_numpy(np.ascontiguousarray(arrays.transpose(0, 3, 1, 2)))

    def finish(self, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The tensor steps, as torchvision's `to_tensor` (float / 255) and `Normalize`."""
        if not self.split:
            return batch
        pixels = batch.to(device, non_blocking=True).to(dtype=torch.float32).div(255)
        for step in self.tensor_steps:
            pixels = step(pixels)
        return pixels


def decode_images(
    images: Sequence[ImageInput], offset: int = 0, max_pixels: int | None = None
) -> list[Any]:
    """RGB PIL images of `images`; an `ImageError` names the bad one (numbered from
    `offset` + 1)."""
    decoded = []
    for i, image in enumerate(images):
        try:
            decoded.append(open_image(image, max_pixels))
        except ImageError as exc:
            raise ImageError(f"image {offset + i + 1}: {exc}") from None
    return decoded


T = TypeVar("T")


def prefetched(batches: Iterator[Callable[[], T]]) -> Iterator[T]:
    """Run each batch's loading (`batches` yields the work) in a background thread, one
    batch ahead: decoding and resizing (which release the GIL) overlap the model's forward
    pass of the batch before. Errors surface when their batch is reached."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="hps-decode") as pool:
        pending = None
        for load in batches:
            submitted = pool.submit(load)
            if pending is not None:
                yield pending.result()
            pending = submitted
        if pending is not None:
            yield pending.result()


class HPSModel:
    """An open_clip CLIP with its tokenizer and preprocessing, scoring on the HPS scale."""

    def __init__(
        self,
        clip: torch.nn.Module,
        tokenizer: Any,
        *,
        model_cfg: dict[str, Any],
        preprocess_cfg: dict[str, Any],
        name: str,
        base: ModelSpec,
        device: str | torch.device = "cpu",
        precision: str = "auto",
    ) -> None:
        self.clip = clip
        self.tokenizer = tokenizer
        self.model_cfg = model_cfg
        self.preprocess_cfg = preprocess_cfg
        self.name = name
        self.base = base  # the untuned CLIP this one derives from (the paper's baseline)
        self.transform = image_transform_v2(PreprocessCfg(**preprocess_cfg), is_train=False)
        # Inference: float32 on the CPU, bf16 (fp16 where bf16 is missing) on a GPU.
        self.device = torch.device(devices.resolve_device(str(device)))
        self.dtype = devices.dtype(devices.precision(precision, str(self.device)))
        self.clip.to(device=self.device, dtype=self.dtype).eval()

    # ---- loading and saving ------------------------------------------------------------

    @classmethod
    def load(
        cls,
        model: str | os.PathLike,
        *,
        pretrained: str | None = None,
        checkpoint: str | os.PathLike | None = None,
        device: str = "auto",
        precision: str = "auto",
        resize_mode: str | None = None,
        name: str | None = None,
    ) -> HPSModel:
        """Load a model (see the module docstring); `resize_mode` overrides preprocessing."""
        spec = ModelSpec(str(model), pretrained, str(checkpoint) if checkpoint else None)
        path = Path(spec.model)
        if path.is_dir():
            loaded = _load_saved(path)
        elif path.is_file() and path.suffix in WEIGHT_SUFFIXES:
            loaded = _load_openai_file(path)
        else:
            loaded = _load_open_clip(spec)
        clip, model_cfg, preprocess_cfg, base, default_name = loaded
        if spec.checkpoint:
            _load_checkpoint(clip, Path(spec.checkpoint))
            base = ModelSpec(spec.model, spec.pretrained)
        if resize_mode is not None:
            preprocess_cfg = _with_resize_mode(preprocess_cfg, resize_mode)
        model = cls(
            clip,
            _tokenizer(model_cfg),
            model_cfg=model_cfg,
            preprocess_cfg=preprocess_cfg,
            name=name or default_name or spec.describe(),
            base=base,
            device=device,
            precision=precision,
        )
        log.info("loaded HPS model %s on %s (%s)", model.name, model.device, model.dtype)
        return model

    def set_resize_mode(self, resize_mode: str) -> None:
        """Change how images are fitted to the model's size (see `RESIZE_MODES`): training
        evaluates its base as the base serves, then trains (and saves) with the recipe's."""
        self.preprocess_cfg = _with_resize_mode(self.preprocess_cfg, resize_mode)
        self.transform = image_transform_v2(PreprocessCfg(**self.preprocess_cfg), is_train=False)

    def save(self, directory: str | os.PathLike, metadata: dict[str, Any] | None = None) -> str:
        """Write this model as a version folder (atomically: a new folder appears whole, and
        an existing one is never changed) and return the sha256 of its weights."""
        target = Path(directory)
        if target.exists():
            raise FileExistsError(f"{target} exists")
        with replacing(target, folder=True) as tmp:
            state = {
                k: v.detach().float().cpu().contiguous() for k, v in self.clip.state_dict().items()
            }
            save_file(state, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
            config = {"model_cfg": self.model_cfg, "preprocess_cfg": self.preprocess_cfg}
            write_json(tmp / OPEN_CLIP_CONFIG_FILE, config)
            digest = sha256_file(tmp / WEIGHTS_FILE)
            meta = {
                "format": "hps-classifier/1",
                "scale": "hps: 100 × cosine(image, text), L2-normalised embeddings",
                "name": self.name,
                "base": self.base.as_dict(),
                "weights_sha256": digest,
                "saved_at": datetime.now(UTC).isoformat(),
                **(metadata or {}),
            }
            write_json(tmp / METADATA_FILE, meta)
        return digest

    # ---- scoring -----------------------------------------------------------------------

    @torch.inference_mode()
    def encode_text(self, prompts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """L2-normalised text embeddings (float32) of `prompts`."""
        chunks = []
        for start in range(0, len(prompts), batch_size):
            tokens = self.tokenizer(list(prompts[start : start + batch_size])).to(self.device)
            chunks.append(self.clip.encode_text(tokens).float())
        return torch.nn.functional.normalize(torch.cat(chunks), dim=-1)

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings (float32) of preprocessed pixels [N, 3, H, W]."""
        pixels = pixels.to(self.device, self.dtype, non_blocking=True)
        return torch.nn.functional.normalize(self.clip.encode_image(pixels).float(), dim=-1)

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        return self.transform(open_image(image))

    def score(
        self, prompts: str | Sequence[str], images: Sequence[ImageInput], **options: Any
    ) -> list[float]:
        """HPS of each image for its prompt: one prompt for all images, or one per image.
        Each distinct prompt is encoded once. Raises `ImageError` naming a bad image.
        `options`: those of `iter_scores` (batch_size, num_workers, max_pixels)."""
        return [s for batch in self.iter_scores(prompts, images, **options) for s in batch]

    def iter_scores(
        self,
        prompts: str | Sequence[str],
        images: Sequence[ImageInput],
        *,
        batch_size: int = 32,
        num_workers: int = 0,
        max_pixels: int | None = None,
    ) -> Iterator[list[float]]:
        """`score`, one batch at a time. Decoding runs ahead of the model: in `num_workers`
        DataLoader processes, or with none in a thread, one batch ahead."""
        per_image = per_image_prompts(prompts, len(images))
        if not per_image:
            return
        text, index = self._prompt_table(per_image)
        start = 0
        for pixels in self._pixel_batches(images, batch_size, num_workers, max_pixels):
            rows = index[start : start + len(pixels)]
            yield self._cosine(self.encode_pixels(pixels), text[rows])
            start += len(pixels)

    def _pixel_batches(
        self,
        images: Sequence[ImageInput],
        batch_size: int,
        num_workers: int,
        max_pixels: int | None,
    ) -> Iterator[torch.Tensor]:
        if num_workers > 0:
            yield from DataLoader(
                _Images(images, self.transform, max_pixels),
                batch_size=batch_size,
                num_workers=num_workers,
                pin_memory=self.device.type == "cuda",
                persistent_workers=False,
            )
            return
        preprocess = _BatchPreprocess(self.transform)

        def load(start: int) -> torch.Tensor:
            # Indexing may read the image too (an image-store reader): in the thread as well.
            chunk = [images[i] for i in range(start, min(start + batch_size, len(images)))]
            return preprocess.load(chunk, start, max_pixels)

        def work() -> Iterator[Callable[[], torch.Tensor]]:
            for start in range(0, len(images), batch_size):
                yield lambda start=start: load(start)

        for batch in prefetched(work()):
            yield preprocess.finish(batch, self.device)

    def score_pixels(self, prompts: str | Sequence[str], pixels: torch.Tensor) -> list[float]:
        """HPS of preprocessed pixels [N, 3, H, W] (already resized and normalised)."""
        text, index = self._prompt_table(per_image_prompts(prompts, len(pixels)))
        return self._cosine(self.encode_pixels(pixels), text[index])

    def _prompt_table(self, per_image: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        unique = list(dict.fromkeys(per_image))
        position = {p: i for i, p in enumerate(unique)}
        index = torch.tensor([position[p] for p in per_image], dtype=torch.long)
        return self.encode_text(unique), index.to(self.device)

    @staticmethod
    def _cosine(image: torch.Tensor, text: torch.Tensor) -> list[float]:
        return (100.0 * (image * text).sum(dim=-1)).tolist()


def per_image_prompts(prompts: str | Sequence[str], n: int) -> list[str]:
    """One prompt per image, from one prompt for all or one per image."""
    if isinstance(prompts, str):
        return [prompts] * n
    per_image = list(prompts)
    if len(per_image) != n:
        raise ValueError(f"{len(per_image)} prompts for {n} images: give one, or one per image")
    return per_image


# ---- the loading paths ---------------------------------------------------------------

_Loaded = tuple[torch.nn.Module, dict[str, Any], dict[str, Any], ModelSpec, str | None]


def _load_saved(path: Path) -> _Loaded:
    config_file = path / OPEN_CLIP_CONFIG_FILE
    if not config_file.is_file():
        raise ModelLoadError(f"{path} is not a saved model folder (no {OPEN_CLIP_CONFIG_FILE})")
    config = json.loads(config_file.read_text())
    meta_file = path / METADATA_FILE
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    try:
        clip = open_clip.create_model(f"local-dir:{path.resolve()}")
    except (OSError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the model saved in {path}: {exc}") from None
    base = ModelSpec(**meta["base"]) if "base" in meta else ModelSpec(str(path))
    return clip, config["model_cfg"], _preprocess_cfg(clip), base, meta.get("name")


def _load_openai_file(path: Path) -> _Loaded:
    state_dict = _read_state_dict(path)
    model_cfg = openai_model_cfg(state_dict)
    clip = open_clip.CLIP(**model_cfg)
    try:
        clip.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise ModelLoadError(f"{path} does not hold a complete CLIP model: {exc}") from None
    preprocess_cfg = _preprocess_cfg(clip)
    # The paper's reference inference used CLIP's own preprocessing (resize + centre crop).
    preprocess_cfg["resize_mode"] = "shortest"
    return clip, model_cfg, preprocess_cfg, ModelSpec(str(path)), path.stem


_ADDED_CONFIGS: set[Path] = set()


def _load_open_clip(spec: ModelSpec) -> _Loaded:
    arch = spec.model
    if arch.endswith(".json"):
        config_path = Path(arch).resolve()
        if not config_path.is_file():
            raise ModelLoadError(f"no model config file {config_path}")
        if config_path not in _ADDED_CONFIGS:  # each addition rescans every config path
            open_clip.add_model_config(config_path)
            _ADDED_CONFIGS.add(config_path)
        arch = config_path.stem
    model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        raise ModelLoadError(
            f"unknown model {spec.model!r}: not a saved model folder, a weights file, a "
            "model-config JSON file or an open_clip architecture (see open_clip.list_models())"
        )
    # With a checkpoint the pretrained weights would be replaced at once: skip them.
    pretrained = None if spec.checkpoint else spec.pretrained
    tag_cfg = open_clip.get_pretrained_cfg(arch, spec.pretrained) if spec.pretrained else {}
    # OpenAI's weights need QuickGELU; open_clip's plain `ViT-L-14` config does not set it.
    quick_gelu = bool(tag_cfg.get("quick_gelu")) or bool(model_cfg.get("quick_gelu"))
    model_cfg["quick_gelu"] = quick_gelu
    try:
        clip = open_clip.create_model(arch, pretrained=pretrained, force_quick_gelu=quick_gelu)
    except RuntimeError as exc:
        if pretrained and tag_cfg:
            raise ModelLoadError(
                f"the {pretrained!r} weights of {arch} are not in the local cache and could not "
                "be downloaded (is this machine offline?). Copy the weights file here and set "
                "models.hps_pretrained (HPS_MODELS__HPS_PRETRAINED) to its path, or give a "
                "saved model folder or checkpoint instead."
            ) from None
        if pretrained:
            raise ModelLoadError(
                f"pretrained weights {pretrained!r} for {arch}: not a known tag and no such "
                f"file (tags: {', '.join(open_clip.list_pretrained_tags_by_model(arch)) or 'none'})"
            ) from None
        raise ModelLoadError(f"cannot build {arch}: {exc}") from None
    return clip, model_cfg, _preprocess_cfg(clip), spec, None


def _load_checkpoint(clip: torch.nn.Module, path: Path) -> None:
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {path} does not exist")
    state_dict = _read_state_dict(path)
    try:
        clip.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise ModelLoadError(f"checkpoint {path} does not fit the architecture: {exc}") from None


def _with_resize_mode(preprocess_cfg: dict[str, Any], resize_mode: str) -> dict[str, Any]:
    if resize_mode not in RESIZE_MODES:
        raise ModelLoadError(f"resize mode must be one of {', '.join(RESIZE_MODES)}")
    return {**preprocess_cfg, "resize_mode": resize_mode}


def _preprocess_cfg(clip: torch.nn.Module) -> dict[str, Any]:
    """open_clip's preprocessing of this model (its defaults where it set none)."""
    cfg = {**asdict(PreprocessCfg()), **open_clip.get_model_preprocess_cfg(clip)}
    cfg["size"] = clip.visual.image_size
    return cfg


def _tokenizer(model_cfg: dict[str, Any]) -> Any:
    text_cfg = model_cfg.get("text_cfg", {})
    if text_cfg.get("hf_tokenizer_name"):
        raise ModelLoadError("models with a Hugging Face text tower are not supported")
    # open_clip's bundled BPE vocabulary: no download.
    return open_clip.SimpleTokenizer(context_length=text_cfg.get("context_length", 77))
