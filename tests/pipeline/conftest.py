"""Fixtures of the pipeline tests: the tiny CLIP and the synthetic colour-choice dataset."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_clip import tiny_weights, write_colour_hpd


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(config file, weights file) of a seeded tiny CLIP."""
    return tiny_weights(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def colour_hpd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The colour task in the HPD layout: 320 train and 80 test records of 4 images."""
    return write_colour_hpd(tmp_path_factory.mktemp("hpd"), n_train=320, n_test=80, k=4)
