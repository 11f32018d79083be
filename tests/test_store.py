"""The artifact store over its three backends, each against a real server: a local folder,
S3 on a real SeaweedFS (`weed mini`, the session's `s3_server`), and the Data Bank contract
over real HTTP (FakeDataBank). Objects are corrupted behind the store's back by writing to
the backend directly; the S3 server is stopped and started again for an outage."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
import obstore
import pytest
from obstore.store import S3Store
from structlog.testing import capture_logs

from actors.runtime.config import Settings
from actors.runtime.seaweed import SeaweedS3
from actors.runtime.store import (
    MANIFEST,
    LocalObjects,
    NotInStore,
    Pointer,
    Store,
    StoreError,
    Unsupported,
    make_store,
)
from actors.runtime.store_s3 import S3Objects
from actors.workers.databank import DataBankObjects
from tests.fake_services import FakeDataBank
from trainer.errors import UserError

BACKENDS = ["local", "s3", "databank"]


def raw_s3(server: SeaweedS3, prefix: str = "", bucket: str | None = None) -> S3Store:
    """obstore on the server, past our store: to look at and tamper with what it wrote."""
    return S3Store(
        bucket or server.bucket,
        prefix=prefix or None,
        endpoint=server.endpoint,
        access_key_id=server.access_key_id,
        secret_access_key=server.secret_access_key,
        region=server.region,
        client_options={"allow_http": True},
    )


def s3_objects(
    server: SeaweedS3,
    prefix: str,
    *,
    bucket: str = "",
    access_key_id: str = "",
    secret_access_key: str = "",
    retry_timeout_s: float = 30.0,
) -> S3Objects:
    return S3Objects(
        bucket or server.bucket,
        prefix,
        endpoint=server.endpoint,
        access_key_id=access_key_id or server.access_key_id,
        secret_access_key=secret_access_key or server.secret_access_key,
        region=server.region,
        retry_timeout_s=retry_timeout_s,
    )


@dataclass
class Backed:
    name: str
    store: Store
    # Write bytes at an object's address (its key; the Data Bank: its file id), unseen.
    overwrite: Callable[[str, bytes], Awaitable[None]]


@pytest.fixture(params=BACKENDS)
async def backed(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backed]:
    name: str = request.param
    if name == "local":
        root = tmp_path / "data" / "store"

        async def write_local(address: str, data: bytes) -> None:
            (root / address).write_bytes(data)

        async with Store(LocalObjects(root)) as store:
            yield Backed(name, store, write_local)
    elif name == "s3":
        server: SeaweedS3 = request.getfixturevalue("s3_server")
        prefix = f"t-{uuid.uuid4().hex[:10]}"
        raw = raw_s3(server, prefix)

        async def write_s3(address: str, data: bytes) -> None:
            await obstore.put_async(raw, address, data)

        async with Store(s3_objects(server, prefix)) as store:
            yield Backed(name, store, write_s3)
    else:
        bank = FakeDataBank(tmp_path / "bank")
        await bank.start()

        async def write_bank(address: str, data: bytes) -> None:
            (bank.root / address).write_bytes(data)

        try:
            async with Store(DataBankObjects(bank.url, bank.key), 4) as store:
                yield Backed(name, store, write_bank)
        finally:
            await bank.stop()


def make_folder(root: Path) -> dict[str, bytes]:
    """Nested dirs, an empty file, binary and text; returns relative path → bytes."""
    files = {
        "config.json": b'{"model_type": "gpt2"}',
        "model.safetensors": os.urandom(200_000),
        "empty.txt": b"",
        "best/model.safetensors": os.urandom(5_000),
        "deep/a/b/c.bin": bytes(range(256)) * 10,
        ".hidden": b"dot file",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".part", ".tmp", ".old")))


async def test_file_round_trip(backed: Backed, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    src = tmp_path / "weights.bin"
    src.write_bytes(data)

    ptr = await backed.store.put_file(src, "runs/r1/weights.bin")

    assert ptr.backend == backed.name
    assert (ptr.key, ptr.kind, ptr.size) == ("runs/r1/weights.bin", "file", len(data))
    assert ptr.sha256 == hashlib.sha256(data).hexdigest()
    assert ptr.file_id == (ptr.sha256 if backed.name == "databank" else "")
    # What callers record in Redis comes back equal.
    assert msgspec.json.decode(msgspec.json.encode(ptr), type=Pointer) == ptr
    assert await backed.store.exists(ptr)

    out = tmp_path / "fetched" / "w.bin"
    assert await backed.store.get(ptr, out) == out
    assert out.read_bytes() == data
    assert leftovers(out.parent) == []
    out.write_bytes(b"stale")  # a get replaces what is at dest
    await backed.store.get(ptr, out)
    assert out.read_bytes() == data


async def test_empty_file_round_trip(backed: Backed, tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    ptr = await backed.store.put_file(tmp_path / "empty", "e/empty")
    assert ptr.size == 0
    assert await backed.store.exists(ptr)
    await backed.store.get(ptr, tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == b""


async def test_folder_round_trip(backed: Backed, tmp_path: Path) -> None:
    src = tmp_path / "run"
    files = make_folder(src)

    ptr = await backed.store.put_folder(src, "runs/r2")

    assert (ptr.kind, ptr.key, ptr.size) == ("folder", "runs/r2", sum(map(len, files.values())))
    assert await backed.store.exists(ptr)
    dest = tmp_path / "cache" / "r2"
    dest.mkdir(parents=True)
    (dest / "stale.txt").write_text("from before")  # replaced whole, not merged
    await backed.store.get(ptr, dest)
    assert tree(dest) == files
    assert leftovers(dest.parent) == []
    if backed.store.can_list:
        assert await backed.store.list("runs") == ["runs/r2"]  # the folder, once


async def test_empty_folder_round_trip(backed: Backed, tmp_path: Path) -> None:
    (tmp_path / "nothing").mkdir()
    ptr = await backed.store.put_folder(tmp_path / "nothing", "f/nothing")
    assert ptr.size == 0
    await backed.store.get(ptr, tmp_path / "back")
    assert (tmp_path / "back").is_dir() and tree(tmp_path / "back") == {}


async def test_list_and_delete(backed: Backed, tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"a")
    make_folder(tmp_path / "run")
    store = backed.store
    if backed.name == "databank":
        assert not store.can_list
        with pytest.raises(Unsupported, match="cannot list"):
            await store.list("t")
        with pytest.raises(Unsupported, match="cannot delete"):
            await store.delete("t/a.bin")
        return
    a = await store.put_file(tmp_path / "a.bin", "t/a.bin")
    b = await store.put_file(tmp_path / "a.bin", "t/sub/b.bin")
    run = await store.put_folder(tmp_path / "run", "t/run")
    await store.put_file(tmp_path / "a.bin", "other/c.bin")

    assert await store.list("t") == ["t/a.bin", "t/run", "t/sub/b.bin"]
    assert await store.list("t/sub") == ["t/sub/b.bin"]
    assert await store.list("t/su") == []  # whole path segments, not a string prefix
    assert await store.list() == ["other/c.bin", "t/a.bin", "t/run", "t/sub/b.bin"]

    await store.delete("t/run")
    assert not await store.exists(run)
    with pytest.raises(NotInStore):
        await store.get(run, tmp_path / "gone")
    assert not (tmp_path / "gone").exists()
    await store.delete("t/a.bin")
    await store.delete("t/never-was")  # no error
    assert not await store.exists(a)
    assert await store.exists(b)
    assert await store.list("t") == ["t/sub/b.bin"]


async def test_a_missing_object_is_not_in_store(backed: Backed, tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"x")
    ptr = await backed.store.put_file(tmp_path / "x", "m/x")
    gone = msgspec.structs.replace(ptr, key="m/never", file_id="0" * 64 if ptr.file_id else "")
    assert not await backed.store.exists(gone)
    with pytest.raises(NotInStore):
        await backed.store.get(gone, tmp_path / "out")
    other = msgspec.structs.replace(ptr, backend="s3" if backed.name != "s3" else "local")
    with pytest.raises(NotInStore, match="not this one"):
        await backed.store.get(other, tmp_path / "out")
    assert not (tmp_path / "out").exists()


async def test_a_wrong_sha256_is_refused_and_fetched_again(backed: Backed, tmp_path: Path) -> None:
    data = os.urandom(100_000)
    (tmp_path / "w.bin").write_bytes(data)
    ptr = await backed.store.put_file(tmp_path / "w.bin", "c/w.bin")
    address = ptr.file_id or ptr.key
    bad = bytes([data[0] ^ 0xFF]) + data[1:]  # same size: only the hash can tell
    await backed.overwrite(address, bad)

    out = tmp_path / "out" / "w.bin"
    with capture_logs() as logs, pytest.raises(StoreError, match="downloaded twice"):
        await backed.store.get(ptr, out)
    refused = [e for e in logs if e["event"] == "sha256 mismatch, refused"]
    assert [e["attempt"] for e in refused] == [1, 2]
    assert refused[0]["got"] == hashlib.sha256(bad).hexdigest()
    assert not out.exists() and leftovers(out.parent) == []

    await backed.overwrite(address, data)  # the store has the right bytes again
    await backed.store.get(ptr, out)
    assert out.read_bytes() == data


async def test_a_corrupt_file_in_a_folder_fails_the_whole_get(
    backed: Backed, tmp_path: Path
) -> None:
    files = make_folder(tmp_path / "run")
    ptr = await backed.store.put_folder(tmp_path / "run", "c/run")
    sha = hashlib.sha256(files["deep/a/b/c.bin"]).hexdigest()
    await backed.overwrite(sha if backed.name == "databank" else "c/run/deep/a/b/c.bin", b"x")
    dest = tmp_path / "cache" / "run"
    with pytest.raises(StoreError):
        await backed.store.get(ptr, dest)
    assert not dest.exists() and leftovers(dest.parent) == []


async def test_keys_are_checked(backed: Backed, tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"x")
    for key in ["", "/abs", "a//b", "../up", "a/./b", "a/", "back\\slash"]:
        with pytest.raises(UserError, match="not a valid store key"):
            await backed.store.put_file(tmp_path / "x", key)
    with pytest.raises(UserError, match="not a file"):
        await backed.store.put_file(tmp_path / "nope", "k")
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / MANIFEST).write_text("{}")
    with pytest.raises(UserError, match="keeps for itself"):
        await backed.store.put_folder(tmp_path / "f", "k")


# ------------------------------------------------------------------------------ S3 only


async def test_a_big_file_goes_up_in_parts(s3_server: SeaweedS3, tmp_path: Path) -> None:
    data = os.urandom(20 << 20)
    (tmp_path / "big").write_bytes(data)
    prefix = f"t-{uuid.uuid4().hex[:10]}"
    async with Store(s3_objects(s3_server, prefix)) as store:
        ptr = await store.put_file(tmp_path / "big", "ckpt/big")
        await store.get(ptr, tmp_path / "back")
    meta = await obstore.head_async(raw_s3(s3_server, prefix), "ckpt/big")
    # A multipart upload's ETag is "<md5 of the parts' md5s>-<number of parts>".
    etag = (meta["e_tag"] or "").strip('"')
    assert "-" in etag and int(etag.rsplit("-", 1)[1]) >= 2, etag
    assert meta["size"] == len(data) == ptr.size
    assert (tmp_path / "back").read_bytes() == data


async def test_an_outage_is_transient(s3_server: SeaweedS3, tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(os.urandom(10_000))
    prefix = f"t-{uuid.uuid4().hex[:10]}"
    async with Store(s3_objects(s3_server, prefix, retry_timeout_s=1.0)) as store:
        ptr = await store.put_file(tmp_path / "a", "o/a")
        s3_server.stop()
        try:
            with pytest.raises(StoreError):
                await store.get(ptr, tmp_path / "during")
            with pytest.raises(StoreError):
                await store.put_file(tmp_path / "a", "o/b")
            with pytest.raises(StoreError):
                await store.exists(ptr)
            assert not (tmp_path / "during").exists()
        finally:
            s3_server.start()
        # Back: the same endpoint, nothing lost, and the same store object works again.
        await store.get(ptr, tmp_path / "after")
        assert (tmp_path / "after").read_bytes() == (tmp_path / "a").read_bytes()
        b = await store.put_file(tmp_path / "a", "o/b")
        assert await store.exists(b)


async def test_bad_credentials_and_a_missing_bucket_are_user_errors(
    s3_server: SeaweedS3, tmp_path: Path
) -> None:
    (tmp_path / "a").write_bytes(b"a")
    async with Store(s3_objects(s3_server, "p")) as good:
        ptr = await good.put_file(tmp_path / "a", "k/a")
    for wrong in (
        s3_objects(s3_server, "p", secret_access_key="not-the-secret"),
        s3_objects(s3_server, "p", access_key_id="nobody"),
    ):
        async with Store(wrong) as store:
            with pytest.raises(UserError, match="refused the credentials"):
                await store.put_file(tmp_path / "a", "k/b")
            with pytest.raises(UserError, match="refused the credentials"):
                await store.get(ptr, tmp_path / "out")
            with pytest.raises(UserError, match="refused the credentials"):
                await store.list("k")
    async with Store(s3_objects(s3_server, "p", bucket="no-such-bucket")) as store:
        with pytest.raises(UserError, match="does not exist"):
            await store.put_file(tmp_path / "a", "k/b")
        with pytest.raises(UserError, match="does not exist"):
            await store.exists(ptr)
        with pytest.raises(UserError, match="does not exist"):
            await store.list()


async def test_data_bank_errors(tmp_path: Path) -> None:
    """A rejected key is the user's; a 5xx or a misreported upload is transient."""
    bank = FakeDataBank(tmp_path / "bank")
    await bank.start()
    (tmp_path / "a").write_bytes(b"a")
    try:
        async with Store(DataBankObjects(bank.url, "wrong-key")) as store:
            with pytest.raises(UserError, match="rejected the API key"):
                await store.put_file(tmp_path / "a", "k/a")
        async with Store(DataBankObjects(bank.url, bank.key)) as store:
            bank.fail_times = 1
            with pytest.raises(StoreError, match="503"):
                await store.put_file(tmp_path / "a", "k/a")
            bank.misreport_times = 1
            with pytest.raises(StoreError, match="stored k/a as 0000"):
                await store.put_file(tmp_path / "a", "k/a")
            ptr = await store.put_file(tmp_path / "a", "k/a")
            bank.answer_status = 502
            with pytest.raises(StoreError, match="502"):
                await store.get(ptr, tmp_path / "out")
    finally:
        await bank.stop()


