"""What identifies a model and its files on disk; no torch here, so that the registry and
the CLI's registry commands start fast."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from db.promotion import describe_model

SCALE = "hps"  # 100 × cosine similarity
METADATA_FILE = "hps.json"
OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class ModelSpec:
    """What to load (see `pipeline.hps_model`): a saved folder, a weights file, a model
    config or an architecture name; a pretrained tag or file; a checkpoint over it."""

    model: str
    pretrained: str | None = None
    checkpoint: str | None = None

    def describe(self) -> str:
        return describe_model(self.model, self.pretrained, self.checkpoint)

    def as_dict(self) -> dict[str, str | None]:
        return {"model": self.model, "pretrained": self.pretrained, "checkpoint": self.checkpoint}


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=list) + "\n")
