"""Tiny models built offline from configs: a Stable Diffusion pipeline, LoRA adapters and
an open_clip CLIP, saved and loaded through the same code paths as downloaded models.

The tests, the benchmarks and `hps demo` use them: nothing here is trained, so the images
are noise-like and the scores random. They exist to exercise the real loading, generation,
scoring and training code on a CPU in seconds.

- `build_tiny_sd`: a tiny SD 1.x pipeline in the diffusers layout (the components follow
  diffusers' own tests: a 2-block UNet, a 2-block VAE, a 2-layer CLIP text encoder) with the
  real CLIP BPE vocabulary taken from open_clip's bundled file, so prompts tokenize as in
  production; optionally with `pipeline.tiny_safety.FlagEveryNth` as its safety checker.
- `build_tiny_sdxl`: a tiny SDXL pipeline the same way (two text encoders, the second with
  a projection, and a UNet with SDXL's added text and size conditioning).
- `build_tiny_lora`: a LoRA adapter for it, in the diffusers format.
- `build_tiny_safety_checker`: a tiny `StableDiffusionSafetyChecker` folder (the standalone
  checker of `pipeline.safety`) that flags every image or none.
- `tiny_clip`, `tiny_weights`, `tiny_openai_checkpoint`: a tiny open_clip model (OpenAI
  conventions: 64-wide heads, QuickGELU), as a model config + weights, or saved as the
  paper's `hpc.pth` is.

torch, diffusers and open_clip are imported inside the functions.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

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
        StableDiffusionPipeline,
    )
    from transformers import CLIPImageProcessor, CLIPTextModel

    from pipeline.tiny_safety import FlagEveryNth

    torch.manual_seed(seed)
    unet = _unet(cross_attention_dim=CROSS_DIM)
    vae = _vae()
    tokenizer = _tokenizer()
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    scheduler = sd_scheduler()
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


def _unet(**extra):  # type: ignore[no-untyped-def]
    """The tiny UNet both tiny pipelines share (64 px images, 32×32 latents)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=SIZE // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=2,
        attention_head_dim=2,
        **extra,
    )


def _vae():  # type: ignore[no-untyped-def]
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=2,
        sample_size=SIZE,
    )


def _tokenizer():  # type: ignore[no-untyped-def]
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as bpe:
        return CLIPTokenizer.from_pretrained(
            write_clip_tokenizer_files(Path(bpe)), model_max_length=77
        )


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


def sd_scheduler() -> DDIMScheduler:
    """A DDIM scheduler with SD 1.x's noise schedule (its scheduler_config.json's betas)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def sdxl_scheduler() -> EulerDiscreteScheduler:
    """SDXL base 1.0's scheduler (its scheduler_config.json)."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )


def build_tiny_sdxl(folder: Path, *, seed: int = 0) -> Path:
    """Build a tiny SDXL pipeline from configs (diffusers' SDXL tests, smaller) and save it
    in the diffusers layout: two text encoders (the second with a projection, whose output
    is the pooled embedding) whose hidden states side by side are the cross-attention
    input, and a UNet with SDXL's added conditioning (`addition_embed_type="text_time"`:
    the pooled embedding and the six size ids)."""
    import torch
    from diffusers import (
        StableDiffusionXLPipeline,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = _unet(
        cross_attention_dim=2 * CROSS_DIM,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + CROSS_DIM,
    )
    vae = _vae()
    tokenizer = _tokenizer()
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(_text_config(tokenizer)),
        text_encoder_2=CLIPTextModelWithProjection(
            _text_config(tokenizer, projection_dim=CROSS_DIM)
        ),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=sdxl_scheduler(),
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


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


# -- a tiny open_clip CLIP -------------------------------------------------------------

TINY_NAME = "hps-tiny-clip"
TINY_CONFIG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2},
}


def tiny_config(directory: Path) -> Path:
    """The tiny model's config file (its stem is the architecture name)."""
    path = Path(directory) / f"{TINY_NAME}.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return path


def tiny_clip(directory: Path, seed: int = 0) -> tuple[torch.nn.Module, Path]:
    """A randomly initialised tiny CLIP (seeded) and its config file."""
    import open_clip
    import torch

    config = tiny_config(directory)
    open_clip.add_model_config(config)
    torch.manual_seed(seed)
    return open_clip.create_model(TINY_NAME, pretrained=None), config


def tiny_weights(directory: Path, seed: int = 0) -> tuple[Path, Path]:
    """(config file, weights file in open_clip's format) of a seeded tiny CLIP."""
    import torch

    model, config = tiny_clip(directory, seed)
    weights = Path(directory) / "tiny-weights.pt"
    torch.save(model.state_dict(), weights)
    return config, weights


def tiny_openai_checkpoint(directory: Path, seed: int = 0) -> Path:
    """A tiny model saved as the paper's `hpc.pth` is: `{"state_dict": ...}` in the OpenAI
    CLIP format, with the `module.` prefixes of a DDP-wrapped model."""
    import torch

    model, _ = tiny_clip(directory, seed)
    path = Path(directory) / "hpc.pth"
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 1}, path)
    return path


# -- a tiny standalone safety checker --------------------------------------------------


def build_tiny_safety_checker(folder: Path, *, flag_all: bool) -> Path:
    """A tiny `StableDiffusionSafetyChecker` (and its preprocessor) saved like
    CompVis/stable-diffusion-safety-checker, whose thresholds flag every image
    (`flag_all`) or none: cosine similarities lie in [-1, 1]."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import (
        StableDiffusionSafetyChecker,
    )
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={
            "hidden_size": 8,
            "intermediate_size": 16,
            "num_attention_heads": 2,
            "num_hidden_layers": 1,
        },
        vision_config={
            "hidden_size": 8,
            "intermediate_size": 16,
            "num_attention_heads": 2,
            "num_hidden_layers": 1,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=8,
    )
    checker = StableDiffusionSafetyChecker(config)
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-2.0 if flag_all else 2.0)
        checker.special_care_embeds_weights.fill_(2.0)
    checker.save_pretrained(folder, safe_serialization=True)
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(folder)
    return folder
