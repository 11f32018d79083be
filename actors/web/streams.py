"""The run's log file and its events, as plain text and as server-sent events."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import msgspec
from aiohttp import web

from actors.client.client import Entry, ServiceClient, start_after
from actors.web.context import CLIENT, MAX_BODY, SETTINGS, STOPPING, STREAMS
from actors.web.errors import ApiError, not_found
from actors.web.http import bool_query, int_query, run_of, text
from actors.web.sse import PING_S, gone, open_stream, sse
from protocol.events import TERMINAL_STATUSES

LOG_POLL_S = 0.25
RETRY_AFTER_S = 5  # what a stream refused for want of a slot is told to wait
_ENTRY_ID = re.compile(r"^\d{1,20}-\d{1,20}$")


def tail_lines(path: Path, n: int) -> tuple[list[bytes], int]:
    """The last n complete lines of a file and the offset just after the last of them."""
    with path.open("rb") as f:
        pos = f.seek(0, 2)
        chunks: list[bytes] = []
        newlines = 0
        while pos > 0 and newlines <= n:
            step = min(65536, pos)
            pos -= step
            f.seek(pos)
            chunk = f.read(step)
            chunks.append(chunk)
            newlines += chunk.count(b"\n")
    data = b"".join(reversed(chunks))
    end = data.rfind(b"\n")
    if end < 0:
        return [], 0
    lines = data[:end].split(b"\n")
    return (lines[-n:] if n else []), pos + end + 1


def read_from(path: Path, offset: int, limit: int = MAX_BODY) -> tuple[list[bytes], int]:
    """Complete lines from offset on (about `limit` bytes at most) and the offset after them.
    A single line longer than `limit` comes in pieces rather than stalling the reader."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, 2)
            if size < offset:  # truncated or replaced: start over
                offset = 0
            f.seek(offset)
            data = f.read(limit)
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n")
    if end < 0:
        return ([data], offset + len(data)) if len(data) >= limit else ([], offset)
    return data[:end].split(b"\n"), offset + end + 1


def _short_time(value: object) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S")
    text = str(value)
    return text.replace("T", " ").split(".")[0].removesuffix("Z").removesuffix("+00:00")


def _value(value: object) -> str:
    if isinstance(value, str) and value and not any(c.isspace() or c == '"' for c in value):
        return value
    if isinstance(value, float):
        return f"{value:.6g}"
    return msgspec.json.encode(value).decode()


def render_log_line(raw: bytes) -> str:
    """One logs.jsonl line as `[time] LEVEL event key=value …`."""
    try:
        obj = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return raw.decode("utf-8", "replace")
    if not isinstance(obj, dict):
        return raw.decode("utf-8", "replace")
    parts: list[str] = []
    if "timestamp" in obj:
        parts.append(f"[{_short_time(obj.pop('timestamp'))}]")
    if "level" in obj:
        parts.append(str(obj.pop("level")).upper())
    if "event" in obj:
        parts.append(str(obj.pop("event")))
    obj.pop("run_id", None)
    parts.extend(f"{k}={_value(v)}" for k, v in obj.items())
    return " ".join(parts)


async def get_logs(request: web.Request) -> web.StreamResponse:
    state = await run_of(request)
    tail = int_query(request, "tail", 200, 0, 10_000)
    path = request.app[SETTINGS].run_dir(state.run_id) / "logs.jsonl"
    try:
        lines, _ = await asyncio.to_thread(tail_lines, path, tail)
    except FileNotFoundError:
        raise not_found(f"run {state.run_id!r} has no logs yet") from None
    text = "".join(render_log_line(line) + "\n" for line in lines if line.strip())
    return web.Response(text=text, content_type="text/plain")


