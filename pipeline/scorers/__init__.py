"""The field's reward models behind one interface (`Scorer`), each loaded through its own
real loading code from a local path or a Hugging Face hub id (`scorers.*` settings):

- `hps`: HPS v1, our classifier (or the paper's hpc.pth) as `HPSModel`: 100 × cosine;
- `hpsv2`: HPS v2 / v2.1, open_clip ViT-H-14 with the released `{"state_dict": ...}`:
  the raw cosine (the hpsv2 package's scale; ×100 would be HPS v1's);
- `pickscore`: PickScore, a transformers `CLIPModel` and its processor:
  logit_scale.exp() × cosine (its probabilities: the softmax over one prompt's images);
- `aesthetic`: the LAION aesthetic predictor v2, an MLP on CLIP ViT-L/14 image embeddings:
  the predicted rating (reads no prompt);
- `clip`: CLIP score as torchmetrics computes it (transformers `CLIPModel`):
  100 × max(cosine, 0).

`score_all` scores images with several of them at once, decoding each image once.
ImageReward is not among them: its package cannot be installed beside our pins (README).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from hps.settings import SCORER_NAMES, Settings
from pipeline.scorers.base import Scorer, score_all, score_with

if TYPE_CHECKING:
    from pipeline.hps_model import HPSModel

__all__ = ["SCORER_NAMES", "Scorer", "cached_scorers", "load_scorer", "load_scorers",
           "parse_names", "score_all", "score_with"]  # fmt: skip


log = logging.getLogger(__name__)


class UnknownScorer(ValueError):
    """A scorer name that is not one of `SCORER_NAMES`."""


def parse_names(text: str) -> list[str]:
    """Scorer names from a comma-separated list ("hps,pickscore"), checked, in order, once
    each."""
    names = list(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in SCORER_NAMES]
    if unknown or not names:
        raise UnknownScorer(
            f"unknown scorer(s) {', '.join(unknown) or '(none given)'}: choose from "
            f"{', '.join(SCORER_NAMES)}"
        )
    return names


def load_scorer(
    name: str,
    settings: Settings,
    *,
    hps: HPSModel | None = None,
    device: str | None = None,
    precision: str = "auto",
) -> Scorer:
    """The scorer `name` with the weights its settings name (`scorers.*`). `hps` is the HPS
    model of the `hps` scorer (default: the configured model, `models.hps_*`)."""
    device = device or settings.models.device
    s = settings.scorers
    if name == "hps":
        from pipeline import registry
        from pipeline.scorers.open_clip_scorers import hps_scorer

        if hps is None:
            hps = registry.load_spec(registry.configured_spec(settings), settings, device=device)
        return hps_scorer(hps)
    if name == "hpsv2":
        from pipeline.scorers.open_clip_scorers import load_hpsv2

        return load_hpsv2(s.hpsv2_arch, s.hpsv2_checkpoint, device=device, precision=precision)
    if name == "pickscore":
        from pipeline.scorers.hf_clip import load_pickscore

        return load_pickscore(
            s.pickscore_model, s.pickscore_processor, device=device, precision=precision
        )
    if name == "aesthetic":
        from pipeline.scorers.open_clip_scorers import load_aesthetic

        return load_aesthetic(
            s.aesthetic_checkpoint,
            s.aesthetic_clip,
            s.aesthetic_clip_pretrained or None,
            device=device,
            precision=precision,
        )
    if name == "clip":
        from pipeline.scorers.hf_clip import load_clip_score

        return load_clip_score(s.clip_model, device=device, precision=precision)
    raise UnknownScorer(f"unknown scorer {name!r}: choose from {', '.join(SCORER_NAMES)}")


def load_scorers(
    names: Sequence[str], settings: Settings, *, hps: HPSModel | None = None, **options: str
) -> list[Scorer]:
    """The scorers `names`, in order (see `load_scorer`)."""
    return [load_scorer(name, settings, hps=hps, **options) for name in names]


async def cached_scorers(
    names: Sequence[str], settings: Settings, cache: dict[str, Any]
) -> list[Scorer]:
    """The scorers `names` (not `hps`: the serving classifier has its own cache), loaded once
    per worker (in `cache`) while their settings stay the same."""
    identity = settings.scorers.model_dump_json() + settings.models.device
    loaded = []
    for name in names:
        key = f"scorer:{name}"
        cached = cache.get(key)
        if cached is None or cached[0] != identity:
            log.info("loading the %s scorer", name)
            scorer = await asyncio.to_thread(load_scorer, name, settings)
            cache[key] = cached = (identity, scorer)
        loaded.append(cached[1])
    return loaded
