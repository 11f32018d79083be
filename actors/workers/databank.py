"""A small async client of the Data Bank file service: streamed upload, resumable download.

Contract: `POST {url}/files` (multipart field `file`, header `X-API-Key`) answers 201
`{file_id, size, sha256, content_type, created_at}` with file_id = sha256 of the content;
`GET {url}/files/{file_id}` serves the bytes and honours `Range: bytes=<start>-` (206).
Errors are JSON `{code, message, request_id}`.

Error policy, shared by the actors that use this module: a rejected key (401/403), a file
that is not there (404) or too large (413) is the user's configuration → `UserError`, never
retried; anything else (5xx, a dropped connection, a checksum mismatch) is `DataBankError`
or an aiohttp error → transient, the runtime retries with backoff.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Literal

import aiohttp
import msgspec

from actors.runtime.config import Settings
from trainer.errors import UserError

CHUNK = 1 << 16
OCTET_STREAM = "application/octet-stream"


class DataBankError(RuntimeError):
    """A transient Data Bank failure (server error, short or corrupted transfer)."""


class ChecksumMismatch(DataBankError):
    """A download whose bytes do not hash to the expected sha256 (the part was deleted)."""

    def __init__(self, file_id: str, got: str, expected: str) -> None:
        super().__init__(
            f"downloaded {file_id} has sha256 {got}, expected {expected}; "
            "the partial file was deleted"
        )
        self.got = got


class NoSuchFile(UserError):
    """The Data Bank answered 404 for a file id."""


class DataBankFile(msgspec.Struct, kw_only=True):
    file_id: str
    size: int
    sha256: str
    content_type: str = ""
    created_at: str = ""


class _ErrorBody(msgspec.Struct):
    message: str = ""


async def _message(resp: aiohttp.ClientResponse) -> str:
    """The `message` of a Data Bank error body, or the start of whatever came back."""
    body = await resp.read()
    try:
        message = msgspec.json.decode(body, type=_ErrorBody).message
    except msgspec.DecodeError:  # not JSON, or not the error shape (ValidationError)
        message = ""
    return message or body[:200].decode("utf-8", "replace")


async def _raise_for(resp: aiohttp.ClientResponse, what: str) -> None:
    if resp.status < 400:
        return
    msg = await _message(resp)
    if resp.status in (401, 403):
        raise UserError(
            f"the Data Bank rejected the API key while {what} (HTTP {resp.status}: {msg}); "
            "check MT_DATA_BANK_KEY"
        )
    if resp.status == 404:
        raise NoSuchFile(f"the Data Bank has no such file ({what}): {msg}")
    if resp.status == 413:
        raise UserError(f"the Data Bank refused the file as too large ({what}): {msg}")
    raise DataBankError(f"Data Bank answered HTTP {resp.status} while {what}: {msg}")


async def upload(
    session: aiohttp.ClientSession, base_url: str, key: str, path: Path, content_type: str
) -> DataBankFile:
    """Stream `path` to the Data Bank (never held in memory) and return what it stored."""
    f = await asyncio.to_thread(path.open, "rb")
    try:
        form = aiohttp.FormData()
        form.add_field("file", f, filename=path.name, content_type=content_type)
        async with session.post(
            f"{base_url.rstrip('/')}/files", data=form, headers={"X-API-Key": key}
        ) as resp:
            await _raise_for(resp, f"uploading {path.name}")
            body = await resp.read()
    finally:
        await asyncio.to_thread(f.close)
    try:
        return msgspec.json.decode(body, type=DataBankFile)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise DataBankError(f"unexpected Data Bank answer to an upload: {e}") from e


def _sha256_of(path: Path) -> hashlib._Hash:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h


def _is_complete(dest: Path, sha256: str) -> bool:
    return dest.is_file() and _sha256_of(dest).hexdigest() == sha256


def _part_size(part: Path) -> int:
    part.parent.mkdir(parents=True, exist_ok=True)
    return part.stat().st_size if part.exists() else 0


def _finish(part: Path, dest: Path, got: str, expected: str | None, file_id: str) -> None:
    if expected and got != expected:
        part.unlink(missing_ok=True)
        raise ChecksumMismatch(file_id, got, expected)
    part.replace(dest)


async def download(
    session: aiohttp.ClientSession,
    base_url: str,
    key: str,
    file_id: str,
    dest: Path,
    expected_sha256: str | None = None,
) -> Path:
    """Download a file to `dest`, resuming a partial `dest.part` with an HTTP Range request.

    A 206 appends to what is there; a 200 (the server ignored the range) starts over from
    zero, and so does a 416 (the part is not shorter than the file). The sha256 is checked
    at the end: on a mismatch the part is deleted and DataBankError raised, so the retry
    starts clean. A dropped connection leaves the part for the retry to resume."""
    if expected_sha256:
        complete = await asyncio.to_thread(_is_complete, dest, expected_sha256)
        if complete:
            return dest
    part = dest.with_name(dest.name + ".part")
    url = f"{base_url.rstrip('/')}/files/{file_id}"
    for _ in range(2):  # a second round only after a refused range threw the part away
        offset = await asyncio.to_thread(_part_size, part)
        headers = {"X-API-Key": key}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        async with session.get(url, headers=headers) as resp:
            if offset and (
                resp.status == 416 or (resp.status == 206 and _range_start(resp) != offset)
            ):
                await asyncio.to_thread(part.unlink)
                continue
            await _raise_for(resp, f"downloading {file_id}")
            if resp.status == 206 and offset:
                digest = await asyncio.to_thread(_sha256_of, part)
                mode = "ab"
            else:
                digest, mode = hashlib.sha256(), "wb"
            f = await asyncio.to_thread(part.open, mode)
            try:
                async for chunk in resp.content.iter_chunked(CHUNK):
                    f.write(chunk)
                    digest.update(chunk)
            finally:
                await asyncio.to_thread(f.close)
        await asyncio.to_thread(_finish, part, dest, digest.hexdigest(), expected_sha256, file_id)
        return dest
    raise DataBankError(f"the Data Bank kept refusing the byte range of {file_id}")


async def exists(session: aiohttp.ClientSession, base_url: str, key: str, file_id: str) -> bool:
    """Whether the Data Bank holds `file_id`: a one-byte range GET (the contract has no HEAD);
    404 → False, a rejected key → UserError, anything else unexpected → DataBankError."""
    url = f"{base_url.rstrip('/')}/files/{file_id}"
    async with session.get(url, headers={"X-API-Key": key, "Range": "bytes=0-0"}) as resp:
        if resp.status == 404:
            return False
        if resp.status == 416:
            return True  # there, but empty: it has no byte 0
        await _raise_for(resp, f"looking up {file_id}")
        return True


def _range_start(resp: aiohttp.ClientResponse) -> int:
    """Start offset of a 206's `Content-Range: bytes <start>-<end>/<size>` (-1 if absent)."""
    value = resp.headers.get("Content-Range", "")
    unit, _, rest = value.partition(" ")
    start = rest.partition("-")[0]
    return int(start) if unit == "bytes" and start.isdigit() else -1


