"""A tiny Stable Diffusion pipeline and LoRA adapters, built offline for tests.

The components follow diffusers' own tests (a 2-block UNet, a 2-block VAE, a 2-layer CLIP
text encoder) with the real CLIP BPE vocabulary taken from open_clip's bundled file, so
prompts tokenize as in production. Everything is saved with `save_pretrained` /
`save_lora_weights` and loaded back by the code under test through `from_pretrained` /
`load_lora_weights`, like a downloaded model.

`tests.tiny_safety.FlagEveryNth` stands in for the safety checker (the real one needs CLIP
weights we cannot download) through the same pipeline code path.

`build_tiny_sdxl` builds an SDXL pipeline the same way (two text encoders, the second with
a projection, and a UNet with SDXL's added text and size conditioning). `fit_tiny_sd` fits
a tiny pipeline to a distribution of images (its VAE to reconstruct them, then its UNet to
denoise their latents), for tests whose reference model must know its data.

(These builders may move to pipeline/tiny_models.py; the SDXL and fitting ones sit here,
beside the SD one, until then.)

Fixtures (session-scoped, each built once): `tiny_sd_dir`, `tiny_sd_flagging_dir`,
`tiny_lora_dirs` (two different adapters for `tiny_sd_dir`), `tiny_sdxl_dir`,
`tiny_sd_colours_dir` (`tiny_sd_dir` fitted to squares from blue to red, `colour_images`).
tests/conftest.py registers this module as a plugin, so every test can ask for them; torch
and diffusers are imported only when one is built.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

import pytest

SIZE = 64  # pixels (the default image size); the VAE halves once, so latents are 32×32
CROSS_DIM = 8


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-character map."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def write_clip_tokenizer_files(folder: Path) -> Path:
    """vocab.json + merges.txt of CLIP's tokenizer, from open_clip's bundled BPE merges
    (the same construction as open_clip's SimpleTokenizer: 49,408 tokens)."""
    import open_clip

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(bpe.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(merge) for merge in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    )
    return folder


def build_tiny_sd(folder: Path, *, seed: int = 0, safety_every: int | None = None) -> Path:
    """Build a tiny SD 1.x pipeline from configs and save it in the diffusers layout."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from tests.tiny_safety import FlagEveryNth

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=SIZE // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=CROSS_DIM,
        norm_num_groups=2,
        attention_head_dim=2,
    )
    vae = AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=2,
        sample_size=SIZE,
    )
    with tempfile.TemporaryDirectory() as bpe:
        tokenizer = CLIPTokenizer.from_pretrained(
            write_clip_tokenizer_files(Path(bpe)), model_max_length=77
        )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            hidden_size=CROSS_DIM,
            intermediate_size=16,
            layer_norm_eps=1e-05,
            num_attention_heads=2,
            num_hidden_layers=2,
            pad_token_id=tokenizer.pad_token_id,
            vocab_size=len(tokenizer),
            max_position_embeddings=tokenizer.model_max_length,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    safety = FlagEveryNth(every=safety_every) if safety_every else None
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=safety,
        feature_extractor=CLIPImageProcessor(crop_size=SIZE, size=SIZE) if safety else None,
        requires_safety_checker=safety is not None,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def _text_config(tokenizer, **extra):  # type: ignore[no-untyped-def]
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        hidden_size=CROSS_DIM,
        intermediate_size=16,
        layer_norm_eps=1e-05,
        num_attention_heads=2,
        num_hidden_layers=2,
        pad_token_id=tokenizer.pad_token_id,
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        **extra,
    )


TIME_EMBED_DIM = 4  # SDXL's addition_time_embed_dim, tiny


def build_tiny_sdxl(folder: Path, *, seed: int = 0) -> Path:
    """Build a tiny SDXL pipeline from configs (diffusers' SDXL tests, smaller) and save it
    in the diffusers layout: two text encoders (the second with a projection, whose output
    is the pooled embedding) whose hidden states side by side are the cross-attention
    input, and a UNet with SDXL's added conditioning (`addition_embed_type="text_time"`:
    the pooled embedding and the six size ids)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=SIZE // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * CROSS_DIM,
        norm_num_groups=2,
        attention_head_dim=2,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + CROSS_DIM,
    )
    vae = AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=2,
        sample_size=SIZE,
    )
    with tempfile.TemporaryDirectory() as bpe:
        tokenizer = CLIPTokenizer.from_pretrained(
            write_clip_tokenizer_files(Path(bpe)), model_max_length=77
        )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(_text_config(tokenizer)),
        text_encoder_2=CLIPTextModelWithProjection(
            _text_config(tokenizer, projection_dim=CROSS_DIM)
        ),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            timestep_spacing="leading",
        ),
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


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


def build_tiny_lora(sd_folder: Path, out: Path, *, seed: int, rank: int = 2) -> Path:
    """A LoRA adapter on the tiny UNet's attention, saved in the diffusers format.

    peft initialises LoRA's B matrices to zero (a no-op adapter); they are randomised here
    so that the adapter visibly changes the images."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(sd_folder, subfolder="unet")
    unet.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=rank,
            init_lora_weights="gaussian",
            target_modules=["to_k", "to_q", "to_v", "to_out.0"],
        )
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    StableDiffusionPipeline.save_lora_weights(
        out,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        safe_serialization=True,
    )
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
