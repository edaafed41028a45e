"""Test data built through the real data layer (never by hand-written INSERTs)."""

from __future__ import annotations

import hashlib
import io

from PIL import Image as PILImage

from db import rounds
from db.connect import Executor
from db.images import NewImage
from hps.store import ImageStore


def fake_image(round_id: int, position: int, **fields: object) -> NewImage:
    digest = hashlib.sha256(f"round {round_id} image {position}".encode()).hexdigest()
    return NewImage(
        position=position,
        sha256=digest,
        storage_key=f"{digest[:2]}/{digest[2:4]}/{digest}.png",
        seed=1000 + position,
        width=64,
        height=64,
        **fields,  # type: ignore[arg-type]
    )


async def queued_round(
    db: Executor,
    *,
    requester: int = 1000,
    prompt: str = "a red cube",
    k: int = 4,
    guild_id: int | None = None,
    channel_id: int | None = None,
    negative_prompt: str = "",
) -> int:
    """A round asked for (in a Discord channel, if given), its generate job queued."""
    created = await rounds.create_round(
        db,
        requester_discord_id=requester,
        prompt=prompt,
        negative_prompt=negative_prompt,
        k=k,
        guild_id=guild_id,
        channel_id=channel_id,
    )
    return created.round.id


async def ready_round(
    db: Executor,
    *,
    requester: int = 1000,
    prompt: str = "a red cube",
    k: int = 4,
    nsfw_positions: tuple[int, ...] = (),
    model_version_ids: dict[int, int] | None = None,
    incumbent_id: int | None = None,
    negative_prompt: str = "",
) -> int:
    """A round whose K images are stored and that accepts choices (`incumbent_id`: the
    version that served it, as a generate job records its plan's)."""
    round_id = await queued_round(
        db, requester=requester, prompt=prompt, k=k, negative_prompt=negative_prompt
    )
    assert await rounds.start_generating(db, round_id) is not None
    versions = model_version_ids or {}
    images = [
        fake_image(round_id, p, nsfw=p in nsfw_positions, model_version_id=versions.get(p))
        for p in range(1, k + 1)
    ]
    assert await rounds.finish_round(db, round_id, images, incumbent_id=incumbent_id)
    return round_id


# Distinct colours for stored rounds' images (position 1 is the first).
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")


async def stored_round(
    db: Executor,
    store: ImageStore,
    *,
    requester: int = 1000,
    prompt: str = "a red cube",
    k: int = 3,
    nsfw_positions: tuple[int, ...] = (),
    model_version_ids: dict[int, int] | None = None,
    channel_id: int | None = None,
    negative_prompt: str = "",
) -> int:
    """A ready round whose K images are real PNG files in `store`: image p is a solid
    `COLOURS[p - 1]` of 8p x 8 pixels but for its bottom-right pixel, which holds the round
    id (so that no two rounds share a file). `channel_id`: asked for there (no guild)."""
    round_id = await queued_round(
        db,
        requester=requester,
        prompt=prompt,
        k=k,
        channel_id=channel_id,
        negative_prompt=negative_prompt,
    )
    assert await rounds.start_generating(db, round_id) is not None
    versions = model_version_ids or {}
    images = []
    for position in range(1, k + 1):
        image = PILImage.new("RGB", (8 * position, 8), COLOURS[position - 1])
        image.putpixel((8 * position - 1, 7), (round_id % 256, round_id // 256 % 256, 7))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        blob = store.put(buffer.getvalue())
        images.append(
            NewImage(
                position,
                blob.sha256,
                blob.key,
                seed=1000 + position,
                width=8 * position,
                height=8,
                nsfw=position in nsfw_positions,
                model_version_id=versions.get(position),
            )
        )
    assert await rounds.finish_round(db, round_id, images)
    return round_id
