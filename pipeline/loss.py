"""The paper's preference loss, apart from the model (as open_clip keeps `loss.py`).

For each example, the logits of its K images against its prompt are
`logit_scale.exp() · cos(image, text)` (the scale clamped to at most 100, as in the
reference code), and the loss is the cross-entropy of their softmax with the target: the
chosen image, or a uniform distribution over the shown images for a tie. Examples carry
weights (1/choices of their prompt); absent images of shorter rounds are masked out.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MAX_LOGIT_SCALE = math.log(100)


def grouped_logits(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    counts: torch.Tensor,
    logit_scale: torch.Tensor,
) -> torch.Tensor:
    """[B, Kmax] logits of each example's images against its prompt; padding is -inf.

    `image_features` [sum(counts), D] hold the examples' images one after another;
    `text_features` [B, D]; both L2-normalised."""
    k_max = int(counts.max())
    row = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    starts = torch.cumsum(counts, 0) - counts
    column = torch.arange(len(row), device=counts.device) - starts[row]
    similarity = (image_features * text_features[row]).sum(dim=-1)
    logits = torch.full(
        (len(counts), k_max), float("-inf"), dtype=similarity.dtype, device=similarity.device
    )
    scale = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
    return logits.index_put((row, column), scale * similarity)


def preference_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    counts: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    logit_scale: torch.Tensor,
) -> torch.Tensor:
    """Weighted mean cross-entropy between each example's softmax over its images and its
    (possibly soft) target [B, Kmax]."""
    logits = grouped_logits(image_features, text_features, counts, logit_scale)
    log_probs = F.log_softmax(logits.float(), dim=-1)
    # 0 × -inf at the padding would be NaN: padded targets are 0, so zero those terms.
    per_example = -(targets * log_probs.masked_fill(targets == 0, 0)).sum(dim=-1)
    return (weights * per_example).sum() / len(weights)
