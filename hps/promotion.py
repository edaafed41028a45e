"""When a classifier version may replace the serving one: the rule the training job, the
CLI (`hps models promote`) and the bot (`/promote`) all apply. Pure functions over the
metrics that evaluation records, so the bot can use them without importing `pipeline`.

The rule (issue 3, the paper's measure): evaluated on the same test examples, the new
version's top-1 accuracy beats the serving model's by at least `train.promote_margin`. With
no classifier version serving, the configured model (e.g. the paper's `hpc.pth`) serves and
is the one to beat.
"""

from __future__ import annotations

from typing import Any

from db.models import ModelError, ModelVersion

# Evaluation reports name the configured (unregistered) model `configured:<its spec>`.
CONFIGURED_PREFIX = "configured:"


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


def check_promotable(version: ModelVersion, serving: ModelVersion | None, margin: float) -> str:
    """Why a maintainer may serve `version` (raises `ModelError` if not). A classifier's
    recorded evaluation must beat the serving version's, or with none serving the configured
    model's, on the same examples. Other kinds have no offline gate here (an SD adapter's is
    its offline evaluation and live A/B review): a maintainer's promotion is their call."""
    if version.kind != "classifier":
        return f"promoted by a maintainer ({version.kind} has no offline gate)"
    report = version.metrics.get("test")
    compared = version.metrics.get("compared", {})
    if serving is not None:
        rival, against = serving.name, compared.get(serving.name)
    else:
        configured = [k for k in compared if k.startswith(CONFIGURED_PREFIX)]
        rival = configured[0] if len(configured) == 1 else "the configured model"
        against = compared.get(rival)
    if report is None or against is None:
        raise ModelError(
            f"{version.name} was not evaluated against {rival}: "
            f"run `hps eval --model {version.name}` first (or force the promotion)"
        )
    better, reason = beats(report, against, margin)
    if not better:
        raise ModelError(f"{version.name} does not beat {rival}: {reason} (forcing overrides)")
    return reason
