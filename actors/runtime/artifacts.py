"""The data dir as a bounded cache of what is in the artifact store.

A worker that produces a folder (corpus splits, a tokenizer, a run) stores it (`publish`) and
records the pointer in Redis in its fenced commit (`pointer_write`); a worker on any machine
that needs it brings it into its own data dir by that pointer (`fetch`), sha256-verified by
the store, unless the same version is here already. So machines share nothing but Redis and
the store.

Each folder here that is also in the store has an entry in `<data dir>/cache/entries/`: its
path and pointer; the entry's mtime is when it was last used. `gc` deletes the least recently
used folders until the cache is under MT_CACHE_GB, skipping any that a running command holds
(`hold`: a shared flock on the folder's lock file for the command's duration; gc asks for the
exclusive lock without waiting). A folder without an entry (a run still training, a corpus not
yet stored) is never evicted, and neither is the local store itself ($MT_DATA_DIR/store):
with the local backend, the only copy of anything stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from actors.runtime import log
from actors.runtime.config import Settings
from actors.runtime.connection import Redis
from actors.runtime.outcome import Write
from actors.runtime.store import Pointer, Store
from trainer.errors import UserError

ENTRY_FORMAT = "mt-cache-entry"
ENTRY_VERSION = 1
GC_EVERY_S = 600.0  # the periodic pass of `model-trainer up`


class Entry(msgspec.Struct, kw_only=True):
    """cache/entries/<id>.json: a folder here that the store also has."""

    format: str = ENTRY_FORMAT
    version: int = ENTRY_VERSION
    path: str  # relative to the data dir
    pointer: Pointer


_entry = msgspec.json.Decoder(Entry)
_pointer = msgspec.json.Decoder(Pointer)


def _name(settings: Settings, local: Path) -> str:
    rel = local.absolute().relative_to(settings.data_dir.absolute()).as_posix()
    return hashlib.sha256(rel.encode()).hexdigest()[:24]


def entry_path(settings: Settings, local: Path) -> Path:
    return settings.data_dir / "cache" / "entries" / f"{_name(settings, local)}.json"


def _lock_path(settings: Settings, local: Path) -> Path:
    return settings.data_dir / "cache" / "locks" / f"{_name(settings, local)}.lock"


def read_entry(settings: Settings, local: Path) -> Entry | None:
    try:
        return _entry.decode(entry_path(settings, local).read_bytes())
    except (OSError, msgspec.DecodeError):
        return None  # none, or damaged: the folder is fetched again


def _record(settings: Settings, local: Path, pointer: Pointer) -> None:
    path = entry_path(settings, local)
    path.parent.mkdir(parents=True, exist_ok=True)
    rel = local.absolute().relative_to(settings.data_dir.absolute()).as_posix()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(msgspec.json.encode(Entry(path=rel, pointer=pointer)))
    os.replace(tmp, path)


def pointer_write(redis_key: str, field: str, pointer: Pointer) -> Write:
    """The HSET that records a pointer, for an Outcome's fenced writes."""
    return ("HSET", redis_key, field, msgspec.json.encode(pointer))


async def read_pointer(redis: Redis, redis_key: str, field: str) -> Pointer | None:
    raw = await redis.hget(redis_key, field)
    if not raw:
        return None
    try:
        return _pointer.decode(raw)
    except msgspec.DecodeError as e:
        raise UserError(f"{redis_key} holds a damaged {field} pointer: {e}") from None


async def publish(
    store: Store, settings: Settings, local: Path, key: str, exclude: tuple[str, ...] = ()
) -> Pointer:
    """Store a folder produced here under key; it is now evictable from this cache."""
    pointer = await store.put_folder(local, key, exclude)
    await asyncio.to_thread(_record, settings, local, pointer)
    return pointer


async def fetch(
    store: Store, settings: Settings, pointer: Pointer | None, local: Path, what: str
) -> Path:
    """`local`, brought from the store by its pointer unless this version is here already.

    Without a pointer the folder must be here (produced on this machine and not stored, as
    before the store existed); a missing one is a UserError naming `what`."""
    if pointer is None:
        if await asyncio.to_thread(local.is_dir):
            return local
        raise UserError(f"{what} is not on this machine and has no pointer in the store")
    entry = await asyncio.to_thread(read_entry, settings, local)
    if entry is not None and entry.pointer == pointer and await asyncio.to_thread(local.is_dir):
        await asyncio.to_thread(_touch, entry_path(settings, local))
        return local
    started = time.monotonic()
    await store.get(pointer, local)
    await asyncio.to_thread(_record, settings, local, pointer)
    log.get("artifacts").info(
        "fetched from the store",
        what=what,
        key=pointer.key,
        size=pointer.size,
        seconds=round(time.monotonic() - started, 3),
    )
    return local


def _touch(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.utime(path)


@contextlib.asynccontextmanager
async def hold(settings: Settings, *locals_: Path) -> AsyncIterator[None]:
    """Keep gc away from these folders while a command uses them (shared flocks)."""
    fds: list[int] = []
    try:
        for local in locals_:
            path = _lock_path(settings, local)
            await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            fds.append(fd)
            # Blocks only while gc is deleting this very folder (it holds the lock then).
            await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_SH)
        yield
    finally:
        for fd in fds:
            os.close(fd)  # releases the lock


@dataclass
class GcReport:
    total_bytes: int = 0  # of the entries before the pass
    limit_bytes: int = 0
    freed_bytes: int = 0
    evicted: list[str] = field(default_factory=list)  # paths, relative to the data dir
    in_use: list[str] = field(default_factory=list)  # over the limit but held: kept


def gc(settings: Settings, limit_bytes: int | None = None) -> GcReport:
    """Evict least recently used folders that the store also has until the cache fits."""
    limit = int(settings.cache_gb * 1e9) if limit_bytes is None else limit_bytes
    folder = settings.data_dir / "cache" / "entries"
    found: list[tuple[float, Path, Entry]] = []
    for path in folder.glob("*.json") if folder.is_dir() else []:
        try:
            entry = _entry.decode(path.read_bytes())
            used = path.stat().st_mtime
        except (OSError, msgspec.DecodeError):
            path.unlink(missing_ok=True)  # damaged: its folder is fetched again when needed
            continue
        if not (settings.data_dir / entry.path).is_dir():
            path.unlink(missing_ok=True)  # the folder is gone already
            continue
        found.append((used, path, entry))
    report = GcReport(total_bytes=sum(e.pointer.size for _, _, e in found), limit_bytes=limit)
    total = report.total_bytes
    for _, path, entry in sorted(found, key=lambda f: f[0]):
        if total <= limit:
            break
        local = settings.data_dir / entry.path
        lock = _lock_path(settings, local)
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                report.in_use.append(entry.path)
                continue
            path.unlink(missing_ok=True)  # first: a half-deleted folder is never "here"
            shutil.rmtree(local, ignore_errors=True)
        finally:
            os.close(fd)
        total -= entry.pointer.size
        report.freed_bytes += entry.pointer.size
        report.evicted.append(entry.path)
    return report
