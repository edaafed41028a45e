"""Tiny random weights in each reward model's released format, built offline for tests
and benches, and loaded back through the real loading code (`pipeline.scorers`):

- HPS v2: an open_clip config shaped like ViT-H-14 (GELU, 80-wide heads shrunk to 16, no
  QuickGELU) and its weights saved as the released checkpoints are, `{"state_dict": ...}`;
- PickScore and CLIP score: a transformers `CLIPModel` saved with `save_pretrained`, with a
  `CLIPProcessor` whose tokenizer is built from open_clip's bundled BPE vocabulary;
- the aesthetic predictor: its MLP's state dict with the released keys (`layers.0` ...
  `layers.7`) and hidden sizes, on the tiny CLIP's 32-wide embeddings.

The session fixture `tiny_scorers` gives the settings sections pointing at all of them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.tiny_models import write_clip_tokenizer_files

HPSV2_TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16,
                   "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                 "layers": 2},
}  # fmt: skip


def tiny_hpsv2(directory: Path, seed: int = 1) -> tuple[Path, Path]:
    """(model-config JSON, checkpoint `HPS_v2.1_compressed.pt` as `{"state_dict": ...}`)."""
    import open_clip
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "hpsv2-tiny.json"
    config.write_text(json.dumps(HPSV2_TINY))
    open_clip.add_model_config(config)
    torch.manual_seed(seed)
    model = open_clip.create_model("hpsv2-tiny", pretrained=None)
    checkpoint = directory / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    return config, checkpoint


def tiny_hf_clips(directory: Path, seeds: tuple[int, ...] = (2, 3)) -> list[Path]:
    """Folders of tiny transformers CLIP models (one per seed), each with its processor."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    files = write_clip_tokenizer_files(directory / "tokenizer")
    tokenizer = CLIPTokenizer(str(files / "vocab.json"), str(files / "merges.txt"))
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=tokenizer,
    )
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                     "num_hidden_layers": 2, "vocab_size": len(tokenizer),
                     "max_position_embeddings": 77},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                       "num_hidden_layers": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )  # fmt: skip
    folders = []
    for seed in seeds:
        torch.manual_seed(seed)
        folder = directory / f"clip-{seed}"
        CLIPModel(config).save_pretrained(folder)
        processor.save_pretrained(folder)
        folders.append(folder)
    return folders


def tiny_aesthetic(directory: Path, width: int = 32, seed: int = 4) -> Path:
    """The predictor's MLP state dict (released keys and hidden sizes) on `width`-wide
    embeddings, saved as `torch.save(model.state_dict())` saved it."""
    import torch

    torch.manual_seed(seed)
    layers = torch.nn.Sequential(
        torch.nn.Linear(width, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
        torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
        torch.nn.Linear(64, 16), torch.nn.Linear(16, 1),
    )  # fmt: skip
    path = directory / "sac+logos+ava1-l14-linearMSE.pth"
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({f"layers.{k}": v for k, v in layers.state_dict().items()}, path)
    return path


def tiny_scorer_settings(directory: Path) -> dict[str, dict[str, str]]:
    """Settings sections (`models`, `scorers`) pointing every scorer at tiny weights."""
    from pipeline.tiny_models import tiny_weights

    (directory / "hps").mkdir(parents=True, exist_ok=True)
    config, weights = tiny_weights(directory / "hps")
    hpsv2_config, hpsv2_checkpoint = tiny_hpsv2(directory / "hpsv2")
    pickscore, clip = tiny_hf_clips(directory / "hf")
    return {
        "models": {"hps_arch": str(config), "hps_pretrained": str(weights), "device": "cpu"},
        "scorers": {
            "hpsv2_arch": str(hpsv2_config),
            "hpsv2_checkpoint": str(hpsv2_checkpoint),
            "pickscore_model": str(pickscore),
            "pickscore_processor": str(pickscore),
            "aesthetic_checkpoint": str(tiny_aesthetic(directory / "aesthetic")),
            "aesthetic_clip": str(config),
            "aesthetic_clip_pretrained": str(weights),
            "clip_model": str(clip),
        },
    }


@pytest.fixture(scope="session")
def tiny_scorers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """`models` and `scorers` settings sections with every scorer on tiny weights."""
    return tiny_scorer_settings(tmp_path_factory.mktemp("tiny_scorers"))
