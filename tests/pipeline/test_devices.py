"""Device and precision, decided in one place for every model."""

from __future__ import annotations

import logging

import pytest
import torch

from pipeline import devices


def test_precision_on_the_cpu_is_float32_unless_bf16_is_asked_for(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Every spelling the settings use (trainers', the scorer's, the generator's).
    for setting in ("auto", "no", "fp32", "float32"):
        assert devices.precision(setting, "cpu") == "no"
    for setting in ("bf16", "bfloat16"):
        assert devices.precision(setting, "cpu") == "bf16"
    with caplog.at_level(logging.WARNING, logger="pipeline.devices"):
        assert devices.precision("float16", "cpu") == "no"
    assert caplog.messages == ["float16 is not supported on cpu: using float32"]
    assert devices.dtype("no") is torch.float32 and devices.dtype("bfloat16") is torch.bfloat16
    assert devices.dtype(devices.precision("fp16", "cuda:0")) is torch.float16


def test_a_single_process_accelerator_starts_afresh_each_time() -> None:
    """A worker trains one run after another, in other precisions: no stale state."""
    first = devices.accelerator("cpu", "bf16")
    assert first.mixed_precision == "bf16" and first.device.type == "cpu"
    second = devices.accelerator("cpu", "auto", gradient_accumulation_steps=2)
    assert second.mixed_precision == "no" and second.gradient_accumulation_steps == 2
