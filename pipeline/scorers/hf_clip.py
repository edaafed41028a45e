"""The scorers built on transformers' `CLIPModel`: PickScore and CLIP score."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from pipeline import devices
from pipeline.scorers.weights import pretrained

PICKSCORE_SCALE = (
    "pickscore: logit_scale.exp() × cosine(image, text) (≈ 100 × cosine); PickScore's "
    "probabilities are the softmax of these over one prompt's images"
)
CLIP_SCORE_SCALE = "clip: 100 × max(cosine(image, text), 0), torchmetrics' CLIP score"


def _features(output: Any) -> torch.Tensor:
    """`get_*_features`' embedding: a tensor in transformers 4, the output's `pooler_output`
    (the projected embedding) in transformers 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class HFCLIPScorer:
    """A transformers CLIP model and its processor, on the configured device and precision."""

    name: str
    scale: str

    def __init__(self, model: Any, processor: Any, *, label: str, device: str, precision: str):
        self.device = torch.device(devices.resolve_device(device))
        self.dtype = devices.dtype(devices.precision(precision, str(self.device)))
        # Before the cast: exp of a bf16-rounded logit_scale would scale every PickScore
        # (ln 100 ≈ 4.605 in bf16 is 4.594: ×98.9, not ×100).
        self.logit_scale = model.logit_scale.detach().float().exp().to(self.device)
        self.model = model.to(self.device, self.dtype).eval()
        self.processor, self.label = processor, label

    @torch.inference_mode()
    def image_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.device, self.dtype)
        embedding = _features(self.model.get_image_features(pixel_values=pixels)).float()
        return embedding / torch.norm(embedding, dim=-1, keepdim=True)

    @torch.inference_mode()
    def text_embeddings(self, inputs: Any) -> torch.Tensor:
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        embedding = _features(self.model.get_text_features(**inputs)).float()
        return embedding / torch.norm(embedding, dim=-1, keepdim=True)

    def prepare(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.processor(images=list(images), return_tensors="pt")["pixel_values"]


class PickScoreScorer(HFCLIPScorer):
    """PickScore as its README's `calc_probs` computes it: the processor's text inputs
    (padded, truncated to 77 tokens) and images, normalised embeddings, and
    `logit_scale.exp() * text @ image`, the scale in float32 whatever the model computes in.
    The score is that logit; `probabilities` gives the README's softmax over one prompt's
    images (the same order)."""

    name = "pickscore"
    scale = PICKSCORE_SCALE

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        inputs = self.processor(
            text=list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt"
        )
        return self.text_embeddings(inputs)

    @torch.inference_mode()
    def score_prepared(self, text: torch.Tensor | None, prepared: Any) -> list[float]:
        assert text is not None
        cosine = (self.image_embeddings(prepared) * text).sum(dim=-1)
        return (self.logit_scale * cosine).tolist()

    @staticmethod
    def probabilities(scores: Sequence[float]) -> list[float]:
        """The README's probabilities of one prompt's images from their scores."""
        return torch.softmax(torch.tensor(scores, dtype=torch.float64), dim=-1).tolist()


class CLIPScoreScorer(HFCLIPScorer):
    """torchmetrics' `clip_score` (functional/multimodal/clip_score.py) of each image with
    its prompt: the processor's text (padded, then cut to the model's positions, as
    torchmetrics cuts it) and images, and 100 × max(cosine, 0)."""

    name = "clip"
    scale = CLIP_SCORE_SCALE

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        inputs = self.processor(text=list(prompts), return_tensors="pt", padding=True)
        limit = self.model.config.text_config.max_position_embeddings
        inputs = {
            "input_ids": inputs["input_ids"][..., :limit],
            "attention_mask": inputs["attention_mask"][..., :limit],
        }
        return self.text_embeddings(inputs)

    @torch.inference_mode()
    def score_prepared(self, text: torch.Tensor | None, prepared: Any) -> list[float]:
        assert text is not None
        cosine = (self.image_embeddings(prepared) * text).sum(dim=-1)
        return (100 * cosine).clamp(min=0).tolist()


def load_pickscore(
    model: str, processor: str, *, device: str, precision: str = "auto"
) -> PickScoreScorer:
    from transformers import AutoProcessor, CLIPModel

    loaded = pretrained(CLIPModel, model, "scorers.pickscore_model")
    proc = pretrained(AutoProcessor, processor, "scorers.pickscore_processor")
    return PickScoreScorer(
        loaded, proc, label=f"PickScore ({model})", device=device, precision=precision
    )


def load_clip_score(model: str, *, device: str, precision: str = "auto") -> CLIPScoreScorer:
    from transformers import CLIPModel, CLIPProcessor

    loaded = pretrained(CLIPModel, model, "scorers.clip_model")
    proc = pretrained(CLIPProcessor, model, "scorers.clip_model")
    return CLIPScoreScorer(
        loaded, proc, label=f"CLIP score ({model})", device=device, precision=precision
    )
