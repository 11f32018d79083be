"""Shared fixtures: a real Redis-compatible server (embedded valkey unless REDIS_URL is set)
and a real S3-compatible server (SeaweedFS `weed mini` on loopback)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from actors.runtime.connection import connect
from actors.runtime.embedded import EmbeddedRedis
from actors.runtime.seaweed import SeaweedS3
from protocol.keys import Keys
from tests.fake_services import FakeDataBank


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """One SeaweedFS for the session (its start costs ~2 s), bucket `server.bucket` made;
    a test may `stop()` and `start()` it (same endpoint, same data) to act out an outage.
    Tests keep apart by a key prefix of their own."""
    server = SeaweedS3(tmp_path_factory.mktemp("s3"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["s3", "databank"])
async def store_env(
    request: pytest.FixtureRequest, tmp_path: Path, keys: Keys
) -> AsyncIterator[dict[str, str]]:
    """The environment of a shared artifact store, once per backend: the session's
    SeaweedFS under this test's prefix, or a Data Bank server of the test's own."""
    if request.param == "s3":
        server: SeaweedS3 = request.getfixturevalue("s3_server")
        yield server.env(prefix=keys.prefix)
        return
    bank = FakeDataBank(tmp_path / "bank")
    await bank.start()
    try:
        yield {
            "MT_STORE_URL": "databank:",
            "MT_DATA_BANK_URL": bank.url,
            "MT_DATA_BANK_KEY": bank.key,
        }
    finally:
        await bank.stop()


@pytest.fixture
def keys() -> Keys:
    """A fresh key prefix per test, so tests never see each other's streams."""
    return Keys(prefix=f"t{uuid.uuid4().hex[:10]}")


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = connect(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d
