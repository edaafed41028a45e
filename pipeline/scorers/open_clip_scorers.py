"""The scorers built on open_clip: HPS v1 (ours), HPS v2 / v2.1 and the LAION aesthetic
predictor v2 (an MLP on OpenAI CLIP ViT-L/14 image embeddings)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image
from torchvision.transforms import Compose, InterpolationMode, Normalize, ToTensor
from torchvision.transforms import functional as F

from pipeline.hps_model import HPSModel, ModelLoadError, _BatchPreprocess
from pipeline.scorers.weights import weights_file

HPS_SCALE = "hps: 100 × cosine(image, text) of L2-normalised embeddings"
HPSV2_SCALE = "hpsv2: cosine(image, text), raw as the hpsv2 package reports it (×100: HPS v1's)"
AESTHETIC_SCALE = "aesthetic: the predicted mean rating (1–10, AVA's scale); reads no prompt"


class CLIPCosineScorer:
    """An `HPSModel` as a `Scorer`: `factor` × cosine of its normalised embeddings."""

    def __init__(
        self, model: HPSModel, *, name: str, label: str, scale: str, factor: float
    ) -> None:
        self.model, self.name, self.label, self.scale = model, name, label, scale
        self.factor = factor
        self.preprocess = _BatchPreprocess(model.transform)

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.model.encode_text(prompts)

    def prepare(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.preprocess.prepare(images)

    def score_prepared(self, text: torch.Tensor | None, prepared: Any) -> list[float]:
        assert text is not None
        pixels = self.preprocess.finish(prepared, self.model.device)
        image = self.model.encode_pixels(pixels)
        return (self.factor * (image * text).sum(dim=-1)).tolist()


def hps_scorer(model: HPSModel) -> CLIPCosineScorer:
    """HPS v1: one of our classifiers (or the paper's hpc.pth), on the paper's ×100 scale."""
    return CLIPCosineScorer(model, name="hps", label=model.name, scale=HPS_SCALE, factor=100.0)


# ---- HPS v2 ----------------------------------------------------------------------------


class ResizeLongestAndPad:
    """hpsv2's `ResizeMaxSize` (hpsv2/src/open_clip/transform.py), on a tensor: resize so
    the longest side is `size` (bicubic, torchvision's tensor resize), then zero-pad to a
    square, centred. hpsv2 skips both when the longest side is already `size`, which leaves a
    non-square image unpadded (its model then fails on it); such an image is padded here.

    Without antialiasing: HPS v2 was trained and benchmarked with torchvision < 0.17, whose
    tensor resize did not antialias (`antialias=None` meant False for tensors); 0.17 made
    True the default, which blurs a downscaled image and shifts the scores."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[1:]
        scale = self.size / float(max(height, width))
        if scale == 1.0 and height == width:
            return image
        new_size = [round(dim * scale) for dim in (height, width)]
        if scale != 1.0:
            image = F.resize(image, new_size, InterpolationMode.BICUBIC, antialias=False)
        pad_h, pad_w = self.size - new_size[0], self.size - new_size[1]
        return F.pad(image, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], 0)


def _rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


def hpsv2_transform(size: int) -> Compose:
    """hpsv2's inference preprocessing (`image_transform(..., is_train=False,
    resize_longest_max=True)` with ViT-H-14's OpenAI mean and std): to a tensor first, then
    resize the longest side and zero-pad, then normalise."""
    return Compose(
        [
            _rgb,  # a module-level function: DataLoader workers pickle the transform
            ToTensor(),
            ResizeLongestAndPad(size),
            Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD),
        ]
    )


def load_hpsv2(
    arch: str, checkpoint: str, *, device: str, precision: str = "auto"
) -> CLIPCosineScorer:
    """HPS v2 / v2.1: open_clip `arch` (ViT-H-14) with the released checkpoint's
    `{"state_dict": ...}` over it (no pretrained download: the checkpoint replaces every
    weight), preprocessed and scored as `hpsv2.img_score.score` does."""
    path = weights_file(checkpoint, "scorers.hpsv2_checkpoint")
    name = "HPS v2.1" if "v2.1" in path.name else "HPS v2"
    model = HPSModel.load(
        arch, checkpoint=path, device=device, precision=precision, name=f"{name} ({checkpoint})"
    )
    size = model.preprocess_cfg["size"]
    model.transform = hpsv2_transform(int(size[0] if isinstance(size, (list, tuple)) else size))
    return CLIPCosineScorer(model, name="hpsv2", label=model.name, scale=HPSV2_SCALE, factor=1.0)


