"""A safety checker for text-to-image models that ship none (SD 2.x, SDXL, fine-tunes).

It is the checker SD 1.x ships, `StableDiffusionSafetyChecker`: CLIP ViT-L/14 image
embeddings compared with 17 concept embeddings (and 3 "special care" ones) against
thresholds stored with its weights, loaded from `generation.safety_checker_model` (by default
`CompVis/stable-diffusion-safety-checker`, about 1.2 GB, ungated; or a local folder with
its `config.json`, weights and `preprocessor_config.json`). Run on any model's images it
flags what it would flag on SD 1.x's; it was tuned on SD 1.x's outputs, so its misses and
false alarms on other models are not measured here. A model that ships its own checker
(SD 1.x) keeps using that one, inside the pipeline call.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)


class SafetyCheckerUnavailable(RuntimeError):
    """The configured checker could not be loaded (offline, wrong folder)."""


class SafetyChecker:
    def __init__(self, source: str, *, device: str, dtype: torch.dtype) -> None:
        from diffusers.pipelines.stable_diffusion.safety_checker import (
            StableDiffusionSafetyChecker,
        )
        from transformers import CLIPImageProcessor

        try:
            model = StableDiffusionSafetyChecker.from_pretrained(source, torch_dtype=dtype)
            self.processor: Any = CLIPImageProcessor.from_pretrained(source)
        except (OSError, ValueError) as exc:
            raise SafetyCheckerUnavailable(
                f"the safety checker {source} did not load ({exc}): point "
                "generation.safety_checker_model (HPS_GENERATION__SAFETY_CHECKER_MODEL) at a "
                "local copy of CompVis/stable-diffusion-safety-checker"
            ) from exc
        self.model = model.to(device).eval()
        self.device = device
        self.dtype = dtype
        self.source = source
        log.info("loaded the standalone safety checker %s on %s", source, device)

    @torch.inference_mode()
    def check(self, images: list[Image.Image]) -> tuple[list[Image.Image], list[bool]]:
        """The images (flagged ones blacked out, as the pipeline's own checker does) and
        whether each was flagged."""
        clip_input = self.processor(images, return_tensors="pt").pixel_values
        arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) / 255 for image in images]
        checked, flags = self.model(
            images=arrays, clip_input=clip_input.to(self.device, self.dtype)
        )
        out = [
            Image.fromarray((np.asarray(a) * 255).round().astype(np.uint8)) if flagged else image
            for image, a, flagged in zip(images, checked, flags, strict=True)
        ]
        return out, [bool(f) for f in flags]
