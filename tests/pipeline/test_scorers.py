"""The reward models behind `pipeline.scorers`, on tiny random weights saved in each one's
released format and loaded through the real loading code. Each scorer's output is checked
against a re-implementation of its reference code, kept here with the upstream file named;
and a pass with all of them decodes each image once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import pipeline.hps_model
from pipeline.hps_model import HPSModel, ModelLoadError
from pipeline.scorers import load_scorer, load_scorers, parse_names, score_all, score_with
from pipeline.scorers.hf_clip import PickScoreScorer
from tests.pipeline.conftest import make_settings

PROMPTS = ["a red cube", "a blue ball on grass"]


@pytest.fixture(scope="module")
def settings(tiny_scorers: dict[str, dict[str, str]]) -> Any:
    return make_settings(**tiny_scorers)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Non-square JPEGs of different sizes, so resizing, cropping and padding all matter."""
    folder = tmp_path_factory.mktemp("scored")
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(50, 40), (48, 64), (32, 32), (70, 35), (41, 57), (64, 48)]):
        path = folder / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, quality=95)
        paths.append(path)
    return paths


def _tensor(output: Any) -> torch.Tensor:
    # transformers 5's get_*_features return an output whose pooler_output is the embedding.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def test_hps_v1_is_our_hps_model(settings: Any, images: list[Path]) -> None:
    scorer = load_scorer("hps", settings)
    m = settings.models
    model = HPSModel.load(m.hps_arch, pretrained=m.hps_pretrained, device="cpu")
    assert score_with(scorer, PROMPTS[0], images) == model.score(PROMPTS[0], images)
    assert scorer.name == "hps" and scorer.scale.startswith("hps: 100 ×")


