"""The S3 backend of the artifact store (actors.runtime.store): objects in a bucket, under
a prefix, on AWS or any S3-compatible service (SeaweedFS, MinIO, R2, ...).

Through **obstore** (Rust `object_store` under a thin Python layer): async-native (no
thread per request, no event loop blocked), multipart uploads built in (a file longer than
a part goes up in parts, several at once, and a failed upload is aborted), retries with
backoff on 5xx and dropped connections, and no botocore (no 100 MB of dependency, no
sync-only client wrapped in threads). boto3 would need all of that written around it.

Timeouts: object_store's default limit of 30 s for a whole request would cut the download
of a big checkpoint short, so a request may last an hour, and a read that stalls for a
minute fails (and is retried) instead.

This module knows nothing of pointers or folders: it moves one object at a time, and
signals errors as store.py expects of every backend: the user's configuration (refused
credentials, no such bucket, a request the service rejects as malformed) → `UserError`; an
object that is not there → `FileNotFoundError`; anything else (connection refused, 5xx,
timeouts) is left as it is, transient, and store.py turns it into `StoreError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Literal

import obstore
from obstore.exceptions import (
    InvalidPathError,
    NotSupportedError,
    PermissionDeniedError,
    UnauthenticatedError,
    UnknownConfigurationKeyError,
)
from obstore.store import S3Store

from trainer.errors import UserError

if TYPE_CHECKING:
    from obstore.store import ClientConfig, S3Config

PART = 8 << 20  # multipart part size: S3 wants >= 5 MiB; bigger parts, fewer requests
CHUNK = 2 << 20  # download chunks written (and hashed) at a time
_STATUS = re.compile(r"status code: (\d{3})")


def _first_line(e: BaseException) -> str:
    return str(e).strip().split("\n", 1)[0][:300]


class S3Objects:
    backend: Literal["s3"] = "s3"
    content_addressed = False
    can_list = True

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        region: str | None = None,
        retry_timeout_s: float = 30.0,
        max_concurrency: int = 8,
    ) -> None:
        """Values left None come from the environment as obstore reads it (AWS_SESSION_TOKEN,
        web identity, instance metadata...); an http:// endpoint is allowed (a local server)."""
        if not bucket:
            raise UserError("MT_STORE_URL: an S3 store needs a bucket (s3://bucket/prefix)")
        self.bucket = bucket
        self.max_concurrency = max_concurrency
        config: S3Config = {}
        if endpoint:
            config["endpoint"] = endpoint
        if access_key_id:
            config["access_key_id"] = access_key_id
        if secret_access_key:
            config["secret_access_key"] = secret_access_key
        if region:
            config["region"] = region
        client: ClientConfig = {"timeout": "1h", "read_timeout": "60s", "connect_timeout": "5s"}
        if endpoint and endpoint.startswith("http://"):
            client["allow_http"] = True
        try:
            self._s3 = S3Store(
                bucket,
                prefix=prefix.strip("/") or None,
                config=config,
                client_options=client,
                retry_config={
                    "max_retries": 10,
                    "retry_timeout": timedelta(seconds=retry_timeout_s),
                    "backoff": {
                        "init_backoff": timedelta(milliseconds=100),
                        "max_backoff": timedelta(seconds=5),
                        "base": 2,
                    },
                },
            )
        except (obstore.exceptions.BaseError, ValueError) as e:
            raise UserError(f"the S3 store's configuration is refused: {_first_line(e)}") from e

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except (InvalidPathError, NotSupportedError, UnknownConfigurationKeyError) as e:
            raise UserError(f"the S3 store refused {what}: {_first_line(e)}") from e
        except (FileNotFoundError, obstore.exceptions.BaseError) as e:
            found = _STATUS.search(str(e))
            status = int(found.group(1)) if found else 0
            # A list request's refusal comes as a generic error: read the status.
            if isinstance(e, PermissionDeniedError | UnauthenticatedError) or status in (401, 403):
                raise UserError(
                    f"the S3 service refused the credentials while {what} ({_first_line(e)}); "
                    "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
                ) from e
            if "NoSuchBucket" in str(e):
                raise UserError(
                    f"the bucket {self.bucket!r} does not exist ({what}); create it, or fix "
                    "MT_STORE_URL"
                ) from e
            if isinstance(e, FileNotFoundError):
                raise FileNotFoundError(f"{what}: no such object in the bucket") from e
            if 400 <= status < 500 and status not in (404, 408, 409, 429):
                raise UserError(f"the S3 service refused {what}: {_first_line(e)}") from e
            raise

    async def put(self, src: Path, key: str) -> str:
        with self._errors(f"uploading {key}"):
            await obstore.put_async(
                self._s3, key, src, chunk_size=PART, max_concurrency=self.max_concurrency
            )
        return key

    async def download(self, address: str, part: Path, sha256: str) -> str:
        digest = hashlib.sha256()
        with self._errors(f"downloading {address}"):
            got = await obstore.get_async(self._s3, address)
            f = await asyncio.to_thread(part.open, "wb")
            writing: asyncio.Task[None] | None = None
            try:
                async for chunk in got.stream(min_chunk_size=CHUNK):
                    if writing is not None:
                        await writing
                    # Hashed and written in a thread while the next chunk comes in.
                    writing = asyncio.create_task(asyncio.to_thread(_write, f, digest, chunk))
                if writing is not None:
                    await writing
            finally:
                if writing is not None and not writing.done():
                    await asyncio.wait([writing])  # the thread is using the file
                await asyncio.to_thread(f.close)
        return digest.hexdigest()

    async def exists(self, address: str, size: int) -> bool:
        with self._errors(f"looking up {address}"):
            try:
                meta = await obstore.head_async(self._s3, address)
            except FileNotFoundError:
                # HEAD answers a bare 404 for a missing bucket too: tell the two apart.
                await obstore.list_with_delimiter_async(self._s3, prefix=address)
                return False
        return size in (-1, meta["size"])  # -1: any size

    async def keys(self, prefix: str) -> list[str]:
        out: list[str] = []
        with self._errors(f"listing {prefix or 'the store'}"):
            async for batch in obstore.list(self._s3, prefix=prefix or None, chunk_size=1000):
                out.extend(meta["path"] for meta in batch)
        return out

    async def delete(self, keys: list[str]) -> None:
        if not keys:
            return
        with self._errors(f"deleting {keys[0] if len(keys) == 1 else f'{len(keys)} objects'}"):
            for start in range(0, len(keys), 1000):  # a DeleteObjects request takes 1000
                await obstore.delete_async(self._s3, keys[start : start + 1000])

    async def aclose(self) -> None:
        """Nothing to close: obstore's connection pool goes with the object."""


def _write(f: BinaryIO, digest: hashlib._Hash, chunk: bytes) -> None:
    f.write(chunk)
    digest.update(chunk)
