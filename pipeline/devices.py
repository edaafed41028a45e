"""Where models run and in what precision, decided here for every model: the device of a
setting ("auto", "cuda:1"), the precision of a setting ("auto", "bf16", "float16") on it,
and for training accelerate's processes and a fresh `Accelerator`. torch is imported where
needed: a CPU-only worker without the `worker` extra imports this module too."""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

# The settings' spellings of a precision → accelerate's ("no" is float32).
PRECISIONS = {
    **dict.fromkeys(("no", "fp32", "float32"), "no"),
    **dict.fromkeys(("bf16", "bfloat16"), "bf16"),
    **dict.fromkeys(("fp16", "float16"), "fp16"),
}


def resolve_device(name: str = "auto") -> str:
    """ "auto" → "cuda" when a GPU is visible, else "cpu"; anything else as given."""
    if name != "auto":
        return name
    try:
        import torch
    except ImportError:  # a worker without the `worker` extra runs CPU-only kinds
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def precision(setting: str, device: str, *, auto: str = "bf16") -> str:
    """The precision to compute in on `device`, as accelerate names it: "no" (float32),
    "bf16" or "fp16". `setting` is any spelling in `PRECISIONS`, or "auto": float32 on the
    CPU, `auto` on a GPU ("bf16": bf16 where the GPU has it, else fp16). Half precision
    float16 on the CPU, slow where it works at all, falls back to float32 with a warning."""
    gpu = resolve_device(device).startswith("cuda")
    if setting == "auto":
        if gpu:
            import torch

            if torch.cuda.is_available():
                return "bf16" if auto == "bf16" and torch.cuda.is_bf16_supported() else "fp16"
        return "no"
    chosen = PRECISIONS[setting]
    if chosen == "fp16" and not gpu:
        log.warning("float16 is not supported on %s: using float32", device)
        return "no"
    return chosen


def dtype(precision: str) -> Any:  # -> torch.dtype
    """The torch dtype of a precision (any spelling in `PRECISIONS`)."""
    import torch

    return {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        PRECISIONS[precision]
    ]


def process_state(device: str = "auto") -> Any:
    """accelerate's view of the processes (`PartialState`): the first call decides whether
    this is one process of several, and on the CPU only with `cpu=True` does it see the
    others (a run under `accelerate launch --cpu` or `torchrun`)."""
    from accelerate import PartialState

    return PartialState(cpu=resolve_device(device) == "cpu")


def accelerator(device: str, mixed_precision: str, **options: Any) -> Any:
    """A fresh `Accelerator` for one training on `device` in the precision of the setting
    `mixed_precision`. A worker trains one run after another: with one process there is no
    distributed state to keep, and a stale one would pin the first run's device and
    precision, so it is reset. The GPU: the current one (`on_device`), or accelerate's."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if process_state(device).num_processes == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(
        cpu=resolve_device(device) == "cpu",
        mixed_precision=precision(mixed_precision, device),
        **options,
    )


def on_device(device: str) -> contextlib.AbstractContextManager[Any]:
    """While training, make GPU N of `device` "cuda:N" this thread's current CUDA device
    (restored after). A single-process `Accelerator()` places everything on the current
    device ("cuda" without an index), so without this `models.device = cuda:1` trained on
    cuda:0. Under `accelerate launch` accelerate gives each process its GPU: left alone."""
    resolved = resolve_device(device)
    if not resolved.startswith("cuda:") or process_state(device).num_processes > 1:
        return contextlib.nullcontext()
    import torch

    return torch.cuda.device(torch.device(resolved).index)


def on_its_device(function: F) -> F:
    """Run `function` (a trainer) inside `on_device` of its own `device` argument."""
    signature = inspect.signature(function)

    @functools.wraps(function)
    def run(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        with on_device(bound.arguments["device"]):
            return function(*args, **kwargs)

    return run  # type: ignore[return-value]
