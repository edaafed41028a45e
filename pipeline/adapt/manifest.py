"""An adaptation run's directory and its manifest, the record that makes a run resumable.

`runs_dir/<name>/manifest.json` holds the run's recipe (fixed when the run starts: a
resumed run keeps it, whatever the settings say later), the versions it started from, and
one entry per finished stage with its counts and artifacts. A stage is finished only once
its entry is written, and the manifest is replaced atomically (temporary file, fsync,
rename), so a crash leaves either the old manifest or the new one, never half of one.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hps.files import write_json_atomically

STAGES = ("prompts", "samples", "label", "train", "eval", "register")
MANIFEST = "manifest.json"


class RunError(Exception):
    """A run directory that cannot be used as asked (the message says why)."""


class Run:
    """A run directory with its manifest."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data

    @classmethod
    def open(cls, path: Path) -> Run | None:
        """The run in `path`, or None if there is none."""
        manifest = path / MANIFEST
        if not manifest.is_file():
            return None
        return cls(path, json.loads(manifest.read_text()))

    @classmethod
    def create(cls, path: Path, **header: Any) -> Run:
        """Start a run in `path` (which may exist, e.g. left by a crash before the
        manifest was written) with `header` (name, recipe, versions)."""
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path, {**header, "created_at": _now(), "stages": {}})
        run.save()
        return run

    @property
    def name(self) -> str:
        return str(self.data["name"])

    @property
    def recipe(self) -> dict[str, Any]:
        return dict(self.data["recipe"])

    def save(self) -> None:
        write_json_atomically(self.path / MANIFEST, self.data)

    def done(self, stage: str) -> bool:
        return stage in self.data["stages"]

    def stage(self, stage: str) -> dict[str, Any]:
        """A finished stage's record (RunError if it has not finished)."""
        if not self.done(stage):
            raise RunError(f"run {self.name} has not finished its {stage} stage")
        return dict(self.data["stages"][stage])

    def finish(self, stage: str, **record: Any) -> dict[str, Any]:
        """Record `stage` as finished with its counts and artifacts."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}")
        entry = {**record, "finished_at": _now()}
        self.data["stages"][stage] = entry
        self.save()
        return entry

    @property
    def last_stage(self) -> str | None:
        finished = [s for s in STAGES if self.done(s)]
        return finished[-1] if finished else None


def _now() -> str:
    return datetime.now(UTC).isoformat()
