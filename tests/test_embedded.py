"""The embedded valkey server: starts on loopback, persists every write to its AOF under the
data dir, and its url file exists exactly while it runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import redis

from actors.runtime.embedded import EmbeddedRedis


def test_embedded_server_starts_persists_and_stops(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path)
    server.start()
    try:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        assert (tmp_path / "redis" / "url").read_text() == server.url
        client = redis.Redis.from_url(server.url, socket_timeout=5.0)
        try:
            assert client.ping()
            client.xadd("s", {"data": b"x" * 64})
            assert client.config_get("appendonly") == {"appendonly": "yes"}
            assert client.config_get("appendfsync") == {"appendfsync": "always"}
        finally:
            client.close()
        aof = [p for p in (tmp_path / "redis").rglob("*.aof") if p.stat().st_size > 0]
        assert aof, "no append-only file written under the data dir"
        assert any(b"XADD" in p.read_bytes().upper() for p in aof)
    finally:
        server.stop()
    assert server.process is None
    assert not (tmp_path / "redis" / "url").exists()
    server.stop()  # a second stop is harmless


def test_a_restarted_server_has_the_data_back(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path) as first:
        port = first.port
        client = redis.Redis.from_url(first.url, socket_timeout=5.0)
        client.set("k", "v")
        client.close()
        first.kill()
    with EmbeddedRedis(tmp_path, port=port) as second:
        client = redis.Redis.from_url(second.url, socket_timeout=5.0)
        try:
            assert client.get("k") == b"v"
        finally:
            client.close()


async def test_a_server_without_a_live_owner_is_not_a_running_service(tmp_path: Path) -> None:
    """A server answers PING after its `up` was killed: the CLI must not send runs to it
    (no actors serve it) but start its own service, which adopts the server."""
    from actors.cli.common import running_url
    from actors.runtime.config import Settings
    from actors.runtime.embedded import has_owner

    settings = Settings(data_dir=tmp_path, corpus_root=tmp_path / "corpus")
    owner = subprocess.Popen(
        [sys.executable, "-c", _OWNER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert owner.stdout is not None
    url = owner.stdout.readline().strip()
    assert has_owner(tmp_path)
    assert await running_url(settings) == url
    owner.kill()  # kill -9 of the owner: its server lives on
    owner.wait()
    assert not has_owner(tmp_path)
    assert await running_url(settings) is None
    adopter = EmbeddedRedis(tmp_path)
    adopter.start()
    try:
        assert adopter.adopted is not None and adopter.url == url
        assert await running_url(settings) == url
    finally:
        adopter.stop()


_OWNER = """
import sys, time
from pathlib import Path
from actors.runtime.embedded import EmbeddedRedis
server = EmbeddedRedis(Path(sys.argv[1]))
server.start()
print(server.url, flush=True)
time.sleep(600)
"""