# hpsv2/src/open_clip/transform.py (tgxs002/HPSv2), as released but for `antialias`.
class ResizeMaxSize(torch.nn.Module):
    def __init__(self, max_size, interpolation=None, fn="max", fill=0):  # type: ignore[no-untyped-def]
        from torchvision.transforms import InterpolationMode

        super().__init__()
        self.max_size = max_size
        self.interpolation = interpolation or InterpolationMode.BICUBIC
        self.fn = min if fn == "min" else min  # noqa: RUF034 (upstream's, as released)
        self.fill = fill

    def forward(self, img):  # type: ignore[no-untyped-def]
        import torchvision.transforms.functional as F

        height, width = img.shape[1:]
        scale = self.max_size / float(max(height, width))
        if scale != 1.0:
            new_size = tuple(round(dim * scale) for dim in (height, width))
            # The one change: upstream passes no antialias, which under the torchvision it was
            # trained and benchmarked with (< 0.17) meant none for a tensor; since 0.17 the
            # default antialiases. Set explicitly, so the reference is the released behaviour.
            img = F.resize(img, new_size, self.interpolation, antialias=False)
            pad_h = self.max_size - new_size[0]
            pad_w = self.max_size - new_size[1]
            img = F.pad(img, padding=[pad_w // 2, pad_h // 2, pad_w - pad_w // 2,
                                      pad_h - pad_h // 2], fill=self.fill)  # fmt: skip
        return img


def hpsv2_reference(config: str, checkpoint: str, paths: list[Path], prompt: str) -> list[float]:
    """hpsv2/img_score.py's `score(img_path, prompt, cp)` on the CPU: the model with the
    checkpoint's state_dict, `preprocess_val` (image_transform(is_train=False,
    resize_longest_max=True): RGB, ToTensor, ResizeMaxSize, Normalize with OpenAI's mean
    and std), one image at a time, `model(image, text)` with output_dict, the diagonal of
    image_features @ text_features.T."""
    from torchvision.transforms import Compose, Normalize, ToTensor

    open_clip.add_model_config(config)
    model = open_clip.create_model(Path(config).stem, pretrained=None, output_dict=True)
    model.load_state_dict(torch.load(checkpoint, map_location="cpu")["state_dict"])
    model.eval()
    preprocess_val = Compose([lambda im: im.convert("RGB"), ToTensor(),
                              ResizeMaxSize(model.visual.image_size[0], fill=0),
                              Normalize(open_clip.OPENAI_DATASET_MEAN,
                                        open_clip.OPENAI_DATASET_STD)])  # fmt: skip
    tokenizer = open_clip.get_tokenizer(Path(config).stem)
    result = []
    for path in paths:
        with torch.no_grad():
            image = preprocess_val(Image.open(path)).unsqueeze(0)
            text = tokenizer([prompt])
            outputs = model(image, text)
            image_features, text_features = outputs["image_features"], outputs["text_features"]
            logits_per_image = image_features @ text_features.T
            hps_score = torch.diagonal(logits_per_image).cpu().numpy()
        result.append(float(hps_score[0]))
    return result


def test_hps_v2_scores_as_the_hpsv2_package(settings: Any, images: list[Path]) -> None:
    scorer = load_scorer("hpsv2", settings)
    s = settings.scorers
    expected = hpsv2_reference(s.hpsv2_arch, s.hpsv2_checkpoint, images, PROMPTS[1])
    assert np.allclose(score_with(scorer, PROMPTS[1], images), expected, atol=1e-5)
    assert scorer.label.startswith("HPS v2.1") and "raw" in scorer.scale
    assert all(-1 <= x <= 1 for x in expected)  # the raw cosine, not ×100


def pickscore_reference(folder: str, prompt: str, paths: list[Path]) -> tuple[list, list]:
    """PickScore's README (yuvalkirstain/PickScore, "Inference with PickScore"): `calc_probs`
    on the CPU, returning the scores beside the probabilities."""
    from transformers import AutoModel, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    images = [Image.open(p) for p in paths]
    image_inputs = processor(images=images, padding=True, truncation=True, max_length=77,
                             return_tensors="pt")  # fmt: skip
    text_inputs = processor(text=prompt, padding=True, truncation=True, max_length=77,
                            return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        image_embs = _tensor(model.get_image_features(**image_inputs))
        image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
        text_embs = _tensor(model.get_text_features(**text_inputs))
        text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
        scores = model.logit_scale.exp() * (text_embs @ image_embs.T)[0]
        probs = torch.softmax(scores, dim=-1)
    return scores.tolist(), probs.cpu().tolist()


def test_pickscore_scores_and_probabilities_as_its_readme(
    settings: Any, images: list[Path]
) -> None:
    scorer = load_scorer("pickscore", settings)
    # Two prompts in one call: each prompt's images compared with the README's per prompt.
    prompts = [PROMPTS[i % 2] for i in range(len(images))]
    scores = score_with(scorer, prompts, images)
    for prompt in PROMPTS:
        mine = [s for s, p in zip(scores, prompts, strict=True) if p == prompt]
        paths = [i for i, p in zip(images, prompts, strict=True) if p == prompt]
        expected, probs = pickscore_reference(settings.scorers.pickscore_model, prompt, paths)
        assert np.allclose(mine, expected, atol=1e-4)
        assert np.allclose(PickScoreScorer.probabilities(mine), probs, atol=1e-6)


def test_pickscore_keeps_its_logit_scale_in_float32_in_half_precision(
    settings: Any, images: list[Path]
) -> None:
    """On a GPU the model computes in bf16; PickScore's scale is exp(logit_scale) of the
    released float32 weight, never of its bf16 rounding (×98.9 instead of ×100 for
    PickScore's ln 100)."""
    from transformers import CLIPModel

    scorer = load_scorer("pickscore", settings, precision="bf16")
    assert scorer.model.logit_scale.dtype == torch.bfloat16  # the model is cast
    released = CLIPModel.from_pretrained(settings.scorers.pickscore_model).logit_scale.detach()
    assert scorer.logit_scale.dtype == torch.float32
    assert torch.equal(scorer.logit_scale, released.exp())
    assert not torch.equal(released.to(torch.bfloat16).float().exp(), released.exp())
    text = scorer.encode_prompts([PROMPTS[0]] * 2)
    cosine = scorer.image_embeddings(scorer.prepare([Image.open(p) for p in images[:2]])) * text
    expected = (released.exp() * cosine.sum(dim=-1)).tolist()
    assert score_with(scorer, PROMPTS[0], images[:2]) == pytest.approx(expected, abs=1e-6)


class MLP(torch.nn.Module):
    """improved-aesthetic-predictor's simple_inference.py MLP (a LightningModule there; its
    layers, as released, here)."""

    def __init__(self, input_size: int) -> None:
        super().__init__()
        self.input_size = input_size
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(self.input_size, 1024), torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2), torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def normalized(a, axis=-1, order=2):  # type: ignore[no-untyped-def]
    # simple_inference.py's, verbatim.
    l2 = np.atleast_1d(np.linalg.norm(a, order, axis))
    l2[l2 == 0] = 1
    return a / np.expand_dims(l2, axis)


def _convert_image_to_rgb(image):  # type: ignore[no-untyped-def]
    # openai/CLIP clip/clip.py, verbatim.
    return image.convert("RGB")


def _transform(n_px):  # type: ignore[no-untyped-def]
    # openai/CLIP clip/clip.py, verbatim (BICUBIC: torchvision's InterpolationMode.BICUBIC,
    # as clip.py takes it): the `preprocess` that `clip.load` returns.
    from torchvision.transforms import (
        CenterCrop,
        Compose,
        InterpolationMode,
        Normalize,
        Resize,
        ToTensor,
    )

    BICUBIC = InterpolationMode.BICUBIC
    return Compose([
        Resize(n_px, interpolation=BICUBIC),
        CenterCrop(n_px),
        _convert_image_to_rgb,
        ToTensor(),
        Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    ])  # fmt: skip


def aesthetic_reference(settings: Any, paths: list[Path]) -> list[float]:
    """improved-aesthetic-predictor/simple_inference.py on the CPU: the MLP with the
    released state dict, `clip.load`'s preprocessing (`_transform` above: written out from
    openai/CLIP, not taken from open_clip, whose transforms the implementation uses),
    `encode_image`, numpy L2 normalisation. The tiny CLIP's weights load through open_clip
    (`clip.load` is on GitHub only, and its architecture is the same)."""
    s = settings.scorers
    model = MLP(32)
    model.load_state_dict(torch.load(s.aesthetic_checkpoint))
    model.eval()
    open_clip.add_model_config(s.aesthetic_clip)
    model2 = open_clip.create_model(
        Path(s.aesthetic_clip).stem, pretrained=s.aesthetic_clip_pretrained
    )
    model2.eval()
    preprocess = _transform(model2.visual.image_size[0])
    result = []
    for path in paths:
        image = preprocess(Image.open(path)).unsqueeze(0)
        with torch.no_grad():
            image_features = model2.encode_image(image)
        im_emb_arr = normalized(image_features.cpu().detach().numpy())
        prediction = model(torch.from_numpy(im_emb_arr).type(torch.FloatTensor))
        result.append(float(prediction.detach()))
    return result


def test_aesthetic_predicts_as_simple_inference(settings: Any, images: list[Path]) -> None:
    scorer = load_scorer("aesthetic", settings)
    assert scorer.encode_prompts(PROMPTS) is None  # it reads no prompt
    expected = aesthetic_reference(settings, images)
    assert np.allclose(score_with(scorer, PROMPTS[0], images), expected, atol=1e-5)


def clip_score_reference(folder: str, image: Path, caption: str) -> float:
    """torchmetrics' `clip_score(image, caption, model)` (functional/multimodal/clip_score.py:
    `_get_features` for the image, a uint8 [C, H, W] tensor, and for the caption, cut to the
    model's positions; `_clip_score_update`; the mean over the batch and max with 0)."""
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(folder), CLIPProcessor.from_pretrained(folder)
    pixels = torch.from_numpy(np.array(Image.open(image).convert("RGB"))).permute(2, 0, 1)
    processed = processor(images=[pixels.cpu()], return_tensors="pt", padding=True)
    with torch.no_grad():
        source_features = _tensor(model.get_image_features(processed["pixel_values"]))
        processed = processor(text=[caption], return_tensors="pt", padding=True)
        max_position_embeddings = model.config.text_config.max_position_embeddings
        if processed["attention_mask"].shape[-1] > max_position_embeddings:
            processed["attention_mask"] = processed["attention_mask"][..., :max_position_embeddings]
            processed["input_ids"] = processed["input_ids"][..., :max_position_embeddings]
        target_features = _tensor(
            model.get_text_features(processed["input_ids"], processed["attention_mask"])
        )
    source_features = source_features / source_features.norm(p=2, dim=-1, keepdim=True)
    target_features = target_features / target_features.norm(p=2, dim=-1, keepdim=True)
    score = 100 * (source_features * target_features).sum(axis=-1)
    score = score.mean(0)
    return float(torch.max(score, torch.zeros_like(score)))


def test_clip_score_as_torchmetrics(settings: Any, images: list[Path]) -> None:
    scorer = load_scorer("clip", settings)
    long = "a very long caption " * 30  # longer than 77 tokens: cut as torchmetrics cuts it
    prompts = [PROMPTS[0], PROMPTS[1], long, PROMPTS[0], long, PROMPTS[1]]
    scores = score_with(scorer, prompts, images, batch_size=4)
    expected = [
        clip_score_reference(settings.scorers.clip_model, i, p)
        for i, p in zip(images, prompts, strict=True)
    ]
    assert np.allclose(scores, expected, atol=1e-4)
    assert min(scores) >= 0


def test_one_pass_decodes_each_image_once_and_scores_as_each_alone(
    settings: Any, images: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    scorers = load_scorers(parse_names("hps, hpsv2,pickscore,aesthetic,clip"), settings)
    alone = {s.name: score_with(s, PROMPTS[0], images, batch_size=4) for s in scorers}
    decoded: list[Any] = []
    real = pipeline.hps_model.open_image

    def counting(image: Any, max_pixels: int | None = None) -> Image.Image:
        decoded.append(image)
        return real(image, max_pixels)

    monkeypatch.setattr(pipeline.hps_model, "open_image", counting)
    together = score_all(scorers, PROMPTS[0], images, batch_size=4)
    assert len(decoded) == len(images)  # once each, for five scorers
    assert list(together) == ["hps", "hpsv2", "pickscore", "aesthetic", "clip"]
    for name, scores in together.items():
        assert np.allclose(scores, alone[name], atol=1e-6), name


def test_unknown_names_and_missing_weights_say_what_to_set(
    settings: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match=r"unknown scorer.*imagereward: choose from hps, hpsv2"):
        parse_names("hps,imagereward")
    missing = settings.with_changes("scorers", hpsv2_checkpoint=str(tmp_path / "none.pt"))
    with pytest.raises(ModelLoadError, match=r"scorers\.hpsv2_checkpoint: no such file"):
        load_scorer("hpsv2", missing)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # read at import
    hub = settings.with_changes("scorers", aesthetic_checkpoint="someone/absent/model.pth")
    with pytest.raises(ModelLoadError, match=r"set scorers.aesthetic_checkpoint "
                       r"\(HPS_SCORERS__AESTHETIC_CHECKPOINT\) to their path"):  # fmt: skip
        load_scorer("aesthetic", hub)
    wrong = tmp_path / "wrong.pth"
    torch.save({"weight": torch.zeros(1)}, wrong)
    with pytest.raises(ModelLoadError, match="is not the aesthetic predictor's MLP"):
        load_scorer("aesthetic", settings.with_changes("scorers", aesthetic_checkpoint=str(wrong)))
