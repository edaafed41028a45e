"""Which HPS model serves, and how trained versions enter the registry.

The serving classifier is the `classifier` version with status serving
(`db.models.serving`); with none, the configured model (`models.hps_arch`,
`hps_pretrained`, `hps_checkpoint`) serves. A trained version (a classifier, an SD adapter)
is published to the store (`models/<name>/<sha256>`, `hps.model_store`) and registered
with the sha256 of its weights, its parent (the version serving when it was trained) and
its metrics, and its recipe's `Gate` decides in the same transaction: a classifier is
promoted only if it beats the serving model on the same test examples by the configured
margin (`PromotionGate`).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from db import models, promotion
from db.connect import Executor
from db.models import ModelVersion
from db.promotion import beats
from hps.files import replacing
from hps.settings import Settings
from hps.storage import storage
from pipeline.model_files import (
    METADATA_FILE,
    ModelSpec,
)

if TYPE_CHECKING:
    from pipeline.hps_model import HPSModel

log = logging.getLogger(__name__)

KIND = "classifier"


def configured_spec(settings: Settings) -> ModelSpec:
    m = settings.models
    return ModelSpec(
        m.hps_arch, m.hps_pretrained or None, str(m.hps_checkpoint) if m.hps_checkpoint else None
    )


async def serving_model(
    db: Executor | None, settings: Settings
) -> tuple[ModelSpec, str, ModelVersion | None]:
    """The spec and label of the model that scores now, and its registry version if any
    (without a database: the configured model)."""
    version = await models.serving(db, KIND) if db is not None else None
    if version is None:
        return configured_spec(settings), promotion.configured_label(settings), None
    return ModelSpec(version.artifact), version.name, version


def load_spec(
    spec: ModelSpec, settings: Settings, name: str | None = None, **kwargs: Any
) -> HPSModel:
    from pipeline.hps_model import HPSModel

    # A published version is fetched into this machine's cache on its first use, and held
    # there (not evicted by another process) while it loads.
    with storage(settings).models.opened(spec.model) as path:
        return HPSModel.load(
            path,
            pretrained=spec.pretrained,
            checkpoint=spec.checkpoint,
            device=kwargs.pop("device", settings.models.device),
            name=name,
            **kwargs,
        )


def untuned_spec(model: HPSModel, spec: ModelSpec, settings: Settings) -> ModelSpec | None:
    """The untuned CLIP that `model` (loaded from `spec`) derives from, the paper's baseline:
    the base it records; for a bare weights file, which records none (the paper's
    `hpc.pth`), the configured base architecture (`models.hps_arch` with
    `hps_pretrained`: ViT-L-14 with OpenAI's weights by default). None for a model that is
    its own base (an architecture name)."""
    if model.base != spec:
        return model.base
    from pipeline.hps_model import WEIGHT_SUFFIXES

    path = Path(spec.model)
    if path.is_file() and path.suffix in WEIGHT_SUFFIXES:
        m = settings.models
        return ModelSpec(m.hps_arch, m.hps_pretrained or None)
    return None


def same_architecture(a: HPSModel, b: HPSModel) -> bool:
    """Whether two models have the same tensors (names and shapes): a baseline must be the
    architecture the other model was tuned from."""
    shapes = [{k: v.shape for k, v in m.clip.state_dict().items()} for m in (a, b)]
    return shapes[0] == shapes[1]


def is_model_spec(model: str) -> bool:
    """Whether `model` names a model without the registry: a path or an open_clip name."""
    import open_clip

    return Path(model).exists() or open_clip.get_model_config(model) is not None


async def resolve_version(
    db: Executor, settings: Settings, name: str | None
) -> tuple[ModelSpec, str]:
    """The spec and label of a registry version by name or id (None: the serving model)."""
    if name is None:
        spec, label, _ = await serving_model(db, settings)
        return spec, label
    version = await models.get(db, name)
    if version is None or version.kind != KIND:
        raise models.ModelError(
            f"no classifier version {name!r} (and no such file or open_clip architecture)"
        )
    return ModelSpec(version.artifact), version.name


def copy_atomically(source: Path, target: Path, marker: str = METADATA_FILE) -> None:
    """Copy a model folder (one holding `marker`) to `target`, which appears whole or not
    at all, and durably: copied to a temporary folder beside it, its files fsynced, renamed,
    and the rename fsynced. The folder gets the mode a plain `mkdir` would (the umask's),
    not `mkdtemp`'s owner-only 0700, so that other users (a worker, a web server) can read it."""
    if not (source / marker).is_file():
        raise FileNotFoundError(f"{source} is not a saved model folder")
    with replacing(target, folder=True) as tmp:
        mode = tmp.stat().st_mode  # copytree would give it the source's (a 0700 `mkdtemp` one)
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        tmp.chmod(mode)


@dataclass
class PromotionGate:
    """A classifier serves if its test report beats the serving model's by `margin`, on
    the same examples (`db.promotion.beats`), unless another version began serving since
    that report was made (then it was not compared)."""

    settings: Settings
    report: dict[str, Any]
    serving_report: dict[str, Any]
    margin: float

    async def apply(
        self, conn: Executor, version: ModelVersion, actor: str | None
    ) -> tuple[bool, str]:
        return await self._promote(conn, version, self.report, self.serving_report, actor)

    async def settle(
        self, db: Executor, version: ModelVersion, actor: str | None
    ) -> tuple[bool, str]:
        """A candidate is compared again with what serves now, from its recorded reports."""
        if version.status == "serving":
            return True, "promoted by an earlier attempt"
        if version.status != "candidate":
            return False, f"it is {version.status}"
        _, serving_label, _ = await serving_model(db, self.settings)
        compared = version.metrics.get("compared", {})
        if serving_label not in compared:
            return False, f"the serving model changed to {serving_label} since its evaluation"
        test = version.metrics.get("test", {})
        return await self._promote(db, version, test, compared[serving_label], actor)

    async def _promote(
        self,
        db: Executor,
        version: ModelVersion,
        report: dict[str, Any],
        serving_report: dict[str, Any],
        actor: str | None,
    ) -> tuple[bool, str]:
        better, reason = beats(report, serving_report, self.margin)
        if not better:
            return False, reason
        compared_with = serving_report.get("model")

        def still_serving(_: ModelVersion, now: ModelVersion | None) -> str:
            if now is not None and now.name != compared_with:
                raise models.ModelError(f"{now.name} began serving meanwhile")
            return reason

        try:
            await models.promote(db, version.id, actor=actor, gate=still_serving)
        except models.ModelError as exc:
            return False, f"not promoted: {exc}; it was compared with {compared_with}"
        return True, reason
