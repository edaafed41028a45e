"""A stand-in safety checker for the tiny pipeline (`pipeline.tiny_models.build_tiny_sd`): a
pipeline component that diffusers saves and loads by this module's path."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin


class FlagEveryNth(ModelMixin, ConfigMixin):
    """A safety checker stand-in that flags batch indices 0, n, 2n, … and blacks them out,
    returning `(images, has_nsfw_concept)` like `StableDiffusionSafetyChecker`."""

    @register_to_config
    def __init__(self, every: int = 2) -> None:
        super().__init__()
        # A parameter, so that the pipeline can move the module to a device and dtype.
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    @torch.no_grad()
    def forward(self, clip_input: torch.Tensor, images):  # type: ignore[no-untyped-def]
        flags = [i % self.config.every == 0 for i in range(len(images))]
        for i, flagged in enumerate(flags):
            if flagged:
                images[i] = images[i] * 0
        return images, flags
