"""uploader: `artifact.upload` — archives a run dir (or a tokenizer dir) as a streamed tar.gz
and puts it into the artifact store when MT_STORE_URL is set (`artifacts/<run|tokenizer>/
<id>.tar.gz`, storage "store"); without it, keeps it in the local artifact folder, or sends
it to the Data Bank when one is set, as before the store existed. The folder is brought from
the store first by its pointer (the run's or tokenizer's field `stored`) unless it is here.

The archive is built in the actor's process pool and streamed to disk in tar records, so a
model of any size never sits in memory; its size and sha256 are counted on the way out.
Local store: `artifacts/<run|tokenizer>/<id>.tar.gz`, written under a temporary name and
renamed into place. The pointer (`{"storage": "local"|"data-bank", ...}`) reaches the run
state through the ArtifactStored event and is also written into the run's manifest.json.
A tokenizer's pointer is also recorded as field `artifact` of its record (the download route
finds it there). The uploader is normally the last step of a chain; the runtime records
run.completed after it (and queues the next step when the chain goes on).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import os
import secrets
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import aiohttp
import msgspec

from actors.runtime.artifacts import entry_path, fetch, hold, read_pointer
from actors.runtime.config import Settings
from actors.runtime.outcome import Outcome
from actors.runtime.pool import PoolActor
from actors.runtime.store import StoreError, make_store
from actors.runtime.streams import Context
from actors.workers import databank
from actors.workers.evaluator import MODEL_FILES
from protocol.commands import ArtifactUpload, Base, check_command
from protocol.events import ArtifactPointer, ArtifactStored
from trainer.errors import FieldError, UserError
from trainer.jsonfile import dumps, from_json, load_json

CONTENT_TYPE = "application/gzip"
MANIFEST = "manifest.json"
# Checkpoints are resume state (optimizer, RNG, data position), not the artifact: the model
# a user downloads is the saved model in the run dir itself (and best/). They are also the
# bulk of a run dir, so they stay out of the archive.
RUN_EXCLUDE = ("checkpoints",)
# What a tokenizer dir holds: our manifest (trainer.tokenizer.MANIFEST_NAME), the HF file.
TOKENIZER_FILES = ("mt_tokenizer.json", "tokenizer.json")


@dataclass(frozen=True)
class Archive:
    path: str  # absolute
    size: int
    sha256: str


class _Counting:
    """A write-only sink that hashes and counts what passes through to the real file."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.size = 0
        self.digest = hashlib.sha256()

    def write(self, b: bytes) -> int:
        self.out.write(b)
        self.digest.update(b)
        self.size += len(b)
        return len(b)

    def flush(self) -> None:
        self.out.flush()


def _entries(src: Path, exclude: frozenset[str]) -> Iterator[Path]:
    """Every dir and file under src in a stable order; top-level names in exclude skipped."""
    for dirpath, dirnames, filenames in os.walk(src):
        here = Path(dirpath)
        if here == src:
            dirnames[:] = [d for d in dirnames if d not in exclude]
            filenames = [f for f in filenames if f not in exclude]
        dirnames.sort()
        for name in [*dirnames, *sorted(filenames)]:
            yield here / name


def _anonymous(info: tarfile.TarInfo) -> tarfile.TarInfo:
    # The server's user and group names are not part of the artifact.
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def build_archive(src_dir: str, dest: str, arc_root: str, exclude: list[str]) -> Archive:
    """Runs in a pool child: tar `src_dir` (as `arc_root/...`) into `dest`, atomically.

    Streaming tar ("w|") into gzip with a zero header mtime: the same files give the same
    bytes. Level 1 because model weights barely compress and the time goes to deflate."""
    src, out = Path(src_dir), Path(dest).absolute()
    if not src.is_dir() or not any(src.iterdir()):
        raise UserError(f"nothing to archive: {arc_root!r} does not exist or is empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{secrets.token_hex(4)}")
    try:
        with tmp.open("wb") as raw:
            sink = _Counting(raw)
            with (
                gzip.GzipFile(fileobj=sink, mode="wb", mtime=0, compresslevel=1) as gz,
                tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as tar,
            ):
                for path in _entries(src, frozenset(exclude)):
                    arcname = f"{arc_root}/{path.relative_to(src).as_posix()}"
                    tar.add(path, arcname=arcname, recursive=False, filter=_anonymous)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Archive(path=str(out), size=sink.size, sha256=sink.digest.hexdigest())


def record_in_manifest(run_dir: Path, pointer: ArtifactPointer) -> bool:
    """Read-modify-write run_dir/manifest.json with the pointer under "artifact", atomically.

    Creates the manifest when the run dir has none; does nothing (False) without a run dir.
    The rest of the manifest is kept as it is (the trainer owns its shape)."""
    if not run_dir.is_dir():
        return False
    path = run_dir / MANIFEST
    manifest: dict[str, object] = {}
    if path.is_file():
        manifest = from_json(load_json(path), dict[str, object], path)
    manifest["artifact"] = pointer
    tmp = run_dir / f".{MANIFEST}.tmp-{secrets.token_hex(4)}"
    tmp.write_text(dumps(manifest), encoding="utf-8")  # NaN/inf kept, as trainer.manifest does
    os.replace(tmp, path)
    return True


def _remove(path: str) -> None:
    Path(path).unlink(missing_ok=True)


