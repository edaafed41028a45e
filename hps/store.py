"""The store: where images and model versions live, on this machine or in an S3 bucket.

One interface, `ObjectStore` (keys to bytes), with two backends:

- `LocalObjects`: a folder, `data_dir` by default (the single-machine set-up). Files are
  written through `hps.files.replacing` (a temporary name, fsync, rename), so a reader
  never sees a partial file and a crash leaves at most a stray temp file.
- `S3Objects`: an S3-compatible bucket under a prefix (AWS S3, MinIO, Cloudflare R2, GCS's
  interoperability API), through obstore (its Rust `object_store` client: native async,
  multipart uploads, streamed downloads, its own retries with backoff). A PUT is atomic: an
  object appears whole or not at all, multipart uploads included.

Every operation has a blocking form (`get`: code in threads, such as the model cache,
exports and the scoring thread) and an `_async` form (`get_async`: the bot's and the
worker's event loops, where S3 calls need no thread at all), paired as obstore pairs its
own. obstore's client cannot be used in a forked child process (its runtime does not
survive a fork), so DataLoader worker processes never read the store: training reads a
local copy of its images (`ImageCache`).

Layout under the store's root (the folder, or the bucket's prefix):

- `images/ab/cd/<sha256>.<ext>`: images, content-addressed (`ImageStore`); image rows keep
  the key below `images/` (`ab/cd/<sha256>.png`), as they always did.
- `models/<name>/<sha256>/…`: published model versions (`hps.model_store`).

Errors: `StoreError` for a malformed key or an object that is not there (a permanent
condition: retrying cannot help); `StoreUnavailable` when the store cannot be used now (it
cannot be reached, refuses the credentials, or the bucket is missing), with a message that
names the setting to check. Jobs retry on the second and give up on the first.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from hps.files import replacing

if TYPE_CHECKING:
    from hps.settings import StoreSettings

_KEY = re.compile(r"^[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{64}\.[a-z0-9]{1,5}$")
_SUFFIX = re.compile(r"^\.[a-z0-9]{1,5}$")
_OBJECT_KEY = re.compile(r"^(?!.*(^|/)\.\.?(/|$))[A-Za-z0-9._/-]{1,1000}$")
CHUNK = 8 * 1024 * 1024  # streamed reads and multipart parts


class StoreError(Exception):
    """A key that is malformed or not in the store."""


class StoreUnavailable(ConnectionError):
    """The store cannot be used now: unreachable, credentials refused, bucket missing. The
    message says which, names the store (never a secret) and the setting to check."""


@dataclass(frozen=True)
class StoredBlob:
    key: str
    sha256: str
    size: int
    created: bool  # False when the same bytes were already stored


def key_for(sha256: str, suffix: str) -> str:
    """The storage key of an image with this digest and file suffix (e.g. `.png`)."""
    if not _SUFFIX.match(suffix):
        raise StoreError(f"bad suffix {suffix!r}")
    return f"{sha256[:2]}/{sha256[2:4]}/{sha256}{suffix}"


def check_key(key: str) -> str:
    if not _KEY.match(key):
        raise StoreError(f"malformed storage key {key!r}")
    return key


def check_object_key(key: str) -> str:
    """A key of the object store: relative, `/`-separated, no `.` or `..` parts."""
    if not _OBJECT_KEY.match(key) or key.startswith("/") or "//" in key:
        raise StoreError(f"malformed object key {key!r}")
    return key


@runtime_checkable
class ObjectStore(Protocol):
    """Keys to immutable bytes. `within(prefix)` is the same store under a sub-prefix."""

    description: str  # for messages: the folder, or s3://bucket/prefix at its endpoint

    def within(self, prefix: str) -> ObjectStore: ...
    def put(self, key: str, data: bytes) -> None: ...
    def create(self, key: str, data: bytes) -> bool: ...  # False (nothing written): it exists
    def put_file(self, key: str, path: Path) -> None: ...  # streamed (multipart on S3)
    def get(self, key: str) -> bytes: ...
    def chunks(self, key: str) -> Iterator[bytes]: ...  # streamed read
    def size(self, key: str) -> int | None: ...  # None: not there
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> bool: ...
    def listing(self, prefix: str = "") -> Iterator[tuple[str, int]]: ...  # (key, size)
    async def put_async(self, key: str, data: bytes) -> None: ...
    async def create_async(self, key: str, data: bytes) -> bool: ...
    async def get_async(self, key: str) -> bytes: ...
    async def exists_async(self, key: str) -> bool: ...
    def check(self) -> None: ...  # StoreUnavailable, naming the setting, if unusable


# -- a folder ------------------------------------------------------------------------------


class LocalObjects:
    """Objects as files under `root` (a local or network-mounted folder)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.description = f"the folder {self.root}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (LocalObjects, (self.root,))

    def within(self, prefix: str) -> LocalObjects:
        return LocalObjects(self.root / check_object_key(prefix))

    def path(self, key: str) -> Path:
        return self.root / check_object_key(key)

    def put(self, key: str, data: bytes) -> None:
        with replacing(self.path(key)) as tmp:
            tmp.write_bytes(data)
            tmp.chmod(0o644)

    def create(self, key: str, data: bytes) -> bool:
        if self.exists(key):
            return False
        self.put(key, data)  # two writers of the same key both succeed with one file
        return True

    def put_file(self, key: str, path: Path) -> None:
        with replacing(self.path(key)) as tmp, open(path, "rb") as src, open(tmp, "wb") as dst:
            while block := src.read(CHUNK):
                dst.write(block)
            tmp.chmod(0o644)

    def get(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise StoreError(f"no object {key!r} in the store") from None

    def chunks(self, key: str) -> Iterator[bytes]:
        try:
            fh = open(self.path(key), "rb")  # noqa: SIM115 (closed when the generator ends)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise StoreError(f"no object {key!r} in the store") from None
        with fh:
            while block := fh.read(CHUNK):
                yield block

    def size(self, key: str) -> int | None:
        path = self.path(key)
        return path.stat().st_size if path.is_file() else None

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def delete(self, key: str) -> bool:
        try:
            self.path(key).unlink()
        except FileNotFoundError:
            return False
        return True

    def listing(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        base = self.path(prefix) if prefix else self.root
        if not base.is_dir():
            return
        for folder, dirs, files in os.walk(base):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # temporaries
            for name in sorted(files):
                if not name.startswith("."):
                    path = Path(folder) / name
                    yield path.relative_to(self.root).as_posix(), path.stat().st_size

    async def put_async(self, key: str, data: bytes) -> None:
        await asyncio.to_thread(self.put, key, data)

    async def create_async(self, key: str, data: bytes) -> bool:
        return await asyncio.to_thread(self.create, key, data)

    async def get_async(self, key: str) -> bytes:
        return await asyncio.to_thread(self.get, key)

    async def exists_async(self, key: str) -> bool:
        return await asyncio.to_thread(self.exists, key)

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(
                f"cannot use {self.description}: {exc.strerror or exc}. Check store.url "
                "(HPS_STORE__URL) and data_dir (HPS_DATA_DIR)."
            ) from None


# -- an S3 bucket --------------------------------------------------------------------------

# Requests fail fast enough that a job (which retries with its own backoff) or a start-up
# check never hangs on an unreachable store; obstore retries transient errors in between.
CLIENT_OPTIONS = {"connect_timeout": timedelta(seconds=5), "timeout": timedelta(seconds=120)}
# An image's upload (the async writes of `ImageStore`) gives up after this many seconds, its
# retries included: callers upload inside a transaction that holds row and key locks (a
# round's images), which a hung endpoint must not hold for minutes.
UPLOAD_DEADLINE = 8.0  # seconds, store.upload_timeout_seconds
RETRIES = {
    "max_retries": 3,
    "retry_timeout": timedelta(seconds=30),
    "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=5)},
}


class S3Objects:
    """Objects in an S3-compatible bucket, under the URL's prefix."""

    def __init__(self, config: StoreSettings, prefix: str = "") -> None:
        bucket, _, base = config.url.removeprefix("s3://").partition("/")
        self.config, self.bucket = config, bucket
        self.prefix = "/".join(p for p in (base.strip("/"), prefix.strip("/")) if p)
        where = f" at {config.endpoint_url}" if config.endpoint_url else ""
        self.description = f"s3://{'/'.join(p for p in (bucket, self.prefix) if p)}{where}"
        self.store = self._client()
        self._checked: Any = None  # the client of `put_file`, made on first use

    def __reduce__(self) -> tuple[Any, ...]:
        return (S3Objects, (self.config, self.prefix_below_url))

    @property
    def prefix_below_url(self) -> str:
        base = self.config.url.removeprefix("s3://").partition("/")[2].strip("/")
        return self.prefix.removeprefix(base).strip("/")

    def _client(self, checksum: bool = False) -> Any:
        from obstore.store import S3Store

        c = self.config
        options: dict[str, Any] = dict(CLIENT_OPTIONS)
        kwargs: dict[str, Any] = {"region": c.region}
        if c.endpoint_url:
            kwargs["endpoint"] = c.endpoint_url
            options["allow_http"] = c.endpoint_url.startswith("http://")
        if c.access_key_id:
            kwargs["access_key_id"] = c.access_key_id
        if c.secret_access_key is not None:
            kwargs["secret_access_key"] = c.secret_access_key.get_secret_value()
        if c.session_token is not None:
            kwargs["token"] = c.session_token.get_secret_value()
        if checksum:
            # The server checks every upload (each part of a multipart one) against the
            # SHA-256 the client computed: a corrupted transfer is refused, never stored.
            kwargs["checksum_algorithm"] = "sha256"
        return S3Store(
            self.bucket,
            prefix=self.prefix or None,
            client_options=options,
            retry_config=RETRIES,
            **kwargs,
        )

    def within(self, prefix: str) -> S3Objects:
        return S3Objects(self.config, "/".join(p for p in (self.prefix_below_url, prefix) if p))

    def _failed(self, exc: Exception, key: str | None = None) -> Exception:
        return failure(exc, self.description, self.bucket, key)

    def put(self, key: str, data: bytes) -> None:
        import obstore

        try:
            obstore.put(self.store, check_object_key(key), data)
        except Exception as exc:
            raise self._failed(exc, key) from None

    def create(self, key: str, data: bytes) -> bool:
        import obstore
        import obstore.exceptions as oe

        try:
            # One conditional request (If-None-Match: *): written unless the key exists.
            obstore.put(self.store, check_object_key(key), data, mode="create")
        except (oe.AlreadyExistsError, oe.PreconditionError):
            return False
        except Exception as exc:
            raise self._failed(exc, key) from None
        return True

    def put_file(self, key: str, path: Path) -> None:
        import obstore

        try:
            # A file larger than one part goes up in parts, read as they are sent.
            if self._checked is None:
                self._checked = self._client(checksum=True)
            # At most 4 parts in flight: memory stays under 4 × CHUNK whatever the size.
            obstore.put(
                self._checked, check_object_key(key), Path(path), chunk_size=CHUNK,
                max_concurrency=4,
            )  # fmt: skip
        except Exception as exc:
            raise self._failed(exc, key) from None

    def get(self, key: str) -> bytes:
        import obstore

        try:
            return bytes(obstore.get(self.store, check_object_key(key)).bytes())
        except Exception as exc:
            raise self._failed(exc, key) from None

    def chunks(self, key: str) -> Iterator[bytes]:
        import obstore

        try:
            result = obstore.get(self.store, check_object_key(key))
            for block in result.stream(min_chunk_size=CHUNK):
                yield bytes(block)
        except Exception as exc:
            raise self._failed(exc, key) from None

    def size(self, key: str) -> int | None:
        import obstore

        try:
            return int(obstore.head(self.store, check_object_key(key))["size"])
        except Exception as exc:
            error = self._failed(exc, key)
            if isinstance(error, StoreError):
                return None
            raise error from None

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    def delete(self, key: str) -> bool:
        import obstore

        # S3 answers a DELETE of a missing key with success: ask first, for the count.
        if not self.exists(key):
            return False
        try:
            obstore.delete(self.store, check_object_key(key))
        except Exception as exc:
            raise self._failed(exc, key) from None
        return True

    def listing(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        import obstore

        try:
            for page in obstore.list(self.store, prefix or None, chunk_size=1000):
                for meta in page:
                    yield str(meta["path"]), int(meta["size"])
        except Exception as exc:
            raise self._failed(exc) from None

    async def put_async(self, key: str, data: bytes) -> None:
        import obstore

        try:
            await obstore.put_async(self.store, check_object_key(key), data)
        except Exception as exc:
            raise self._failed(exc, key) from None

    async def create_async(self, key: str, data: bytes) -> bool:
        import obstore
        import obstore.exceptions as oe

        try:
            await obstore.put_async(self.store, check_object_key(key), data, mode="create")
        except (oe.AlreadyExistsError, oe.PreconditionError):
            return False
        except Exception as exc:
            raise self._failed(exc, key) from None
        return True

    async def get_async(self, key: str) -> bytes:
        import obstore

        try:
            result = await obstore.get_async(self.store, check_object_key(key))
            return bytes(await result.bytes_async())
        except Exception as exc:
            raise self._failed(exc, key) from None

    async def exists_async(self, key: str) -> bool:
        import obstore

        try:
            await obstore.head_async(self.store, check_object_key(key))
        except Exception as exc:
            error = self._failed(exc, key)
            if isinstance(error, StoreError):
                return False
            raise error from None
        return True

    def check(self) -> None:
        """List one page under the prefix: the cheapest request that fails for a missing
        bucket (a HEAD of a missing key cannot tell one from a missing bucket)."""
        import obstore

        try:
            obstore.list_with_delimiter(self.store, None)
        except Exception as exc:
            raise self._failed(exc) from None


def failure(exc: Exception, where: str, bucket: str, key: str | None = None) -> Exception:
    """obstore's exception as ours: `StoreError` for an absent object, else
    `StoreUnavailable` with one line naming the setting to check."""
    import obstore.exceptions as oe

    if isinstance(exc, StoreError | StoreUnavailable):  # ours already (a malformed key)
        return exc
    text = str(exc)
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    if "NoSuchBucket" in text:
        return StoreUnavailable(
            f"cannot use the object store {where}: the bucket {bucket!r} does not exist. "
            "Check store.url (HPS_STORE__URL), or create the bucket."
        )
    if isinstance(exc, FileNotFoundError | oe.NotFoundError):
        return StoreError(f"no object {key!r} in the store")
    if isinstance(exc, oe.PermissionDeniedError | oe.UnauthenticatedError) or any(
        code in text
        for code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403 Forbidden")
    ):
        return StoreUnavailable(
            f"the object store {where} refused the credentials ({_reason(text, first)}). "
            "Check store.access_key_id and store.secret_access_key "
            "(HPS_STORE__ACCESS_KEY_ID, HPS_STORE__SECRET_ACCESS_KEY)."
        )
    if isinstance(exc, oe.BaseError | OSError):
        return StoreUnavailable(
            f"cannot reach the object store {where}: {_reason(text, first)}. "
            "Check store.endpoint_url (HPS_STORE__ENDPOINT_URL) and store.url (HPS_STORE__URL)."
        )
    return exc


def _reason(text: str, first: str) -> str:
    """A short cause from obstore's multi-line message."""
    for code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"):
        if code in text:
            return code
    if "error sending request" in text or "Connection refused" in text:
        return "connection failed"
    if "timed out" in text.lower():
        return "timed out"
    return first[:200]


# -- images --------------------------------------------------------------------------------


class ImageStore:
    """Content-addressed images: a blob's key is derived from the SHA-256 of its bytes,
    `ab/cd/abcd…ef.png` (two levels of two-hex-digit shards keep folders small). Writing
    the same bytes twice stores them once, and what is read is checked against its key (a
    corrupt file or a damaged transfer is a `StoreError`, never an image shown)."""

    def __init__(self, objects: ObjectStore, upload_timeout: float = UPLOAD_DEADLINE) -> None:
        self.objects = objects
        self.upload_timeout = upload_timeout

    def __reduce__(self) -> tuple[Any, ...]:
        return (ImageStore, (self.objects, self.upload_timeout))

    @staticmethod
    def _key(data: bytes, suffix: str) -> tuple[str, str]:
        digest = hashlib.sha256(data).hexdigest()
        return key_for(digest, suffix), digest

    def blob(self, data: bytes, suffix: str = ".png") -> StoredBlob:
        """The key and digest these bytes are stored under, without storing them."""
        key, digest = self._key(data, suffix)
        return StoredBlob(key, digest, len(data), created=False)

    def put(self, data: bytes, suffix: str = ".png") -> StoredBlob:
        key, digest = self._key(data, suffix)
        # Atomic; two writers of the same bytes both succeed with one object.
        return StoredBlob(key, digest, len(data), created=self.objects.create(key, data))

    def get(self, key: str) -> bytes:
        check_key(key)
        try:
            return _verified(key, self.objects.get(key))
        except StoreError as exc:
            raise _absent(key, exc) from None

    def exists(self, key: str) -> bool:
        return self.objects.exists(check_key(key))

    def delete(self, key: str) -> bool:
        return self.objects.delete(check_key(key))

    async def put_async(self, data: bytes, suffix: str = ".png") -> StoredBlob:
        """Store `data` (`StoreUnavailable` past `upload_timeout`, as for every async
        write here)."""
        key, digest = self._key(data, suffix)
        created = await self._deadline(self.objects.create_async(key, data), key)
        return StoredBlob(key, digest, len(data), created=created)

    async def ensure_async(self, data: bytes, suffix: str = ".png") -> StoredBlob:
        """`put_async` that asks first: one small request when the bytes are stored, as
        they are when a transaction puts its images again under their key locks (in case
        a deletion of equal bytes came in between) before it commits."""
        key, digest = self._key(data, suffix)

        async def ensure() -> bool:
            if await self.objects.exists_async(key):
                return False
            await self.objects.put_async(key, data)
            return True

        created = await self._deadline(ensure(), key)
        return StoredBlob(key, digest, len(data), created=created)

    async def _deadline(self, work: Awaitable[bool], key: str) -> bool:
        try:
            return await asyncio.wait_for(work, self.upload_timeout)
        except TimeoutError:
            # An upload cut off here may still land later: the file is unreferenced, and
            # `hps store gc` collects it.
            raise StoreUnavailable(
                f"the object store {self.objects.description} did not store {key} within "
                f"{self.upload_timeout:g} s. Check store.endpoint_url (HPS_STORE__ENDPOINT_URL) "
                "and that the store answers; on a slow link, raise store.upload_timeout_seconds "
                "(HPS_STORE__UPLOAD_TIMEOUT_SECONDS)."
            ) from None

    async def get_async(self, key: str) -> bytes:
        check_key(key)
        try:
            return _verified(key, await self.objects.get_async(key))
        except StoreError as exc:
            raise _absent(key, exc) from None


def _verified(key: str, data: bytes) -> bytes:
    if hashlib.sha256(data).hexdigest() != key.rsplit("/", 1)[-1].partition(".")[0]:
        raise StoreError(f"blob {key!r} is corrupt: its bytes do not match its key")
    return data


def _absent(key: str, exc: StoreError) -> StoreError:
    return exc if "corrupt" in str(exc) else StoreError(f"no blob {key!r} in the store")


class LocalImageStore(ImageStore):
    """The image store in a local (or network-mounted) folder."""

    def __init__(self, root: Path) -> None:
        super().__init__(LocalObjects(root))
        self.root = Path(root)

    def __reduce__(self) -> tuple[Any, ...]:
        return (LocalImageStore, (self.root,))

    def path(self, key: str) -> Path:
        """The file holding `key` (local stores only)."""
        return self.root / check_key(key)


class ImageCache:
    """A local copy of the images a training run reads, content-addressed like the store
    (in the run's folder, deleted when the run ends: `Storage.reader`): DataLoader worker
    processes read these files (they cannot use the S3 client), and every epoch reads the
    disk rather than the network. Each image is verified against its key's SHA-256 when it
    is fetched; the copy may be deleted at any time."""

    def __init__(self, store: ImageStore, folder: Path) -> None:
        self.store, self.local = store, LocalImageStore(folder)

    async def fill(self, keys: list[str], concurrency: int = 32) -> LocalImageStore:
        """Fetch the images among `keys` not here yet; returns the local store to read."""
        missing = [k for k in dict.fromkeys(keys) if not self.local.exists(k)]
        limit = asyncio.Semaphore(concurrency)

        async def fetch(key: str) -> None:
            async with limit:
                data = await self.store.get_async(key)  # checked against its key
            await asyncio.to_thread(self.local.put, data, Path(key).suffix)

        await asyncio.gather(*(fetch(k) for k in missing))
        return self.local
