"""Fixtures of the tiny Stable Diffusion pipelines and LoRA adapters (built by
`pipeline.tiny_models`), each built once per session: `tiny_sd_dir`, `tiny_sd_flagging_dir`,
`tiny_lora_dirs` (two different adapters for `tiny_sd_dir`), `tiny_sdxl_dir`, and
`tiny_sd_colours_dir`: `tiny_sd_dir` fitted to squares from blue to red (`colour_images`,
`fit_tiny_sd`: its VAE learns to reconstruct them, then its UNet to denoise their latents),
for tests whose reference model must know its data. tests/conftest.py registers this
module as a plugin, so every test can ask for them; torch and diffusers are imported only
when one is built.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.tiny_models import build_tiny_lora, build_tiny_sd, build_tiny_sdxl

RED, BLUE = (0.6, -0.5, -0.5), (-0.5, -0.5, 0.6)  # in [-1, 1]


def colour_images(generator, n: int, *, redness=None, size: int = 32):  # type: ignore[no-untyped-def]
    """`n` images in [-1, 1] ([n, 3, size, size]): squares of a colour between blue
    (redness 0) and red (1), with a little noise. `redness` (a tensor of n values) says
    which; by default each is drawn uniformly. Returns the images and their redness."""
    import torch

    if redness is None:
        redness = torch.rand(n, generator=generator)
    base = redness[:, None] * torch.tensor(RED) + (1 - redness[:, None]) * torch.tensor(BLUE)
    noise = 0.1 * torch.randn(n, 3, size, size, generator=generator)
    return (base[:, :, None, None] + noise).clamp(-1, 1), redness


def fit_tiny_sd(
    folder: Path, out: Path, *, caption: str, vae_steps: int, unet_steps: int, batch: int = 16
) -> Path:
    """The tiny pipeline in `folder` fitted to `colour_images` and saved in `out`: its VAE
    learns to reconstruct them, then its UNet to denoise their latents (captioned
    `caption`), so that it makes images like them. (Random weights make a VAE that keeps
    little of an image's colour, and a UNet whose preferences are arbitrary: a preference
    test needs a reference that knows its data.) On one CPU thread."""
    import torch
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from pipeline.adapt.lora_train import diffusion_mse

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        generator = torch.Generator().manual_seed(0)
        pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
        vae, unet = pipe.vae, pipe.unet
        optimizer = torch.optim.AdamW(vae.parameters(), lr=3e-3)
        for _ in range(vae_steps):
            images, _ = colour_images(generator, batch)
            decoded = vae.decode(vae.encode(images).latent_dist.sample()).sample
            loss = (decoded - images).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        vae.requires_grad_(False)
        ids = pipe.tokenizer([caption] * batch, padding="max_length", return_tensors="pt")
        with torch.no_grad():
            hidden = pipe.text_encoder(ids.input_ids)[0]
        scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-2)
        for _ in range(unet_steps):
            images, _ = colour_images(generator, batch)
            with torch.no_grad():
                latents = vae.encode(images).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn(latents.shape, generator=generator)
            t = torch.randint(
                0, scheduler.config.num_train_timesteps, (batch,), generator=generator
            )
            loss = diffusion_mse(unet, scheduler, latents, noise, t, hidden).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        pipe.save_pretrained(out, safe_serialization=True)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD pipeline folder without a safety checker."""
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def tiny_sd_flagging_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same pipeline with a safety checker that flags batch indices 0, 4, 8, …"""
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd_flagging"), safety_every=4)


@pytest.fixture(scope="session")
def tiny_lora_dirs(tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two different LoRA adapters for `tiny_sd_dir`."""
    root = tmp_path_factory.mktemp("tiny_lora")
    return [build_tiny_lora(tiny_sd_dir, root / f"lora{i}", seed=i + 1) for i in range(2)]


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SDXL pipeline folder."""
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"))


COLOURS_CAPTION = "a photo"


@pytest.fixture(scope="session")
def tiny_sd_colours_dir(tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_sd_dir` fitted to squares of colours from blue to red (`colour_images`),
    captioned `COLOURS_CAPTION`."""
    out = tmp_path_factory.mktemp("tiny_sd_colours")
    return fit_tiny_sd(tiny_sd_dir, out, caption=COLOURS_CAPTION, vae_steps=120, unet_steps=150)
