"""The embedded valkey server: starts on loopback, persists every write to its AOF under the
data dir, and its url file exists exactly while it runs."""

from __future__ import annotations

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
