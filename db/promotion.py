"""When a classifier version may replace the serving one: the rule the training job, the
CLI (`hps models promote`) and the bot (`/promote`) all apply. Pure functions over the
metrics that evaluation records, so the bot can use them without importing `pipeline`.

The rule (issue 3, the paper's measure): evaluated on the same test examples, the new
version's top-1 accuracy beats the serving model's by at least `train.promote_margin`. With
no classifier version serving, the configured model (e.g. the paper's `hpc.pth`) serves and
is the one to beat: the one configured now (`configured_label`), not one configured when the
version was evaluated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from db.models import ModelError, ModelVersion

if TYPE_CHECKING:
    from hps.settings import Settings

# Evaluation reports name the configured (unregistered) model `configured:<its spec>`.
CONFIGURED_PREFIX = "configured:"


def describe_model(model: str, pretrained: str | None = None, checkpoint: str | None = None) -> str:
    """How reports name a model spec (`pipeline.model_files.ModelSpec.describe`); here so
    that the bot can name the configured model without importing `pipeline`."""
    parts = [model]
    if pretrained:
        parts.append(f"pretrained={pretrained}")
    if checkpoint:
        parts.append(f"checkpoint={checkpoint}")
    return " ".join(parts)


def configured_label(settings: Settings) -> str:
    """The label of the configured model (`models.hps_arch`, `hps_pretrained`,
    `hps_checkpoint`) in evaluation reports: what to beat while no classifier version serves."""
    m = settings.models
    checkpoint = str(m.hps_checkpoint) if m.hps_checkpoint else None
    return CONFIGURED_PREFIX + describe_model(m.hps_arch, m.hps_pretrained or None, checkpoint)


def beats(new: dict[str, Any], old: dict[str, Any], margin: float) -> tuple[bool, str]:
    """Whether `new` should replace `old`: evaluated on the same examples, a top-1 accuracy
    higher by at least `margin` (and higher at all). Returns the reason in words."""
    if new.get("examples") != old.get("examples"):
        return False, "they were not evaluated on the same test examples"
    if not new.get("n"):
        return False, "there are no test examples to compare on"
    gain = new["top1"] - old["top1"]
    verdict = f"top-1 {new['top1']:.3f} vs {old['top1']:.3f} ({gain:+.3f}, margin {margin:.3f})"
    if gain > 0 and gain >= margin:
        return True, f"better: {verdict}"
    return False, f"not better by the margin: {verdict}"


def check_promotable(
    version: ModelVersion,
    serving: ModelVersion | None,
    margin: float,
    configured: str,
) -> str:
    """Why a maintainer may serve `version` (raises `ModelError` if not). A classifier's
    recorded evaluation must beat the serving version's, or with none serving the configured
    model's, on the same examples. `configured` is the configured model's label now
    (`configured_label(settings)`): a report on a model configured before does not count.
    Other kinds have no offline gate here (an SD adapter's is its offline evaluation and live
    A/B review): a maintainer's promotion is their call."""
    if version.kind != "classifier":
        return f"promoted by a maintainer ({version.kind} has no offline gate)"
    report = version.metrics.get("test")
    compared = version.metrics.get("compared", {})
    others: list[str] = []  # reports on models configured before
    if serving is not None:
        rival = words = serving.name
    else:
        rival, words = configured, f"the configured model ({configured})"
        others = [k for k in compared if k.startswith(CONFIGURED_PREFIX) and k != configured]
    against = compared.get(rival)
    if report is None or against is None:
        earlier = f" (only against {', '.join(others)}, configured before)" if others else ""
        raise ModelError(
            f"{version.name} was not evaluated against {words}{earlier}: "
            f"run `hps eval --model {version.name}` first (or force the promotion)"
        )
    better, reason = beats(report, against, margin)
    if not better:
        raise ModelError(f"{version.name} does not beat {words}: {reason} (forcing overrides)")
    return reason
