"""Torch devices and dtypes from settings strings ("auto", "cuda:1", "float16", ...)."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def resolve_device(name: str) -> str:
    """ "auto" → "cuda" when a GPU is visible, else "cpu"; anything else as given."""
    if name != "auto":
        return name
    try:
        import torch
    except ImportError:  # a worker without the `worker` extra runs CPU-only kinds
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str, device: str):  # type: ignore[no-untyped-def]  # -> torch.dtype
    """ "auto" → float16 on a GPU, float32 on the CPU. Half precision on the CPU is slow
    and partly unsupported, so it falls back to float32 with a warning."""
    import torch

    on_gpu = device.startswith("cuda")
    if name == "auto":
        return torch.float16 if on_gpu else torch.float32
    dtype = getattr(torch, name)
    if not on_gpu and dtype is torch.float16:
        log.warning("float16 is not supported on %s: using float32", device)
        return torch.float32
    return dtype
