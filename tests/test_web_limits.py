"""The control endpoint under slow clients and foreign browsers: live streams give their
Redis connection back when their client leaves and are capped; slow headers, bodies and
readers are cut off; POST bodies must be JSON; other origins are refused; the API key is
compared byte for byte. Real app on loopback, real clients, bounded loops."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import msgspec
import pytest
import redis.asyncio as aioredis

from actors.runtime.config import Settings
from actors.runtime.outcome import add_event
from protocol.codec import FIELD
from protocol.events import RunQueued
from protocol.keys import Keys
from tests.http_helpers import Served, start_app

RUN = "run-live"


@pytest.fixture
def settings(keys: Keys, tmp_path: Path) -> Settings:
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "tiny.txt").write_text("to be or not to be\n" * 20, encoding="utf-8")
    return Settings(
        prefix=keys.prefix, data_dir=tmp_path / "data", corpus_root=root, http_timeout_s=1.0
    )


@pytest.fixture
async def live_run(redis: aioredis.Redis, keys: Keys) -> str:
    """A queued run that never ends, so its streams follow until their client leaves."""
    async with redis.pipeline(transaction=True) as pipe:
        add_event(pipe, keys, RunQueued(run_id=RUN, steps=["ingest", "trainer"]))
        await pipe.execute()
    return RUN


@pytest.fixture
async def http(settings: Settings, redis_url: str, live_run: str) -> AsyncIterator[Served]:
    async with start_app(settings, redis_url) as served:
        yield served


async def clients(redis: aioredis.Redis) -> int:
    """Connections the Redis server has open (this process's are the only ones that change)."""
    return len(await redis.client_list())


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


async def eventually(check: Callable[[], Awaitable[bool]], within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while not await check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


async def queued(redis: aioredis.Redis, keys: Keys) -> int:
    return int(await redis.xlen(keys.cmd("ingest")))


# ---------------------------------------------------------------------------------- streams


async def test_streams_give_back_their_redis_connections_and_files(
    settings: Settings, redis_url: str, redis: aioredis.Redis, live_run: str
) -> None:
    """200 SSE clients (events and logs) connect, then leave: the endpoint's Redis
    connections and open files return to their level before."""
    roomy = dataclasses.replace(settings, max_streams=250)
    async with start_app(roomy, redis_url) as http:
        async with http.session.get("/healthz") as resp:  # the app and its client are warm
            assert resp.status == 200
        redis_before, files_before = await clients(redis), open_files()
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(base_url=http.url, connector=connector) as streams:
            paths = [f"/runs/{live_run}/events", f"/runs/{live_run}/logs/stream"] * 100
            opened = await asyncio.gather(*(streams.get(path) for path in paths))
            assert [r.status for r in opened] == [200] * 200
            during = await clients(redis)
            # One connection per live stream (a shared pool would hold 100 at most).
            assert during >= redis_before + 200, (redis_before, during)
            for resp in opened:
                resp.close()

        async def back() -> bool:
            return await clients(redis) <= redis_before and open_files() <= files_before

        assert await eventually(back, within_s=15.0), (
            f"redis clients {redis_before} -> {await clients(redis)}, "
            f"open files {files_before} -> {open_files()}"
        )


async def test_a_stream_over_the_cap_gets_503_with_retry_after(
    settings: Settings, redis_url: str, live_run: str
) -> None:
    capped = dataclasses.replace(settings, max_streams=3)
    async with start_app(capped, redis_url) as http:
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(base_url=http.url, connector=connector) as streams:
            path = f"/runs/{live_run}/events"
            opened = [await streams.get(path) for _ in range(3)]
            assert [r.status for r in opened] == [200] * 3
            async with streams.get(f"/runs/{live_run}/logs/stream") as over:
                body = await over.json()
                assert over.status == 503, body
                assert body["code"] == "TOO_MANY_STREAMS" and "3" in body["message"]
                assert int(over.headers["Retry-After"]) > 0
            opened.pop().close()

            async def a_slot_is_free() -> bool:
                async with streams.get(f"{path}?follow=false") as resp:
                    return resp.status == 200

            assert await eventually(a_slot_is_free, within_s=5.0)
            for resp in opened:
                resp.close()


async def test_a_client_that_stops_reading_is_cut_off(
    settings: Settings, redis_url: str, redis: aioredis.Redis, keys: Keys, live_run: str
) -> None:
    """A client that opens a stream and reads nothing loses it after the HTTP timeout, and
    its slot is free again: it cannot hold the endpoint's streams for as long as it likes."""
    capped = dataclasses.replace(settings, max_streams=1)
    line = msgspec.json.encode({"event": "step", "pad": "x" * 1000})
    async with redis.pipeline(transaction=False) as pipe:
        for _ in range(10_000):  # 10 MB: far more than the socket buffers hold
            pipe.xadd(keys.logs(live_run), {FIELD: line})
        await pipe.execute()
    async with start_app(capped, redis_url) as http:
        host, port = http.url.removeprefix("http://").split(":")
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect((host, int(port)))
        request = f"GET /runs/{live_run}/logs/stream?tail=10000 HTTP/1.1\r\nHost: {host}\r\n\r\n"
        stalled.sendall(request.encode())
        try:

            async def the_slot_is_free() -> bool:
                async with http.session.get(f"/runs/{live_run}/events?follow=false") as resp:
                    return resp.status == 200

            assert await eventually(the_slot_is_free, within_s=10.0)
        finally:
            stalled.close()


# ------------------------------------------------------------------------------ slow clients


async def test_a_client_that_sends_headers_slowly_is_cut_off(http: Served) -> None:
    host, port = http.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    started = time.monotonic()
    closed_after: float | None = None
    try:
        for _ in range(50):  # a header byte every 0.1 s for at most 5 s
            writer.write(b"X")
            await writer.drain()
            try:
                if await asyncio.wait_for(reader.read(1024), 0.1) == b"":
                    closed_after = time.monotonic() - started
                    break
            except TimeoutError:
                continue
    except ConnectionError:
        closed_after = time.monotonic() - started
    finally:
        writer.close()
    assert closed_after is not None, "the slow client was still connected after 5 s"
    assert closed_after < 3.0  # http_timeout_s is 1 s


async def test_a_body_sent_slowly_gets_408(http: Served) -> None:
    host, port = http.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = (
        "POST /runs/train HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Content-Length: 100\r\n\r\n"
    )
    writer.write(head.encode() + b'{"corpus_path": ')
    try:
        answer = await asyncio.wait_for(reader.read(4096), 5.0)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]


# ---------------------------------------------------------------------------------- browsers


async def test_a_post_that_is_not_json_is_415_and_queues_nothing(
    http: Served, redis: aioredis.Redis, keys: Keys, live_run: str
) -> None:
    """A text/plain or form POST is what a foreign page can send without a preflight."""
    body = b'{"corpus_path": "tiny.txt"}'
    for content_type in ("text/plain", "application/x-www-form-urlencoded"):
        headers = {"Content-Type": content_type}
        async with http.session.post("/runs/train", data=body, headers=headers) as resp:
            answer = await resp.json()
            assert resp.status == 415, answer
            assert answer["code"] == "UNSUPPORTED_MEDIA_TYPE"
        async with http.session.post(f"/runs/{live_run}/cancel", data=b"{}", headers=headers) as r:
            assert r.status == 415
    assert await queued(redis, keys) == 0
    assert not await redis.exists(keys.cancel(live_run))
    # JSON is accepted, and so is a cancel without a body (whatever its Content-Type).
    headers = {"Content-Type": "application/json; charset=utf-8"}
    async with http.session.post("/runs/train", data=body, headers=headers) as resp:
        assert resp.status == 202, await resp.text()
    assert await queued(redis, keys) == 1
    async with http.session.post(f"/runs/{live_run}/cancel") as resp:
        assert resp.status == 202, await resp.text()


async def test_cross_origin_requests_are_refused_same_origin_ones_work(
    http: Served, redis: aioredis.Redis, keys: Keys, live_run: str
) -> None:
    body = {"corpus_path": "tiny.txt"}
    for origin in ("http://evil.example", "null", http.url.replace("127.0.0.1", "localhost")):
        headers = {"Origin": origin}
        async with http.session.post("/runs/train", json=body, headers=headers) as resp:
            answer = await resp.json()
            assert resp.status == 403, (origin, answer)
            assert answer["code"] == "FORBIDDEN"
        async with http.session.post(f"/runs/{live_run}/cancel", headers=headers) as resp:
            assert resp.status == 403
        async with http.session.get(f"/runs/{live_run}", headers=headers) as resp:
            assert resp.status == 403
    assert await queued(redis, keys) == 0
    assert not await redis.exists(keys.cancel(live_run))
    # The dashboard's own page (same origin) and clients that send no Origin work.
    async with http.session.post("/runs/train", json=body, headers={"Origin": http.url}) as resp:
        assert resp.status == 202, await resp.text()
    async with http.session.post("/runs/train", json=body) as resp:
        assert resp.status == 202, await resp.text()
    assert await queued(redis, keys) == 2
    async with http.session.post(f"/runs/{live_run}/cancel", headers={"Origin": http.url}) as resp:
        assert resp.status == 202, await resp.text()
    # Behind a proxy the page's origin is the proxy's (X-Forwarded-Host).
    proxied = {"Origin": "https://trainer.example", "X-Forwarded-Host": "trainer.example"}
    async with http.session.get(f"/runs/{live_run}", headers=proxied) as resp:
        assert resp.status == 200


# ------------------------------------------------------------------------------------ key


async def test_a_key_with_a_trailing_space_is_401(
    settings: Settings, redis_url: str, live_run: str
) -> None:
    keyed = dataclasses.replace(settings, api_key="s3cret")
    async with start_app(keyed, redis_url) as http:
        for given in ("s3cret ", "s3cret\u00a0", " s3cret", "s3cre"):
            async with http.session.get("/runs", params={"api_key": given}) as resp:
                assert resp.status == 401, repr(given)
        host, port = http.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        # A non-breaking space is part of the header's value (HTTP strips only SP and HTAB).
        writer.write(b"GET /runs HTTP/1.1\r\nHost: x\r\nX-Api-Key: s3cret\xc2\xa0\r\n\r\n")
        try:
            answer = await asyncio.wait_for(reader.read(4096), 5.0)
        finally:
            writer.close()
        assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
        async with http.session.get("/runs", headers={"X-Api-Key": "s3cret"}) as resp:
            assert resp.status == 200
