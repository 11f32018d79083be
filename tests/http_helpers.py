"""A real control endpoint on a loopback port, for black-box HTTP tests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import NamedTuple

import aiohttp
from aiohttp import web

from actors.runtime.config import Settings
from actors.web.app import bound_url, make_runner


class Served(NamedTuple):
    url: str
    session: aiohttp.ClientSession  # base_url = url: pass paths such as "/runs/x"


@contextlib.asynccontextmanager
async def start_app(settings: Settings, redis_url: str) -> AsyncIterator[Served]:
    """The app behind a real TCP server on 127.0.0.1:<free port> (the runner `serve` uses),
    and a client session."""
    runner = make_runner(settings, redis_url)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = bound_url(runner)
        async with aiohttp.ClientSession(base_url=url) as session:
            yield Served(url, session)
    finally:
        await runner.cleanup()


async def sse_messages(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, str]]:
    """The messages of an SSE response as they arrive ({"event", "id", "data"}; comments
    skipped), until the server closes the stream."""
    current: dict[str, str] = {}
    async for raw in resp.content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if current:
                yield current
            current = {}
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        current[name] = f"{current[name]}\n{value}" if name in current else value
    if current:
        yield current


async def read_sse(resp: aiohttp.ClientResponse) -> list[dict[str, str]]:
    """Every message of an SSE response until the server closes it."""
    return [message async for message in sse_messages(resp)]
