"""The prompts an adaptation learns from: who counts, deduplication, the held-out split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from db import prompts, rounds, users
from hps.settings import AdaptSettings
from pipeline.adapt.prompts import (
    PromptFileError,
    is_held_out,
    read_prompt_file,
    sample_prompts,
    split_prompts,
)


async def test_prompts_people_used_who_still_count(pool, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    async def dream(user: int, prompt: str, negative: str = "") -> None:
        await rounds.create_round(
            pool, requester_discord_id=user, prompt=prompt, negative_prompt=negative, k=4
        )

    await dream(1, "a red cube")
    await dream(1, "A  RED cube", negative="blurry")  # another row, the same prompt text
    await prompts.ensure_prompt(pool, "a portrait of Ada Lovelace", contains_name=True)
    await dream(1, "a portrait of Ada Lovelace")
    await dream(2, "spam from a banned user")
    await dream(2, "a blue cone")
    await dream(1, "a blue cone")  # also used by someone who counts
    await dream(3, "a shadow-banned prompt")
    await dream(4, "a forgotten prompt")
    await prompts.ensure_prompt(pool, "a prompt no round used")
    await users.ban(pool, 2, reason="spam", actor="test")
    await users.ban(pool, 3, shadow=True, reason="spam", actor="test")
    await users.forget_user(pool, 4)

    assert await prompts.adaptation_prompts(pool) == ["a red cube", "A  RED cube", "a blue cone"]
    assert await prompts.adaptation_prompts(pool, include_contains_name=True) == [
        "a red cube",
        "A  RED cube",
        "a portrait of Ada Lovelace",
        "a blue cone",
    ]
    extra = tmp_path / "extra.txt"
    extra.write_text("a green ball\n\n a red cube \n")
    split = await sample_prompts(
        pool, AdaptSettings(prompt_file=extra, heldout_fraction=0.01, min_prompts=1)
    )
    # Deduplicated by normalised text (the first spelling kept), the file's prompts added.
    assert sorted(split.train + split.heldout) == ["a blue cone", "a green ball", "a red cube"]


def test_the_held_out_split_is_by_hash_stable_and_never_trained_on() -> None:
    texts = [f"a prompt about thing number {i}" for i in range(400)]
    split = split_prompts(texts, heldout_fraction=0.2, max_prompts=1000, max_heldout=1000, seed=42)
    assert set(split.train).isdisjoint(split.heldout)
    assert len(split.train) + len(split.heldout) == 400
    assert 50 <= len(split.heldout) <= 110  # 80 expected
    assert all(is_held_out(t, 0.2) for t in split.heldout)
    assert not any(is_held_out(t, 0.2) for t in split.train)
    # More prompts later, another seed, another order: the held-out ones stay held out.
    grown = split_prompts(
        [*reversed(texts), *(f"new prompt {i}" for i in range(100))],
        heldout_fraction=0.2,
        max_prompts=1000,
        max_heldout=1000,
        seed=7,
    )
    assert set(split.heldout) <= set(grown.heldout)
    assert set(split.train) <= set(grown.train)
    # Caps: a seeded sample of each side.
    capped = split_prompts(texts, heldout_fraction=0.2, max_prompts=10, max_heldout=3, seed=42)
    again = split_prompts(texts, heldout_fraction=0.2, max_prompts=10, max_heldout=3, seed=42)
    other = split_prompts(texts, heldout_fraction=0.2, max_prompts=10, max_heldout=3, seed=43)
    assert (len(capped.train), len(capped.heldout)) == (10, 3)
    assert capped == again and capped.train != other.train
    assert set(capped.train) <= set(split.train)


def test_prompt_files(tmp_path: Path) -> None:
    listed = tmp_path / "prompts.json"
    listed.write_text(json.dumps(["a cat", " ", "a dog"]))
    assert read_prompt_file(listed) == ["a cat", "a dog"]
    (tmp_path / "bad.json").write_text(json.dumps({"prompt": "a cat"}))
    with pytest.raises(PromptFileError, match="must hold a JSON list of strings"):
        read_prompt_file(tmp_path / "bad.json")
    with pytest.raises(PromptFileError, match="cannot read the prompt file"):
        read_prompt_file(tmp_path / "missing.txt")
