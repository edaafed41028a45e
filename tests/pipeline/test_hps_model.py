"""The HPS model: the score's definition, batching, inputs, checkpoints and loading paths."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

import open_clip
import pytest
import torch
from PIL import Image

from pipeline.hps_model import HPSModel, ImageError, ModelLoadError, openai_model_cfg
from pipeline.tiny_models import TINY_NAME, tiny_clip, tiny_openai_checkpoint
from tests.colour_task import colour_image


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = random.Random(seed)
    return [colour_image(c, rng) for c in ["red", "blue", "green", "yellow", "black", "white"][:n]]


def test_score_is_100_times_the_cosine_of_open_clip_embeddings(tiny_model) -> None:  # type: ignore[no-untyped-def]
    config, weights = tiny_model
    hps = HPSModel.load(config, pretrained=str(weights))
    images = _images(2)
    scores = hps.score("a red cube", images)

    # The same pair computed directly with open_clip's own API.
    clip, _, preprocess = open_clip.create_model_and_transforms(TINY_NAME, pretrained=str(weights))
    tokenizer = open_clip.get_tokenizer(TINY_NAME)
    with torch.no_grad():
        image = clip.encode_image(torch.stack([preprocess(i) for i in images]), normalize=True)
        text = clip.encode_text(tokenizer(["a red cube"]), normalize=True)
    expected = (100 * image @ text.T).squeeze(1).tolist()
    assert scores == pytest.approx(expected, abs=1e-4)
    assert scores[0] != pytest.approx(scores[1], abs=1e-2)  # the images do differ
    assert hps.dtype == torch.float32 and hps.device.type == "cpu"


def test_batches_encode_each_distinct_prompt_once(tiny_model, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    config, weights = tiny_model
    hps = HPSModel.load(config, pretrained=str(weights))
    images = _images(6)
    prompts = ["a red cube", "a blue ball"] * 3
    one_by_one = [hps.score(p, [i])[0] for p, i in zip(prompts, images, strict=True)]

    encoded: list[list[str]] = []
    original = hps.clip.encode_text

    def spy(tokens, normalize=False):  # type: ignore[no-untyped-def]
        encoded.append(tokens.shape[0])
        return original(tokens, normalize=normalize)

    monkeypatch.setattr(hps.clip, "encode_text", spy)
    batched = hps.score(prompts, images, batch_size=4)
    assert encoded == [2]  # two distinct prompts, encoded together, once
    assert batched == pytest.approx(one_by_one, abs=1e-4)
    with pytest.raises(ValueError, match="2 prompts for 6 images"):
        hps.score(["a", "b"], images)
    assert hps.score("a red cube", []) == []
    pixels = torch.stack([hps.preprocess(i) for i in images])
    assert hps.score_pixels(prompts, pixels) == pytest.approx(batched, abs=1e-5)


def test_images_as_pil_bytes_or_paths_score_alike(tiny_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config, weights = tiny_model
    hps = HPSModel.load(config, pretrained=str(weights))
    image = _images(1)[0]
    path = tmp_path / "red.png"
    image.save(path)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    scores = hps.score("a red cube", [image, buffer.getvalue(), path, str(path)])
    assert scores == pytest.approx([scores[0]] * 4, abs=1e-6)
    with pytest.raises(ImageError, match="image 2: the image bytes is not a decodable image"):
        hps.score("a red cube", [image, b"not an image"])
    with pytest.raises(ImageError, match="over the limit of 100"):
        hps.score("a red cube", [buffer.getvalue()], max_pixels=100)


def test_saved_version_round_trips_with_identical_scores(tiny_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config, weights = tiny_model
    hps = HPSModel.load(config, pretrained=str(weights), resize_mode="longest", name="v1")
    images = _images(4)
    digest = hps.save(tmp_path / "v1", {"note": "test"})
    assert sorted(p.name for p in (tmp_path / "v1").iterdir()) == [
        "hps.json",
        "model.safetensors",
        "open_clip_config.json",
    ]
    meta = json.loads((tmp_path / "v1" / "hps.json").read_text())
    assert meta["weights_sha256"] == digest and meta["note"] == "test" and meta["name"] == "v1"
    assert meta["base"] == {"model": str(config), "pretrained": str(weights), "checkpoint": None}

    loaded = HPSModel.load(tmp_path / "v1")
    assert loaded.name == "v1" and loaded.preprocess_cfg["resize_mode"] == "longest"
    assert loaded.score("a red cube", images) == hps.score("a red cube", images)
    # Any open_clip program can load a saved version (open_clip's local-dir layout).
    plain = open_clip.create_model(f"local-dir:{tmp_path / 'v1'}")
    assert torch.equal(plain.text_projection, hps.clip.text_projection)
    with pytest.raises(FileExistsError):
        hps.save(tmp_path / "v1")


def test_longest_side_resize_pads_with_zeros(tiny_model) -> None:  # type: ignore[no-untyped-def]
    config, weights = tiny_model
    wide = Image.new("RGB", (64, 16), (255, 255, 255))
    padded = HPSModel.load(config, pretrained=str(weights), resize_mode="longest").preprocess(wide)
    cropped = HPSModel.load(config, pretrained=str(weights)).preprocess(wide)
    black = (0 - torch.tensor(open_clip.OPENAI_DATASET_MEAN)) / torch.tensor(
        open_clip.OPENAI_DATASET_STD
    )
    assert padded.shape == cropped.shape == (3, 32, 32)
    assert torch.allclose(padded[:, 0, 0], black, atol=1e-5)  # a padded corner
    assert padded[:, 16, 16].min() > 1.5  # the white image in the middle
    assert cropped.min() > 1.5  # resize + centre crop: all image, no padding


def test_paper_checkpoint_format_loads(tmp_path: Path) -> None:
    """hpc.pth: an OpenAI-format state dict under "state_dict" with DDP "module." prefixes."""
    checkpoint = tiny_openai_checkpoint(tmp_path, seed=3)
    reference, config = tiny_clip(tmp_path, seed=3)
    images = _images(3)
    hps = HPSModel.load(checkpoint)
    assert hps.model_cfg == {**json.loads(config.read_text()), "quick_gelu": True}
    assert hps.name == "hpc" and hps.preprocess_cfg["resize_mode"] == "shortest"
    direct = HPSModel(
        reference.eval(),
        open_clip.get_tokenizer(TINY_NAME),
        model_cfg=hps.model_cfg,
        preprocess_cfg=hps.preprocess_cfg,
        name="reference",
        base=hps.base,
    )
    assert hps.score("a red cube", images) == direct.score("a red cube", images)

    # open_clip's own OpenAI builder agrees (it rounds the weights through fp16).
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    built = open_clip.model.build_model_from_openai_state_dict(
        {k.removeprefix("module."): v for k, v in state.items()}
    ).float()
    other = HPSModel(
        built, hps.tokenizer, model_cfg=hps.model_cfg, preprocess_cfg=hps.preprocess_cfg,
        name="built", base=hps.base,
    )  # fmt: skip
    assert other.score("a red cube", images) == pytest.approx(
        hps.score("a red cube", images), abs=0.1
    )
    # The same weights as a checkpoint over an architecture name.
    over_arch = HPSModel.load(config, checkpoint=checkpoint)
    assert over_arch.score("a red cube", images) == hps.score("a red cube", images)
    assert openai_model_cfg(hps.clip.state_dict())["vision_cfg"]["layers"] == 2


def test_loading_errors_say_what_is_wrong(tmp_path: Path, tiny_model) -> None:  # type: ignore[no-untyped-def]
    config, _ = tiny_model
    with pytest.raises(ModelLoadError, match="unknown model 'no-such-arch'"):
        HPSModel.load("no-such-arch")
    with pytest.raises(ModelLoadError, match="not a known tag and no such file"):
        HPSModel.load(config, pretrained="no-such-tag")
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="is not a readable model checkpoint"):
        HPSModel.load(broken)
    with pytest.raises(ModelLoadError, match=r"checkpoint .* does not exist"):
        HPSModel.load(config, checkpoint=tmp_path / "absent.pth")
    with pytest.raises(ModelLoadError, match="is not a saved model folder"):
        HPSModel.load(tmp_path)


def test_saved_and_registered_folders_are_durable_and_readable_by_others(
    tiny_model, tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """Files are fsynced before the rename publishes their folder, and the folder has the
    mode the umask gives (0755 here), not the 0700 of a temporary folder."""
    import os
    import stat

    from hps import files
    from pipeline import registry

    config, weights = tiny_model
    synced: list[str] = []
    real_fsync = files.fsync

    def spy(path: Path) -> None:
        synced.append(Path(path).name)
        real_fsync(path)

    monkeypatch.setattr(files, "fsync", spy)
    previous = os.umask(0o022)
    try:
        HPSModel.load(config, pretrained=str(weights)).save(tmp_path / "v1")
        assert stat.S_IMODE((tmp_path / "v1").stat().st_mode) == 0o755
        (tmp_path / "v1").chmod(0o700)  # as checkpoints saved before were
        registry.copy_atomically(tmp_path / "v1", tmp_path / "models" / "v1")
    finally:
        os.umask(previous)
    files = ["hps.json", "model.safetensors", "open_clip_config.json"]
    for folder in (tmp_path / "v1", tmp_path / "models" / "v1"):
        assert sorted(p.name for p in folder.iterdir()) == files
    assert stat.S_IMODE((tmp_path / "models" / "v1").stat().st_mode) == 0o755
    assert sorted(n for n in synced if n in files) == sorted(files * 2)  # saved, then copied
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".")]


def test_batched_preprocessing_gives_the_per_image_transform_bit_for_bit(
    tiny_model, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """Decoding runs a batch ahead in a thread and the tensor steps run once per batch; the
    pixels, and so the scores, are exactly those of the per-image transform."""
    from pipeline.hps_model import _BatchPreprocess
    from pipeline.images import open_image

    config, weights = tiny_model
    sizes = [(64, 48), (31, 77), (32, 32), (200, 100)]
    images: list[Any] = []
    for i, size in enumerate(sizes):
        path = tmp_path / f"{i}.jpg"
        _images(1, seed=i)[0].resize(size).save(path, quality=90)
        images.append(path)
    images.append(Image.new("L", (40, 60), 128))  # greyscale, converted to RGB
    for mode in ("shortest", "longest", "squash"):
        hps = HPSModel.load(config, pretrained=str(weights), resize_mode=mode)
        per_image = torch.stack([hps.transform(open_image(i)) for i in images])
        batched = _BatchPreprocess(hps.transform)
        assert batched.split  # open_clip's transforms take the batched path
        assert torch.equal(batched.finish(batched.load(images, 0, None), hps.device), per_image)
        expected = HPSModel._cosine(
            hps.encode_pixels(per_image[:2]), hps.encode_text(["a red cube"]).expand(2, -1)
        )
        assert hps.score("a red cube", images[:2], batch_size=2) == expected
    with pytest.raises(ImageError, match="image 4: the image bytes is not a decodable image"):
        hps.score("a red cube", [*images[:3], b"junk", images[0]], batch_size=2)