async def fetch(
    settings: Settings, file_id: str, suffix: str, expected_sha256: str | None, what: str
) -> Path:
    """Download a Data Bank file into <data dir>/downloads (resuming a partial one);
    `what` names it in the error when no Data Bank is configured."""
    if not (settings.data_bank_url and settings.data_bank_key):
        raise UserError(
            f"{what} is in the Data Bank, which is not configured "
            "(MT_DATA_BANK_URL / MT_DATA_BANK_KEY)"
        )
    dest = settings.data_dir / "downloads" / f"{file_id}{suffix}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    async with aiohttp.ClientSession() as session:
        return await download(
            session,
            settings.data_bank_url,
            settings.data_bank_key,
            file_id,
            dest,
            expected_sha256=expected_sha256,
        )


class DataBankObjects:
    """The Data Bank as a backend of the artifact store (actors.runtime.store): objects are
    content-addressed, the address of an upload is its file id. The contract has no names,
    listing or deletion, so `can_list` is False and the store never asks for them."""

    backend: Literal["databank"] = "databank"
    content_addressed = True
    can_list = False

    def __init__(self, url: str, api_key: str) -> None:
        self.url, self.api_key = url, api_key
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    async def put(self, src: Path, key: str) -> str:
        stored = await upload(self._client(), self.url, self.api_key, src, OCTET_STREAM)
        return stored.file_id

    async def download(self, address: str, part: Path, sha256: str) -> str:
        """Returns the sha256 of what came; a mismatch leaves no part behind."""
        try:
            await download(self._client(), self.url, self.api_key, address, part, sha256)
        except ChecksumMismatch as e:
            return e.got
        except NoSuchFile as e:
            raise FileNotFoundError(str(e)) from e
        return sha256

    async def exists(self, address: str, size: int) -> bool:
        return await exists(self._client(), self.url, self.api_key, address)

    async def keys(self, prefix: str) -> list[str]:
        raise UserError("the Data Bank cannot list what it holds")

    async def delete(self, keys: list[str]) -> None:
        raise UserError("the Data Bank cannot delete")

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