@contextlib.asynccontextmanager
async def live_stream(request: web.Request) -> AsyncIterator[ServiceClient]:
    """A slot among the endpoint's live streams and a Redis connection of the stream's own,
    both given back when the stream ends for any reason (its client left, its run ended, the
    server stops). Over `max_streams` (MT_MAX_STREAMS): 503 with Retry-After."""
    slots = request.app[STREAMS]
    if not slots.take():
        raise ApiError(
            503,
            "TOO_MANY_STREAMS",
            f"this endpoint serves at most {slots.limit} live streams at once; "
            f"retry in {RETRY_AFTER_S} s",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    try:
        client = request.app[CLIENT].dedicated()
        try:
            yield client
        finally:
            await client.aclose()
    finally:
        slots.give_back()


async def write(request: web.Request, resp: web.StreamResponse, data: bytes) -> None:
    """Send data on a stream; a client that takes none of it for the HTTP timeout is cut off
    (ConnectionResetError), or a reader that stopped reading would hold its slot forever."""
    try:
        async with asyncio.timeout(request.app[SETTINGS].http_timeout_s):
            await resp.write(data)
    except TimeoutError:
        if request.transport is not None:
            request.transport.abort()
        raise ConnectionResetError("the client stopped reading") from None


async def stream_logs(request: web.Request) -> web.StreamResponse:
    """SSE of the run's logs.jsonl: the tail, then (follow) appended lines until the run ends.

    Each batch's last message has `id: <byte offset>`; a Last-Event-ID resumes from there."""
    async with live_stream(request) as client:
        return await _stream_logs(request, client)


async def _stream_logs(request: web.Request, client: ServiceClient) -> web.StreamResponse:
    state = await run_of(request, client)
    tail = int_query(request, "tail", 200, 0, 10_000)
    follow = bool_query(request, "follow", True)
    app = request.app
    path = app[SETTINGS].run_dir(state.run_id) / "logs.jsonl"
    last = request.headers.get("Last-Event-ID", "")
    resp = await open_stream(request)

    async def send(lines: list[bytes], offset: int) -> None:
        lines = [line for line in lines if line.strip()]
        for i, line in enumerate(lines):
            eid = str(offset) if i == len(lines) - 1 else ""
            await write(request, resp, sse(render_log_line(line), eid=eid))

    async def catch_up(offset: int) -> int:
        while True:
            lines, offset = await asyncio.to_thread(read_from, path, offset)
            if not lines:
                return offset
            await send(lines, offset)

    try:
        if last.isdigit() and len(last) < 20:
            offset = await catch_up(int(last))
        else:
            try:
                lines, offset = await asyncio.to_thread(tail_lines, path, tail)
            except FileNotFoundError:
                lines, offset = [], 0
            await send(lines, offset)
        status = state.status
        pinged = time.monotonic()
        while follow and not app[STOPPING].is_set() and not gone(request):
            # Status first, then the file: lines written before the run ended are all sent.
            current = await client.find_run(state.run_id)
            status = current.status if current else status
            offset = await catch_up(offset)
            if status in TERMINAL_STATUSES:
                break
            if time.monotonic() - pinged > PING_S:
                await write(request, resp, b": ping\n\n")
                pinged = time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(app[STOPPING].wait(), LOG_POLL_S)
        if not gone(request):
            end = msgspec.json.encode({"status": status}).decode()
            await write(request, resp, sse(end, event="end"))
    except ConnectionError:
        pass  # the client went away
    return resp


async def stream_events(request: web.Request) -> web.StreamResponse:
    """SSE of the run's events: history (from its creation, filtered by run), then live ones
    until a terminal event; follow=false ends at the history's end.

    `id:` is the stream entry id, so Last-Event-ID resumes exactly."""
    async with live_stream(request) as client:
        return await _stream_events(request, client)


async def _stream_events(request: web.Request, client: ServiceClient) -> web.StreamResponse:
    state = await run_of(request, client)
    follow = bool_query(request, "follow", True) and state.status not in TERMINAL_STATUSES
    app = request.app
    last = request.headers.get("Last-Event-ID", "")
    if not _ENTRY_ID.fullmatch(last):
        last = start_after(state)
    resp = await open_stream(request)

    async def send(entries: list[Entry]) -> bool:
        """Send these events; True once the run's terminal event went out."""
        for entry in entries:
            await write(request, resp, sse(text(entry.raw), event=entry.kind, eid=entry.id))
            if entry.terminal:
                return True
        return False

    try:
        done = False
        async with contextlib.aclosing(client.history_pages(state.run_id, after=last)) as pages:
            async for entries, scanned in pages:
                last = scanned
                if done := await send(entries):
                    break
        if not follow or done or app[STOPPING].is_set() or gone(request):
            return resp
        pinged = time.monotonic()
        async with contextlib.aclosing(client.follow(state.run_id, after=last)) as live:
            async for batch in live:
                if await send(batch) or app[STOPPING].is_set() or gone(request):
                    break
                if time.monotonic() - pinged > PING_S:
                    await write(request, resp, b": ping\n\n")
                    pinged = time.monotonic()
    except ConnectionError:
        pass  # the client went away
    return resp