# ------------------------------------------------------------------------- make_store


async def test_make_store_follows_the_settings(s3_server: SeaweedS3, tmp_path: Path) -> None:
    local = make_store(Settings.from_env({"MT_DATA_DIR": str(tmp_path / "d")}))
    assert isinstance(local.objects, LocalObjects)
    assert local.objects.root == tmp_path / "d" / "store"
    assert Settings.from_env({}).cache_gb == 20.0
    assert Settings.from_env({"MT_CACHE_GB": "2.5"}).cache_gb == 2.5

    prefix = f"t-{uuid.uuid4().hex[:10]}/nested"
    env = {"MT_DATA_DIR": str(tmp_path / "d"), **s3_server.env(prefix)}
    (tmp_path / "a").write_bytes(b"through the settings")
    async with make_store(Settings.from_env(env)) as store:
        assert store.backend == "s3"
        ptr = await store.put_file(tmp_path / "a", "k/a")
        await store.get(ptr, tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == b"through the settings"
    # The prefix of MT_STORE_URL is where the objects went in the bucket.
    assert await obstore.head_async(raw_s3(s3_server), f"{prefix}/k/a")

    bank = {"MT_DATA_BANK_URL": "http://127.0.0.1:1", "MT_DATA_BANK_KEY": "k"}
    for url in ("databank:", "databank"):
        assert make_store(Settings.from_env({**bank, "MT_STORE_URL": url})).backend == "databank"
    with pytest.raises(UserError, match="MT_DATA_BANK_URL"):
        make_store(Settings.from_env({"MT_STORE_URL": "databank:"}))
    for bad in ("ftp://host/x", "s3://", "bucket/prefix"):
        with pytest.raises(UserError, match="MT_STORE_URL"):
            make_store(Settings.from_env({"MT_STORE_URL": bad}))
