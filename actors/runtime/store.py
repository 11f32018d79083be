"""The artifact store: where a worker keeps what it produces, so that an actor on any machine
can fetch it. One small interface, three backends, chosen by one setting (`make_store`):

- `MT_STORE_URL` unset → a folder in the data dir (`$MT_DATA_DIR/store`), one machine;
- `s3://bucket/prefix` → S3-compatible object storage (actors.runtime.store_s3, through
  obstore), with the standard `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
  `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`;
- `databank:` → the Data Bank service (`MT_DATA_BANK_URL`/`_KEY`), through
  actors.workers.databank (its client, and DataBankObjects, the backend over it).

Keys are `/`-separated relative paths ("runs/<run id>/model"). `put_file` / `put_folder`
store under a key and return a `Pointer` (backend, key, sha256, size, and the Data Bank's
file id) that the caller records in Redis; `get(pointer, dest)` brings it back; `exists`,
`list` (the keys stored under a prefix) and `delete` complete it.

A folder is its files under `<key>/` plus a manifest `<key>/.mt-folder.json` (msgspec JSON,
versioned: each file's relative path, size and sha256), uploaded last: a folder whose
manifest is there is complete. Its pointer is the manifest's (sha256 of the manifest, size
the total of the files).

Every download is verified: written to a temporary name beside `dest` while hashed, renamed
into place only when its sha256 is the recorded one. A mismatch is refused, the partial
file removed, and the object fetched once more; a second mismatch is a `StoreError`. A
folder is assembled in a temporary dir and renamed into place whole.

The Data Bank is content-addressed and its contract has upload and download by file id
only: no names, no listing, no deletion. Its keys live only in the pointers (file id =
sha256 of the content, checked on upload), and `list`/`delete` raise `Unsupported` (a
UserError); callers that prune check `store.can_list` first. No index of our own: the
pointers the callers record in Redis are the index, and a second one would only drift.

Error policy (as in actors.workers.databank): the user's configuration (refused credentials,
a missing bucket, a bad URL) → `UserError`, never retried; a pointer to something the store
no longer has → `NotInStore` (a UserError); network errors, 5xx, an outage, a corrupted
transfer → `StoreError`, transient: the runtime retries the command with backoff.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Literal, Protocol
from urllib.parse import urlsplit

import msgspec

from actors.runtime import log
from actors.runtime.config import Settings
from actors.workers import databank
from trainer.errors import UserError

Backend = Literal["local", "s3", "databank"]
MANIFEST = ".mt-folder.json"
FOLDER_FORMAT = 1
CHUNK = 1 << 20


class StoreError(RuntimeError):
    """A transient store failure (network, server error, outage, corrupted transfer)."""


class NotInStore(UserError):
    """The pointer or key names nothing the store has (deleted, or another store's)."""


class Unsupported(UserError):
    """The backend has no such operation (the Data Bank: list, delete)."""


class Pointer(msgspec.Struct, frozen=True, kw_only=True):
    """What a put returns and a get takes; recorded in Redis by the caller."""

    backend: Backend
    key: str
    sha256: str  # of the file; of a folder, of its manifest
    size: int  # bytes of the file; of a folder, of all its files
    kind: Literal["file", "folder"] = "file"
    file_id: str = ""  # the Data Bank's id of the file (of a folder: of its manifest)


class FolderFile(msgspec.Struct, frozen=True, kw_only=True):
    path: str  # relative, '/'-separated
    size: int
    sha256: str
    file_id: str = ""


class FolderManifest(msgspec.Struct, frozen=True, kw_only=True):
    format: int = FOLDER_FORMAT
    files: list[FolderFile]


class Objects(Protocol):
    """One backend: moves single objects. Raises UserError for configuration errors and
    FileNotFoundError for a missing object; anything else is taken as transient."""

    @property
    def backend(self) -> Backend: ...
    @property
    def content_addressed(self) -> bool:
        """Whether the address put returns is the sha256 of the content."""
        ...

    @property
    def can_list(self) -> bool: ...

    async def put(self, src: Path, key: str) -> str:
        """Upload src under key; returns its address (the key, or a file id)."""
        ...

    async def download(self, address: str, part: Path, sha256: str) -> str:
        """Write the object to `part`; returns the sha256 of the bytes written."""
        ...

    async def exists(self, address: str, size: int) -> bool: ...

    async def keys(self, prefix: str) -> list[str]:
        """Every object key under the prefix (whole path segments)."""
        ...

    async def delete(self, keys: list[str]) -> None: ...

    async def aclose(self) -> None: ...


def check_key(key: str, what: str = "key") -> str:
    """A relative '/'-separated path with no empty, '.' or '..' segment."""
    parts = key.split("/")
    if not key or "\\" in key or "\0" in key or any(p in ("", ".", "..") for p in parts):
        raise UserError(f"not a valid store {what}: {key!r}")
    return key


def hash_file(path: Path) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _copy_hashed(src: Path, dest: Path) -> str:
    h = hashlib.sha256()
    with src.open("rb") as fin, dest.open("wb") as fout:
        while chunk := fin.read(CHUNK):
            h.update(chunk)
            fout.write(chunk)
    return h.hexdigest()


def _folder_files(src: Path, exclude: tuple[str, ...] = ()) -> list[str]:
    if not src.is_dir():
        raise UserError(f"not a folder: {src}")
    found = (
        PurePosixPath(*Path(dirpath, name).relative_to(src).parts).as_posix()
        for dirpath, _dirs, names in os.walk(src)
        for name in names
        if Path(dirpath, name).is_file()
    )
    out = sorted(rel for rel in found if rel.split("/")[0] not in exclude)
    if MANIFEST in out:
        raise UserError(f"{src} holds a file named {MANIFEST}, which the store keeps for itself")
    return out


def fold(keys: list[str]) -> list[str]:
    """Object keys → stored keys: a folder (found by its manifest) once, files as they are."""
    folders = {k.removesuffix(f"/{MANIFEST}") for k in keys if k.endswith(f"/{MANIFEST}")}
    out = set(folders)
    for k in keys:
        parts = k.split("/")
        if not any("/".join(parts[:i]) in folders for i in range(1, len(parts))):
            out.add(k)
    return sorted(out)


class Store:
    """The artifact store over one backend. Use `make_store(settings)`; close with `aclose()`
    (or `async with`)."""

    def __init__(self, objects: Objects, concurrency: int = 8) -> None:
        self.objects = objects
        self.backend: Backend = objects.backend
        self.can_list = objects.can_list  # list() and delete() work
        self._limit = asyncio.Semaphore(concurrency)

    async def put_file(self, src: Path, key: str) -> Pointer:
        """Store the file `src` under `key` (replacing what was there)."""
        check_key(key)
        if not src.is_file():
            raise UserError(f"not a file: {src}")
        sha256, size, address = await self._put(src, key)
        file_id = address if self.objects.content_addressed else ""
        return Pointer(backend=self.backend, key=key, sha256=sha256, size=size, file_id=file_id)

    async def put_folder(self, src: Path, key: str, exclude: tuple[str, ...] = ()) -> Pointer:
        """Store every file under `src` as `key/<relative path>` (but those under a top-level
        name in exclude), then the manifest. Over a folder already there, files the new
        manifest does not list stay until `delete`."""
        check_key(key)
        names = await asyncio.to_thread(_folder_files, src, exclude)
        stored = await asyncio.gather(*(self._put(src / n, f"{key}/{n}") for n in names))
        manifest = FolderManifest(
            files=[
                FolderFile(path=n, size=size, sha256=sha256, file_id=self._file_id(address))
                for n, (sha256, size, address) in zip(names, stored, strict=True)
            ]
        )
        tmp = Path(await asyncio.to_thread(_temp_dir)) / MANIFEST
        try:
            await asyncio.to_thread(tmp.write_bytes, msgspec.json.encode(manifest))
            sha256, _, address = await self._put(tmp, f"{key}/{MANIFEST}")
        finally:
            await asyncio.to_thread(shutil.rmtree, tmp.parent, True)
        return Pointer(
            backend=self.backend,
            key=key,
            sha256=sha256,
            size=sum(f.size for f in manifest.files),
            kind="folder",
            file_id=self._file_id(address),
        )

    async def get(self, pointer: Pointer, dest: Path) -> Path:
        """Bring the file (or the folder) back as `dest`, replacing what is there."""
        if pointer.backend != self.backend:
            raise NotInStore(f"{pointer.key} is in the {pointer.backend} store, not this one")
        check_key(pointer.key)
        await asyncio.to_thread(dest.parent.mkdir, parents=True, exist_ok=True)
        if pointer.kind == "file":
            await self._fetch(self._address(pointer.key, pointer.file_id), pointer.sha256, dest)
            return dest
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.tmp")
        try:
            manifest = await self._manifest(pointer, tmp)
            await asyncio.to_thread(_make_dirs, {(tmp / f.path).parent for f in manifest.files})
            # Every fetch runs to its end before the temp dir goes: a sibling cancelled on the
            # first failure would go on writing from its thread into a dir being removed.
            results = await asyncio.gather(
                *(
                    self._fetch(
                        self._address(f"{pointer.key}/{f.path}", f.file_id), f.sha256, tmp / f.path
                    )
                    for f in manifest.files
                ),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            await asyncio.to_thread(_replace_dir, tmp, dest)
        finally:
            await asyncio.to_thread(shutil.rmtree, tmp, True)
        return dest

    async def exists(self, pointer: Pointer) -> bool:
        """Whether the store still holds what the pointer names (a folder: its manifest)."""
        if pointer.backend != self.backend:
            return False
        if pointer.kind == "file":
            key, size = pointer.key, pointer.size
        else:  # the manifest's own size is not in the pointer: any will do
            key, size = f"{pointer.key}/{MANIFEST}", -1
        with _Translate(f"looking up {pointer.key}"):
            return await self.objects.exists(self._address(key, pointer.file_id), size)

    async def list(self, prefix: str = "") -> list[str]:
        """The keys stored under a prefix (whole path segments), sorted: each folder once,
        each file; the loose files of a folder whose put never finished show as files."""
        self._listing("list")
        if prefix:
            check_key(prefix.strip("/"), "prefix")
        with _Translate(f"listing {prefix or 'the store'}"):
            return fold(await self.objects.keys(prefix.strip("/")))

    async def delete(self, key: str) -> None:
        """Delete a file or a folder (the manifest first, so it is never seen complete
        while half gone), and anything else under `key/`. A missing key is no error."""
        self._listing("delete")
        check_key(key)
        with _Translate(f"deleting {key}"):
            under = await self.objects.keys(key)
            manifest = f"{key}/{MANIFEST}"
            if manifest in under:
                await self.objects.delete([manifest])
            await self.objects.delete([k for k in under if k != manifest] + [key])

    async def aclose(self) -> None:
        await self.objects.aclose()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ internals

    def _listing(self, what: str) -> None:
        if not self.can_list:
            raise Unsupported(
                f"the {self.backend} store cannot {what}: its contract has no names, only "
                "content ids (the pointers recorded in Redis are its index)"
            )

    def _file_id(self, address: str) -> str:
        return address if self.objects.content_addressed else ""

    def _address(self, key: str, file_id: str) -> str:
        if self.objects.content_addressed:
            if not file_id:
                raise NotInStore(f"{key}: the pointer has no file id for the {self.backend}")
            return file_id
        return key

    async def _put(self, src: Path, key: str) -> tuple[str, int, str]:
        """Upload one file while hashing it; returns (sha256, size, address)."""
        async with self._limit:
            with _Translate(f"uploading {key}"):
                (sha256, size), address = await asyncio.gather(
                    asyncio.to_thread(hash_file, src), self.objects.put(src, key)
                )
        if self.objects.content_addressed and address != sha256:
            raise StoreError(
                f"the {self.backend} stored {key} as {address}, its sha256 is {sha256}"
            )
        return sha256, size, address

    async def _fetch(self, address: str, sha256: str, dest: Path) -> None:
        """Download to a temporary name beside dest (its dir exists), verified; one more try
        on a mismatch."""
        got = ""
        for attempt in (1, 2):
            part = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.part")
            try:
                async with self._limit:
                    with _Translate(f"downloading {address}"):
                        got = await self.objects.download(address, part, sha256)
                if got == sha256:
                    await asyncio.to_thread(part.replace, dest)
                    return
            finally:
                part.unlink(missing_ok=True)
            log.get("store").warning(
                "sha256 mismatch, refused", address=address, got=got, want=sha256, attempt=attempt
            )
        raise StoreError(f"{address} downloaded twice with sha256 {got}, expected {sha256}")

    async def _manifest(self, pointer: Pointer, tmp: Path) -> FolderManifest:
        await asyncio.to_thread(tmp.mkdir)
        path = tmp / MANIFEST
        address = self._address(f"{pointer.key}/{MANIFEST}", pointer.file_id)
        await self._fetch(address, pointer.sha256, path)
        data = await asyncio.to_thread(path.read_bytes)
        await asyncio.to_thread(path.unlink)
        try:
            manifest = msgspec.json.decode(data, type=FolderManifest)
        except msgspec.DecodeError as e:  # its sha256 matched: the pointer names a non-folder
            raise UserError(f"{pointer.key}: not a folder manifest ({e})") from e
        if manifest.format != FOLDER_FORMAT:
            raise UserError(f"{pointer.key}: folder format {manifest.format} is not ours")
        for f in manifest.files:
            check_key(f.path, "path in a folder manifest")
        return manifest


class _Translate:
    """Backend errors → the store's: UserError passes, FileNotFoundError → NotInStore,
    anything else → StoreError (transient)."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, e: BaseException | None, tb: object
    ) -> None:
        if e is None or isinstance(e, UserError | StoreError) or not isinstance(e, Exception):
            return
        if isinstance(e, FileNotFoundError):
            raise NotInStore(f"{self.what}: not in the store ({e})") from e
        raise StoreError(f"{self.what}: {type(e).__name__}: {e}") from e


def _temp_dir() -> str:
    return tempfile.mkdtemp(prefix="mt-store-")


def _make_dirs(dirs: set[Path]) -> None:
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)


def _replace_dir(new: Path, dest: Path) -> None:
    """Put `new` in place of dest: the old one moved aside, then removed."""
    old = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.old")
    if dest.is_dir():
        dest.replace(old)
    elif dest.exists():
        dest.unlink()
    new.replace(dest)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------- backends


class LocalObjects:
    """Objects as files under `root`; written under a temporary name in a sibling dir on
    the same disk, then renamed into place."""

    backend: Literal["local"] = "local"
    content_addressed = False
    can_list = True

    def __init__(self, root: Path) -> None:
        self.root = root.absolute()
        self.tmp = self.root.with_name(self.root.name + ".tmp")

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*key.split("/"))

    async def put(self, src: Path, key: str) -> str:
        await asyncio.to_thread(self._put, src, self._path(key))
        return key

    def _put(self, src: Path, dest: Path) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)
        part = self.tmp / f"{dest.name}.{secrets.token_hex(6)}"
        try:
            shutil.copyfile(src, part)
            dest.parent.mkdir(parents=True, exist_ok=True)
            part.replace(dest)
        except (NotADirectoryError, IsADirectoryError, FileExistsError) as e:
            # "a" a file and "a/b" wanted, or the other way round: no retry will help.
            raise UserError(f"{dest.relative_to(self.root)} clashes with a stored key: {e}") from e
        finally:
            part.unlink(missing_ok=True)

    async def download(self, address: str, part: Path, sha256: str) -> str:
        return await asyncio.to_thread(_copy_hashed, self._path(address), part)

    async def exists(self, address: str, size: int) -> bool:
        path = self._path(address)
        return path.is_file() and size in (-1, path.stat().st_size)

    async def keys(self, prefix: str) -> list[str]:
        return await asyncio.to_thread(self._keys, prefix)

    def _keys(self, prefix: str) -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return []
        return [
            "/".join(Path(dirpath, name).relative_to(self.root).parts)
            for dirpath, _dirs, names in os.walk(base)
            for name in names
        ]

    async def delete(self, keys: list[str]) -> None:
        await asyncio.to_thread(self._delete, keys)

    def _delete(self, keys: list[str]) -> None:
        for key in keys:
            path = self._path(key)
            if path.is_file():
                path.unlink()
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()  # a folder's dir, its files gone
            parent = path.parent  # and the dirs left empty above it
            while parent != self.root and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent

    async def aclose(self) -> None:
        """Nothing held open."""


def make_store(settings: Settings) -> Store:
    """The store MT_STORE_URL names: unset → local folder; s3://bucket/prefix; databank:."""
    url = (settings.store_url or "").strip()
    if not url:
        return Store(LocalObjects(settings.store_dir()))
    if url in ("databank", "databank:"):
        if not (settings.data_bank_url and settings.data_bank_key):
            raise UserError(
                "MT_STORE_URL=databank: needs the Data Bank (MT_DATA_BANK_URL, MT_DATA_BANK_KEY)"
            )
        return Store(databank.DataBankObjects(settings.data_bank_url, settings.data_bank_key), 4)
    parts = urlsplit(url)
    if parts.scheme == "s3":
        from actors.runtime.store_s3 import S3Objects

        return Store(
            S3Objects(
                parts.netloc,
                parts.path,
                endpoint=settings.aws_endpoint_url,
                access_key_id=settings.aws_access_key_id,
                secret_access_key=settings.aws_secret_access_key,
                region=settings.aws_region,
            )
        )
    raise UserError(
        f"MT_STORE_URL={url!r} is not a store: leave it unset (a folder in the data dir), "
        "or s3://bucket/prefix, or databank:"
    )