class UploaderActor(PoolActor):
    name = "uploader"
    concurrency = 1

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._session: aiohttp.ClientSession | None = None
        self.store = make_store(settings)

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        await super().stop()
        await self.store.aclose()

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # No total limit: a large artifact may take long; a stalled socket may not.
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120)
            self._session = aiohttp.ClientSession(timeout=timeout)
        return self._session

    async def handle(self, cmd: Base, ctx: Context) -> Outcome | None:
        match cmd:
            case ArtifactUpload():
                return await self.upload(cmd, ctx)
            case _:
                return None

    async def source(
        self, cmd: ArtifactUpload, ctx: Context
    ) -> tuple[Path, str, Literal["run", "tokenizer"]]:
        """(dir to archive, archive name, store folder) for the command's target, brought
        from the store by its pointer unless it is here, and checked before any work: an
        unknown run or tokenizer is a user error, never an archive of whatever its folder
        holds (a run's folder gets its log as soon as it is named). Call it under `hold`."""
        s = self.settings
        if cmd.target == "tokenizer":
            tok_dir = s.tokenizer_dir(cmd.tokenizer_id)
            stored = await read_pointer(ctx.redis, ctx.keys.tokenizer(cmd.tokenizer_id), "stored")
            if stored is not None:
                await fetch(self.store, s, stored, tok_dir, f"tokenizer {cmd.tokenizer_id!r}")
            if not any((tok_dir / name).is_file() for name in TOKENIZER_FILES):
                raise FieldError("tokenizer_id", f"unknown tokenizer {cmd.tokenizer_id!r}")
            return tok_dir, cmd.tokenizer_id, "tokenizer"
        run_dir = s.run_dir(cmd.run_id)
        stored = await read_pointer(ctx.redis, ctx.keys.run(cmd.run_id), "stored")
        if stored is not None and not any((run_dir / name).is_file() for name in MODEL_FILES):
            # A folder without the model is not the stored version, whatever the entry says.
            await asyncio.to_thread(entry_path(s, run_dir).unlink, True)
        if stored is not None:
            await fetch(self.store, s, stored, run_dir, f"run {cmd.run_id!r}'s model")
        if not any((run_dir / name).is_file() for name in MODEL_FILES):
            raise FieldError(
                "run_id", f"run {cmd.run_id!r} has no trained model here (unknown run?)"
            )
        return run_dir, cmd.run_id, "run"

    async def upload(self, cmd: ArtifactUpload, ctx: Context) -> Outcome:
        check_command(cmd)
        s = self.settings
        tokenizer = cmd.target == "tokenizer"
        local = s.tokenizer_dir(cmd.tokenizer_id) if tokenizer else s.run_dir(cmd.run_id)
        async with hold(s, local):
            src, name, folder = await self.source(cmd, ctx)
            event = await self.archive(cmd, ctx, src, name, folder)
            await asyncio.to_thread(record_in_manifest, s.run_dir(cmd.run_id), event.pointer())
        outcome = Outcome(events=[event])
        if tokenizer:
            pointer = msgspec.json.encode(event.pointer())
            record = ctx.keys.tokenizer(cmd.tokenizer_id)
            outcome.writes.append(("HSET", record, "artifact", pointer))
        return outcome

    async def archive(
        self, cmd: ArtifactUpload, ctx: Context, src: Path, name: str, folder: str
    ) -> ArtifactStored:
        s = self.settings
        exclude = list(RUN_EXCLUDE) if cmd.target == "run" else []
        bank = (s.data_bank_url, s.data_bank_key)
        elsewhere = bool(s.store_url) or bool(bank[0] and bank[1])
        if elsewhere:  # a temporary archive, removed once it is stored
            dest = s.artifact_dir() / ".upload" / f"{name}-{secrets.token_hex(4)}.tar.gz"
        else:
            dest = s.artifact_dir() / folder / f"{name}.tar.gz"
        archive = await self.pool.run(build_archive, str(src), str(dest), name, exclude)
        ctx.log.info("archived", path=archive.path, size=archive.size, sha256=archive.sha256)
        if s.store_url:
            key = f"artifacts/{folder}/{name}.tar.gz"
            try:
                pointer = await self.store.put_file(Path(archive.path), key)
            finally:
                await asyncio.to_thread(_remove, archive.path)
            if pointer.sha256 != archive.sha256 or pointer.size != archive.size:
                raise StoreError(
                    f"{key}: stored {pointer.size} bytes with sha256 {pointer.sha256}; "
                    f"archived {archive.size} bytes with sha256 {archive.sha256}"
                )
            return ArtifactStored(
                storage="store",
                target=cmd.target,
                uri=f"{s.store_url.rstrip('/')}/{key}" if pointer.backend == "s3" else key,
                file_id=pointer.file_id,
                size=archive.size,
                sha256=archive.sha256,
                backend=pointer.backend,
                key=pointer.key,
            )
        if bank[0] and bank[1]:
            try:
                stored = await self.send(archive, bank[0], bank[1])
            finally:
                await asyncio.to_thread(_remove, archive.path)
            return ArtifactStored(
                storage="data-bank",
                target=cmd.target,
                uri=f"{bank[0].rstrip('/')}/files/{stored.file_id}",
                file_id=stored.file_id,
                size=stored.size,
                sha256=stored.sha256,
            )
        return ArtifactStored(
            storage="local",
            target=cmd.target,
            uri=Path(archive.path).as_uri(),
            size=archive.size,
            sha256=archive.sha256,
        )

    async def send(self, archive: Archive, url: str, key: str) -> databank.DataBankFile:
        stored = await databank.upload(self.session(), url, key, Path(archive.path), CONTENT_TYPE)
        if stored.size != archive.size or stored.sha256 != archive.sha256:
            raise databank.DataBankError(
                f"the Data Bank stored {stored.size} bytes with sha256 {stored.sha256}; "
                f"sent {archive.size} bytes with sha256 {archive.sha256}"
            )
        return stored
