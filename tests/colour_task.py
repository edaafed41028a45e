"""A synthetic choice task the tiny CLIP (`pipeline.tiny_models.tiny_clip`) can learn.

The task: each round shows K solid-colour images and the prompt names a colour
("a red boat"); the chosen image is the one of that colour. Test prompts (colour-object
pairs) never occur in training, so passing it means reading the colour word.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 40, 220),
    "yellow": (230, 220, 30),
    "purple": (140, 40, 170),
    "orange": (240, 140, 20),
    "white": (240, 240, 240),
    "black": (15, 15, 15),
}
OBJECTS = ["cube", "ball", "car", "house", "tree", "cat", "dog", "cup", "boat", "hat"]


def colour_image(colour: str, rng: random.Random, size: int = 32) -> Image.Image:
    noise = np.random.default_rng(rng.randrange(1 << 30)).normal(0, 20, (size, size, 3))
    pixels = np.clip(np.array(COLOURS[colour], dtype=np.float64) + noise, 0, 255)
    return Image.fromarray(pixels.astype(np.uint8))


def colour_prompts(seed: int = 0, n_test: int = 20) -> tuple[list[str], list[str]]:
    """Disjoint train and test prompts (colour-object pairs)."""
    pairs = [f"a {c} {o}" for c in COLOURS for o in OBJECTS]
    random.Random(seed).shuffle(pairs)
    return pairs[n_test:], pairs[:n_test]


def colour_round(prompt: str, k: int, rng: random.Random) -> tuple[list[str], int]:
    """K distinct colours, one of them the prompt's; returns them and the chosen index."""
    colour = prompt.split()[1]
    colours = [colour, *rng.sample([c for c in COLOURS if c != colour], k - 1)]
    rng.shuffle(colours)
    return colours, colours.index(colour)


def write_colour_hpd(
    folder: Path,
    *,
    n_train: int,
    n_test: int,
    k: int | tuple[int, ...] = 4,
    seed: int = 0,
    users: int = 5,
    name_every: int = 0,
) -> Path:
    """The synthetic task in the paper's HPD layout (JSON files + preference_images/).
    `k` may be a tuple to vary K per record; every `name_every`-th record is flagged
    `contain_name`. Record ids count from 1000."""
    folder = Path(folder)
    images = folder / "preference_images"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    train_prompts, test_prompts = colour_prompts(seed)
    ks = k if isinstance(k, tuple) else (k,)
    next_id = 1000
    for split, n, prompts in (("train", n_train, train_prompts), ("test", n_test, test_prompts)):
        records = []
        for i in range(n):
            prompt = prompts[i % len(prompts)]
            colours, chosen = colour_round(prompt, ks[i % len(ks)], rng)
            files = []
            for j, colour in enumerate(colours):
                name = f"preference_images/{next_id}_{j}.jpg"
                colour_image(colour, rng).save(folder / name, quality=95)
                files.append(name)
            records.append(
                {
                    "human_preference": chosen,
                    "prompt": prompt,
                    "id": next_id,
                    "file_path": files,
                    "user_hash": f"user{next_id % users:04d}",
                    "contain_name": bool(name_every) and next_id % name_every == 0,
                }
            )
            next_id += 1
        (folder / f"preference_{split}.json").write_text(json.dumps(records, indent=1))
    return folder
