"""The configured store (`store.*` settings): its objects, the images under `images/`, the
published model versions under `models/`, and this machine's cache folder of versions
fetched from an object store. One client per configuration and process
(`storage(settings)`), so connections are reused across calls.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from hps.model_store import ModelStore
from hps.settings import Settings
from hps.store import ImageCache, ImageStore, LocalObjects, ObjectStore, S3Objects


@dataclass(frozen=True)
class Storage:
    """The configured store: its objects, the images under `images/`, and the local cache
    folder of model versions."""

    objects: ObjectStore
    images: ImageStore
    cache_dir: Path
    cache_max_bytes: int

    @property
    def is_local(self) -> bool:
        return isinstance(self.objects, LocalObjects)

    @cached_property
    def models(self) -> ModelStore:
        """Published model versions (see `hps.model_store`)."""
        cache = None if self.is_local else self.cache_dir / "models"
        return ModelStore(self.objects, cache, self.cache_max_bytes)

    async def reader(self, keys: Iterable[str], copies: Path) -> Callable[[str], bytes]:
        """How training and evaluation read these images (in DataLoader worker processes):
        the store's own folder; or, for an object store, copies of them in the folder
        `copies`, fetched now and verified by hash (obstore's client does not survive the
        fork of a DataLoader worker, and every epoch then reads the disk). The caller
        removes `copies` when it is done, whether it succeeded or not: images deleted from
        the store (a person forgotten) must not live on in a copy."""
        if self.is_local:
            return self.images.get
        return (await ImageCache(self.images, copies).fill(list(keys))).get

    def check(self) -> None:
        """`StoreUnavailable` (one line, naming the setting) unless the store answers."""
        self.objects.check()

    async def check_async(self) -> None:
        await asyncio.to_thread(self.check)


def open_objects(settings: Settings) -> ObjectStore:
    folder = settings.store_folder
    return LocalObjects(folder) if folder is not None else S3Objects(settings.store)


_OPENED: dict[str, Storage] = {}


def storage(settings: Settings) -> Storage:
    """The configured store (one client per configuration and process)."""
    ident = f"{settings.data_dir}|{settings.cache_dir}|{settings.store.model_dump_json()}"
    if settings.store.secret_access_key is not None:  # dumped as stars: tell keys apart
        secret = settings.store.secret_access_key.get_secret_value().encode()
        ident += hashlib.sha256(secret).hexdigest()
    found = _OPENED.get(ident)
    if found is None:
        objects = open_objects(settings)
        found = _OPENED[ident] = Storage(
            objects,
            ImageStore(objects.within("images"), settings.store.upload_timeout_seconds),
            settings.cache_dir,
            int(settings.store.cache_max_gib * 1024**3),
        )
    return found
