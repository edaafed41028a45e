"""The reference rule that labels scored images, and the fine-tuning set built from it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.adapt.dataset import (
    DatasetError,
    Item,
    counts,
    labelled_items,
    regularization_items,
)
from pipeline.adapt.label import Sample, centred_softmax, is_blurry, label_samples, pick

IDENTIFIER = "Weird image. "


def _samples(prompt: int, scores: list[float], *, blurry=(), nsfw=()) -> list[Sample]:  # type: ignore[no-untyped-def]
    return [
        Sample(
            prompt_index=prompt,
            prompt=f"prompt {prompt}",
            index=j,
            seed=100 * prompt + j,
            file=f"samples/{prompt}_{j}.jpg",
            score=s,
            blurry=j in blurry,
            nsfw=j in nsfw,
        )
        for j, s in enumerate(scores)
    ]


CRAFTED = [
    # Clear best and worst: positive 3 (share 0.9995), negative 0 (share 0.665).
    *_samples(0, [20, 21, 22, 30]),
    # Close scores: top share 0.382, bottom share 0.439, both under 2/4.
    *_samples(1, [20, 20.5, 21, 21.2]),
    # A blurry image is left out before the softmax: n = 4; positive 0 (0.980); the three
    # equal lowest share 0.333 each, under 2/4.
    *_samples(2, [25, 10, 20, 20, 20], blurry={1}),
    # Fewer than 4 usable images: dropped (a blurry one, a flagged one).
    *_samples(3, [10, 20, 30, 40], blurry={0}),
    *_samples(4, [10, 20, 30, 40], nsfw={2}),
]


def test_the_softmax_is_over_scores_minus_their_mean_without_temperature() -> None:
    shares = centred_softmax([20, 21, 22, 30])
    expected = np.exp([20, 21, 22, 30]) / np.exp([20, 21, 22, 30]).sum()
    assert shares == pytest.approx(expected)
    assert centred_softmax([-20, -21, -22, -30])[0] == pytest.approx(0.66522, abs=1e-5)
    assert pick([20, 21, 22, 30], 2.0) == (3, 0)
    assert pick([20, 20.5, 21, 21.2], 2.0) == (None, None)


def test_labels_follow_the_reference_rule_on_crafted_scores() -> None:
    labelling = label_samples(CRAFTED, factor=2.0)
    found = [(x.sample.prompt_index, x.sample.index, x.kind) for x in labelling.labels]
    assert found == [(0, 3, "positive"), (0, 0, "negative"), (2, 0, "positive")]
    assert [round(x.share, 4) for x in labelling.labels] == [0.9995, 0.6652, 0.9802]
    assert all(x.n == 4 for x in labelling.labels)
    assert labelling.counts == {
        "prompts": 5,
        "images": 21,
        "blurry": 2,
        "nsfw": 1,
        "prompts_kept": 3,
        "prompts_dropped": 2,
        "positives": 2,
        "negatives": 1,
    }


def test_the_factor_is_honoured() -> None:
    # factor 1.5 (threshold 0.375): prompt 1's top (0.382) and bottom (0.439) now qualify.
    looser = label_samples(CRAFTED, factor=1.5)
    found = [(x.sample.prompt_index, x.sample.index, x.kind) for x in looser.labels]
    assert found == [(0, 3, "positive"), (0, 0, "negative"), (1, 3, "positive"),
                     (1, 0, "negative"), (2, 0, "positive")]  # fmt: skip
    # factor 1 (threshold 0.25): prompt 2's lowest (three equal at 0.333) qualifies, and
    # the first of the equal scores is the one taken (as the reference's list.index).
    loosest = label_samples(CRAFTED, factor=1.0)
    assert [(x.sample.index, x.kind) for x in loosest.labels if x.sample.prompt_index == 2] == [
        (0, "positive"),
        (2, "negative"),
    ]
    assert label_samples(CRAFTED, factor=3.9).counts["positives"] == 2  # 0.9995, 0.980 > 0.975
    assert label_samples(CRAFTED, factor=4.0).labels == []  # nothing exceeds 4/4


def test_prompts_need_four_usable_images() -> None:
    three = label_samples(_samples(7, [0, 0, 50]), factor=2.0)
    assert three.labels == [] and three.counts["prompts_dropped"] == 1
    assert label_samples(_samples(7, [0, 0, 50]), factor=2.0, min_images=3).counts["positives"] == 1


def test_blur_looks_across_and_down_with_absolute_differences() -> None:
    flat = np.full((8, 8, 3), 128, dtype=np.uint8)
    assert is_blurry(flat)
    across = flat.copy()
    across[:, 4:] += 10  # a step of exactly the threshold is sharp
    assert not is_blurry(across)
    soft = flat.copy()
    soft[:, 4:] += 9
    assert is_blurry(soft) and not is_blurry(soft, threshold=9)
    # An edge only downwards: the reference (across, twice) called this blurry.
    down = flat.copy()
    down[4:, :, 0] = 200
    assert not is_blurry(down)
    # Dark left, bright right: the reference's signed (left - right) maximum is negative,
    # so it called this blurry; the absolute difference does not.
    rising = np.tile(np.array([0, 100], dtype=np.uint8).repeat(4), (8, 1))
    assert not is_blurry(rising)


def test_the_fine_tuning_set_prefixes_exactly_the_negatives(tmp_path: Path) -> None:
    labelling = label_samples(CRAFTED, factor=1.5)
    items = labelled_items(labelling.labels, IDENTIFIER)
    assert items == [
        Item("samples/0_3.jpg", "prompt 0", "positive"),
        Item("samples/0_0.jpg", "Weird image. prompt 0", "negative"),
        Item("samples/1_3.jpg", "prompt 1", "positive"),
        Item("samples/1_0.jpg", "Weird image. prompt 1", "negative"),
        Item("samples/2_0.jpg", "prompt 2", "positive"),
    ]
    assert counts(items) == {"positive": 3, "negative": 2, "regularization": 0}


def test_regularization_data_keeps_its_captions_and_says_what_is_wrong(tmp_path: Path) -> None:
    folder = tmp_path / "laion"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        Image.new("RGB", (16, 16), "white").save(folder / name)
    rows = [{"file_name": n, "caption": f"caption of {n}"} for n in ("a.jpg", "b.jpg", "c.jpg")]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = regularization_items(folder, limit=2)
    assert items == [
        Item(str(folder / "a.jpg"), "caption of a.jpg", "regularization"),
        Item(str(folder / "b.jpg"), "caption of b.jpg", "regularization"),
    ]
    assert len(regularization_items(folder / "metadata.jsonl")) == 3

    (folder / "metadata.jsonl").write_text('{"file_name": "gone.jpg", "caption": "x"}\n')
    with pytest.raises(DatasetError, match=r"metadata.jsonl, line 1: no image file .*gone.jpg"):
        regularization_items(folder)
    (folder / "metadata.jsonl").write_text('{"file_name": "a.jpg"}\n')
    with pytest.raises(DatasetError, match="line 1: expected a JSON object with file_name and"):
        regularization_items(folder)
    with pytest.raises(DatasetError, match="no regularization data at"):
        regularization_items(tmp_path / "nowhere")