# ---- LAION aesthetic predictor v2 ------------------------------------------------------

# improved-aesthetic-predictor's MLP (train_predictor.py, simple_inference.py): Linear,
# Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear inside `layers` (the ReLUs are
# commented out there), saved as the module's `state_dict()`.
AESTHETIC_LINEARS = (0, 2, 4, 6, 7)
AESTHETIC_DROPOUTS = {1: 0.2, 3: 0.2, 5: 0.1}


class AestheticMLP(torch.nn.Module):
    """The predictor's module: its `layers`, as the released state dict names them."""

    def __init__(self, layers: torch.nn.Sequential) -> None:
        super().__init__()
        self.layers = layers

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.layers(embedding)


def aesthetic_mlp(state_dict: dict[str, torch.Tensor], source: str) -> AestheticMLP:
    """The predictor's MLP with `state_dict` loaded (its dimensions read from the shapes:
    768 → 1024 → 128 → 64 → 16 → 1 in the released file)."""
    expected = {f"layers.{i}.{p}" for i in AESTHETIC_LINEARS for p in ("weight", "bias")}
    if set(state_dict) != expected:
        raise ModelLoadError(
            f"{source} is not the aesthetic predictor's MLP: expected the keys "
            f"{', '.join(sorted(expected))}; found {', '.join(sorted(state_dict)[:12])}"
        )
    modules: list[torch.nn.Module] = []
    for i in range(max(AESTHETIC_LINEARS) + 1):
        if i in AESTHETIC_LINEARS:
            out_features, in_features = state_dict[f"layers.{i}.weight"].shape
            modules.append(torch.nn.Linear(in_features, out_features))
        else:
            modules.append(torch.nn.Dropout(AESTHETIC_DROPOUTS[i]))
    mlp = AestheticMLP(torch.nn.Sequential(*modules))
    mlp.load_state_dict(state_dict)
    return mlp.eval()


class AestheticScorer:
    """The predictor on the L2-normalised image embedding of its CLIP (fp32 MLP)."""

    name = "aesthetic"
    scale = AESTHETIC_SCALE

    def __init__(self, clip: HPSModel, mlp: AestheticMLP, label: str) -> None:
        self.clip, self.label = clip, label
        self.mlp = mlp.to(clip.device, torch.float32).eval()
        self.preprocess = _BatchPreprocess(clip.transform)

    def encode_prompts(self, prompts: Sequence[str]) -> None:
        return None

    def prepare(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.preprocess.prepare(images)

    @torch.inference_mode()
    def score_prepared(self, text: torch.Tensor | None, prepared: Any) -> list[float]:
        embedding = self.clip.encode_pixels(self.preprocess.finish(prepared, self.clip.device))
        return self.mlp(embedding).squeeze(-1).tolist()


def load_aesthetic(
    checkpoint: str, clip: str, pretrained: str | None, *, device: str, precision: str = "auto"
) -> AestheticScorer:
    """The released `.pth` (the MLP's state dict) over CLIP `clip` with `pretrained`
    weights (OpenAI's ViT-L/14, preprocessed as `clip.load` does: resize, centre crop)."""
    path = weights_file(checkpoint, "scorers.aesthetic_checkpoint")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"{path} is not a readable checkpoint ({exc})") from None
    if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    mlp = aesthetic_mlp(state_dict, str(path))
    model = HPSModel.load(clip, pretrained=pretrained, device=device, precision=precision)
    width = int(model.model_cfg["embed_dim"])
    if mlp.layers[0].in_features != width:
        wanted = mlp.layers[0].in_features
        raise ModelLoadError(
            f"the aesthetic predictor {path} reads {wanted}-wide embeddings, but "
            f"{model.name} makes {width}-wide ones: set scorers.aesthetic_clip to the CLIP it "
            "was trained on (ViT-L-14 with OpenAI's weights)"
        )
    return AestheticScorer(model, mlp, f"LAION aesthetic v2 ({checkpoint} on {model.name})")
