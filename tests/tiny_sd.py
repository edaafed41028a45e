"""Fixtures of the tiny Stable Diffusion pipeline and LoRA adapters (built by
`pipeline.tiny_models`), each built once per session: `tiny_sd_dir`, `tiny_sd_flagging_dir`,
`tiny_lora_dirs` (two different adapters for `tiny_sd_dir`). tests/conftest.py registers this
module as a plugin, so every test can ask for them; torch and diffusers are imported only
when one is built.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.tiny_models import build_tiny_lora, build_tiny_sd


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD pipeline folder without a safety checker."""
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def tiny_sd_flagging_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same pipeline with a safety checker that flags batch indices 0, 4, 8, …"""
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd_flagging"), safety_every=4)


@pytest.fixture(scope="session")
def tiny_lora_dirs(tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two different LoRA adapters for `tiny_sd_dir`."""
    root = tmp_path_factory.mktemp("tiny_lora")
    return [build_tiny_lora(tiny_sd_dir, root / f"lora{i}", seed=i + 1) for i in range(2)]
