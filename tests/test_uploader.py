"""The uploader actor through the real runtime and Redis, the Data Bank client over real HTTP."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from actors.runtime.config import Settings
from actors.runtime.streams import Runtime, RuntimeConfig
from actors.workers.databank import DataBankError, download, upload
from actors.workers.uploader import UploaderActor, build_archive
from protocol.codec import FIELD, decode_event, encode
from protocol.commands import ArtifactUpload
from protocol.events import AnyEvent, ArtifactStored, RunFailed, event_kind
from protocol.keys import Keys
from tests.fake_services import FakeDataBank
from trainer.errors import UserError

WEIGHTS = os.urandom(300_000)  # incompressible, like real weights


def make_run(settings: Settings, run_id: str) -> Path:
    run = settings.run_dir(run_id)
    (run / "best").mkdir(parents=True)
    (run / "checkpoints" / "step-00000010").mkdir(parents=True)
    (run / "config.json").write_text('{"model_type": "gpt2"}')
    (run / "model.safetensors").write_bytes(WEIGHTS)
    (run / "best" / "model.safetensors").write_bytes(WEIGHTS[:1000])
    (run / "checkpoints" / "step-00000010" / "optimizer.pt").write_bytes(b"x" * 5000)
    (run / "checkpoints" / "latest").write_text("step-00000010")
    (run / "manifest.json").write_text(
        json.dumps({"status": "completed", "test_loss": 2.5, "train_loss": float("nan")})
    )
    return run


@pytest.fixture
async def bank(tmp_path: Path) -> AsyncIterator[FakeDataBank]:
    server = FakeDataBank(tmp_path / "bank")
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def settings_for(data_dir: Path, keys: Keys, bank: FakeDataBank | None = None) -> Settings:
    return Settings(
        data_dir=data_dir,
        corpus_root=data_dir / "corpus",
        prefix=keys.prefix,
        data_bank_url=bank.url if bank else None,
        data_bank_key=bank.key if bank else None,
    )


async def run_upload(
    redis: aioredis.Redis, keys: Keys, settings: Settings, cmd: ArtifactUpload
) -> list[AnyEvent]:
    await redis.xadd(keys.cmd("uploader"), {FIELD: encode(cmd)})
    config = RuntimeConfig(block_ms=50, backoff_s=0.05, max_tries=3)
    rt = Runtime(UploaderActor(settings), redis, keys=keys, consumer="t-0", config=config)
    await rt.run(until_idle=True)
    out: list[AnyEvent] = []
    for _, fields in await redis.xrange(keys.events) or []:
        assert fields is not None
        out.append(decode_event(fields[FIELD.encode()]))
    return out


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def run_state(redis: aioredis.Redis, keys: Keys, run_id: str) -> dict[str, str]:
    raw = await redis.hgetall(keys.run(run_id))
    return {_text(k): _text(v) for k, v in raw.items()}


async def test_local_store_archives_the_run_without_checkpoints(
    redis: aioredis.Redis, keys: Keys, data_dir: Path
) -> None:
    settings = settings_for(data_dir, keys)
    run = make_run(settings, "r1")
    events = await run_upload(
        redis, keys, settings, ArtifactUpload(command_id="r1.uploader", run_id="r1", user_id=7)
    )
    assert [event_kind(e) for e in events] == [
        "step.started",
        "artifact.stored",
        "step.completed",
        "run.completed",
    ]
    stored = events[1]
    assert isinstance(stored, ArtifactStored)
    archive = data_dir / "artifacts" / "run" / "r1.tar.gz"
    blob = archive.read_bytes()
    assert stored.storage == "local" and stored.target == "run" and stored.user_id == 7
    assert stored.uri == archive.as_uri()
    assert stored.size == len(blob) and stored.sha256 == hashlib.sha256(blob).hexdigest()
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        names = tar.getnames()
        weights = tar.extractfile("r1/model.safetensors")
        assert weights is not None and weights.read() == WEIGHTS
    assert sorted(names) == [
        "r1/best",
        "r1/best/model.safetensors",
        "r1/config.json",
        "r1/manifest.json",
        "r1/model.safetensors",
    ]
    assert not list(archive.parent.glob(".*"))  # no temporary left behind

    pointer = {
        "storage": "local",
        "target": "run",
        "uri": archive.as_uri(),
        "file_id": "",
        "size": len(blob),
        "sha256": hashlib.sha256(blob).hexdigest(),
        "backend": "",  # the store's fields: empty without MT_STORE_URL
        "key": "",
    }
    state = await run_state(redis, keys, "r1")
    assert json.loads(state["artifact"]) == pointer
    assert state["status"] == "completed"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["artifact"] == pointer
    assert manifest["status"] == "completed" and manifest["test_loss"] == 2.5  # kept as it was
    assert manifest["train_loss"] != manifest["train_loss"]  # NaN survives the rewrite
    assert (run / "checkpoints" / "latest").is_file()  # resume state left alone


def test_the_same_files_give_the_same_archive(tmp_path: Path) -> None:
    src = tmp_path / "tok"
    src.mkdir()
    (src / "tokenizer.json").write_text('{"model": {}}')
    first = build_archive(str(src), str(tmp_path / "a.tar.gz"), "tok", [])
    second = build_archive(str(src), str(tmp_path / "b.tar.gz"), "tok", [])
    assert first.sha256 == second.sha256 and first.size == second.size
    assert (tmp_path / "a.tar.gz").read_bytes()[4:8] == bytes(4)  # gzip header mtime is 0
    with pytest.raises(UserError, match="nothing to archive"):
        build_archive(str(tmp_path / "missing"), str(tmp_path / "c.tar.gz"), "x", [])


async def test_data_bank_upload_stores_a_data_bank_pointer(
    redis: aioredis.Redis, keys: Keys, data_dir: Path, bank: FakeDataBank
) -> None:
    settings = settings_for(data_dir, keys, bank)
    make_run(settings, "r2")
    events = await run_upload(
        redis, keys, settings, ArtifactUpload(command_id="r2.uploader", run_id="r2")
    )
    stored = events[1]
    assert isinstance(stored, ArtifactStored)
    assert stored.storage == "data-bank"
    blob = bank.stored(stored.file_id)
    assert stored.file_id == stored.sha256 == hashlib.sha256(blob).hexdigest()
    assert stored.size == len(blob)
    assert stored.uri == f"{bank.url}/files/{stored.file_id}"
    [post] = bank.requests
    assert post.method == "POST" and post.headers["X-API-Key"] == bank.key
    assert post.headers["Content-Type"].startswith("multipart/form-data")
    state = await run_state(redis, keys, "r2")
    assert json.loads(state["artifact"])["file_id"] == stored.file_id
    assert state["status"] == "completed"
    manifest = json.loads((settings.run_dir("r2") / "manifest.json").read_text())
    assert manifest["artifact"]["storage"] == "data-bank"
    # The temporary archive is gone; nothing is kept in the local store.
    assert not [p for p in (data_dir / "artifacts").rglob("*") if p.is_file()]


@pytest.mark.parametrize("status", [401, 403])
async def test_a_rejected_key_fails_the_run_at_once(
    redis: aioredis.Redis, keys: Keys, data_dir: Path, bank: FakeDataBank, status: int
) -> None:
    bank.answer_status = status
    settings = settings_for(data_dir, keys, bank)
    make_run(settings, "r3")
    events = await run_upload(
        redis, keys, settings, ArtifactUpload(command_id="r3.uploader", run_id="r3")
    )
    assert [event_kind(e) for e in events] == ["step.started", "run.failed"]
    failed = events[1]
    assert isinstance(failed, RunFailed)
    assert failed.error_kind == "user" and failed.step == "uploader"
    assert f"HTTP {status}" in failed.message and "MT_DATA_BANK_KEY" in failed.message
    assert len(bank.requests) == 1  # never retried
    assert await redis.xlen(keys.dead) == 0
    assert (await run_state(redis, keys, "r3"))["status"] == "failed"


async def test_server_errors_and_bad_checksums_are_retried_until_the_upload_succeeds(
    redis: aioredis.Redis, keys: Keys, data_dir: Path, bank: FakeDataBank
) -> None:
    bank.fail_times = 1
    bank.misreport_times = 1  # a 201 whose sha256 is not what was sent
    settings = settings_for(data_dir, keys, bank)
    make_run(settings, "r4")
    events = await run_upload(
        redis, keys, settings, ArtifactUpload(command_id="r4.uploader", run_id="r4")
    )
    assert [r.status for r in bank.requests] == [503, 201, 201]
    assert [event_kind(e) for e in events] == [
        "step.started",
        "artifact.stored",
        "step.completed",
        "run.completed",
    ]
    assert (await run_state(redis, keys, "r4"))["status"] == "completed"


async def test_tokenizer_target_archives_the_tokenizer_dir(
    redis: aioredis.Redis, keys: Keys, data_dir: Path
) -> None:
    settings = settings_for(data_dir, keys)
    tok = settings.tokenizer_dir("tok1")
    tok.mkdir(parents=True)
    (tok / "tokenizer.json").write_text("{}")
    cmd = ArtifactUpload(command_id="t1.up", run_id="t1", target="tokenizer", tokenizer_id="tok1")
    events = await run_upload(redis, keys, settings, cmd)
    stored = events[1]
    assert isinstance(stored, ArtifactStored) and stored.target == "tokenizer"
    with tarfile.open(data_dir / "artifacts" / "tokenizer" / "tok1.tar.gz") as tar:
        assert tar.getnames() == ["tok1/tokenizer.json"]


# ------------------------------------------------------------ the Data Bank client alone
async def test_upload_then_download_resumes_a_partial_file(
    bank: FakeDataBank, tmp_path: Path
) -> None:
    data = os.urandom(200_000)
    src = tmp_path / "corpus.txt"
    src.write_bytes(data)
    dest = tmp_path / "dl" / "corpus.txt"
    dest.parent.mkdir()
    async with aiohttp.ClientSession() as session:
        stored = await upload(session, bank.url, bank.key, src, "text/plain")
        assert stored.file_id == hashlib.sha256(data).hexdigest() and stored.size == len(data)
        assert stored.content_type == "text/plain"
        dest.with_name("corpus.txt.part").write_bytes(data[:70_000])
        got = await download(session, bank.url, bank.key, stored.file_id, dest, stored.sha256)
    assert got == dest and dest.read_bytes() == data
    assert not dest.with_name("corpus.txt.part").exists()
    [_post, get] = bank.requests
    assert get.headers["Range"] == "bytes=70000-" and get.status == 206


@pytest.mark.parametrize("case", ["range-ignored", "part-too-long"])
async def test_download_starts_over_when_the_range_is_not_honoured(
    bank: FakeDataBank, tmp_path: Path, case: str
) -> None:
    data = os.urandom(50_000)
    file_id = bank.put(data)
    dest = tmp_path / "f.bin"
    part = tmp_path / "f.bin.part"
    if case == "range-ignored":
        bank.ignore_range = True
        part.write_bytes(b"garbage!" * 100)
    else:
        part.write_bytes(data + b"extra")
    async with aiohttp.ClientSession() as session:
        await download(session, bank.url, bank.key, file_id, dest, file_id)
    assert dest.read_bytes() == data
    statuses = [r.status for r in bank.requests]
    assert statuses == ([200] if case == "range-ignored" else [416, 200])


async def test_download_with_a_wrong_checksum_deletes_the_part(
    bank: FakeDataBank, tmp_path: Path
) -> None:
    data = os.urandom(10_000)
    file_id = bank.put(data)
    bank.tamper = True
    dest = tmp_path / "f.bin"
    async with aiohttp.ClientSession() as session:
        with pytest.raises(DataBankError, match="sha256"):
            await download(session, bank.url, bank.key, file_id, dest, file_id)
        assert not dest.exists() and not (tmp_path / "f.bin.part").exists()
        bank.tamper = False
        await download(session, bank.url, bank.key, file_id, dest, file_id)
        assert dest.read_bytes() == data
        # Already there with the right checksum: nothing is downloaded again.
        before = len(bank.requests)
        await download(session, bank.url, bank.key, file_id, dest, file_id)
        assert len(bank.requests) == before


async def test_download_errors_are_user_errors_or_transient(
    bank: FakeDataBank, tmp_path: Path
) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(UserError, match="no such file"):
            await download(session, bank.url, bank.key, "0" * 64, tmp_path / "x")
        with pytest.raises(UserError, match="HTTP 403"):
            await download(session, bank.url, "wrong", "0" * 64, tmp_path / "x")
        bank.answer_status = 500
        with pytest.raises(DataBankError, match="HTTP 500"):
            await download(session, bank.url, bank.key, "0" * 64, tmp_path / "x")
