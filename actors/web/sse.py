"""Server-sent events: framing, opening a stream, noticing the client left."""

from __future__ import annotations

import re

from aiohttp import web

from actors.web.context import STREAM

PING_S = 15.0
_NEWLINE = re.compile(r"\r\n|\r|\n")


def sse(data: str, *, event: str = "", eid: str = "") -> bytes:
    lines = [f"event: {event}"] if event else []
    if eid:
        lines.append(f"id: {eid}")
    lines.extend(f"data: {line}" for line in _NEWLINE.split(data))
    return ("\n".join(lines) + "\n\n").encode()


async def open_stream(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await resp.prepare(request)
    request[STREAM] = resp
    return resp


def gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()
