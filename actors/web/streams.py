"""The run's log (its Redis stream, `<prefix>:logs:<run_id>`) and its events, as plain
text and as server-sent events. Nothing here reads a local run folder: any control endpoint
that reaches Redis serves any run's log."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import msgspec
from aiohttp import web

from actors.client.client import Entry, ServiceClient, start_after
from actors.runtime.connection import read_entries, stream_entries
from actors.web.context import CLIENT, SETTINGS, STOPPING, STREAMS
from actors.web.errors import ApiError, not_found
from actors.web.http import bool_query, int_query, run_of, text
from actors.web.sse import PING_S, gone, open_stream, sse
from protocol.codec import FIELD
from protocol.events import TERMINAL_STATUSES

RETRY_AFTER_S = 5  # what a stream refused for want of a slot is told to wait
PAGE = 200  # log lines per read while catching up
# Once the run has ended, lines its actor logs right after (the last commit's own line) are
# written by the actor's flusher a moment later: a follower waits this long for them.
SETTLE_MS = 300
_ENTRY_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
_DATA = FIELD.encode()

LogEntry = tuple[str, dict[bytes, bytes]]  # (stream entry id, fields)


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
    """One log line (JSON, as the run's log stream and logs.jsonl hold it) as
    `[time] LEVEL event key=value …`."""
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


def _line(fields: dict[bytes, bytes]) -> str:
    return render_log_line(fields.get(_DATA, b""))


async def _tail(client: ServiceClient, run_id: str, n: int) -> list[LogEntry]:
    """The run's last n log lines, oldest first."""
    if n <= 0:
        return []
    newest = await client.redis.xrevrange(client.keys.logs(run_id), count=n)
    return list(reversed(stream_entries(newest)))


async def get_logs(request: web.Request) -> web.StreamResponse:
    state = await run_of(request)
    tail = int_query(request, "tail", 200, 0, 10_000)
    client = request.app[CLIENT]
    entries = await _tail(client, state.run_id, tail)
    if not entries and not await client.redis.exists(client.keys.logs(state.run_id)):
        raise not_found(f"run {state.run_id!r} has no logs yet")
    body = "".join(_line(fields) + "\n" for _, fields in entries)
    return web.Response(text=body, content_type="text/plain")


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
    """SSE of the run's log: the tail, then (follow) new lines until the run ends.

    `id:` is the log stream's entry id, so Last-Event-ID resumes exactly after that line.
    A numeric Last-Event-ID (a byte offset into logs.jsonl, from endpoints before the log
    moved to Redis) resumes from the start of the log: lines may repeat, none is missed."""
    async with live_stream(request) as client:
        return await _stream_logs(request, client)


async def _stream_logs(request: web.Request, client: ServiceClient) -> web.StreamResponse:
    state = await run_of(request, client)
    tail = int_query(request, "tail", 200, 0, 10_000)
    follow = bool_query(request, "follow", True)
    app = request.app
    key = client.keys.logs(state.run_id)
    last_id = request.headers.get("Last-Event-ID", "")
    resp = await open_stream(request)

    async def send(entries: list[LogEntry]) -> None:
        for entry_id, fields in entries:
            await write(request, resp, sse(_line(fields), eid=entry_id))

    async def catch_up(after: str) -> str:
        """Send every line after entry `after`; the id of the last one sent."""
        while True:
            page = stream_entries(await client.redis.xrange(key, min=f"({after}", count=PAGE))
            await send(page)
            if page:
                after = page[-1][0]
            if len(page) < PAGE:
                return after

    async def wait_for_lines(after: str, block_ms: int) -> str:
        """Send the lines that arrive after `after` within block_ms (XREAD BLOCK)."""
        reader = client.blocking or client.redis  # a dedicated client: its one connection
        reply = await reader.xread({key: after}, count=PAGE, block=block_ms)
        entries = read_entries(reply)
        await send(entries)
        return entries[-1][0] if entries else after

    try:
        if _ENTRY_ID.fullmatch(last_id):
            after = await catch_up(last_id)
        elif last_id.isdigit():
            after = await catch_up("0-0")
        else:
            entries = await _tail(client, state.run_id, tail)
            await send(entries)
            if entries:
                after = entries[-1][0]
            else:  # tail=0 or no line yet: follow from the newest line, if any
                newest = stream_entries(await client.redis.xrevrange(key, count=1))
                after = newest[0][0] if newest else "0-0"
        status = state.status
        pinged = time.monotonic()
        while follow and not app[STOPPING].is_set() and not gone(request):
            # Status first, then the lines: every line logged before the run ended is sent.
            current = await client.find_run(state.run_id)
            ended = current is not None and current.status in TERMINAL_STATUSES
            status = current.status if current else status
            after = await catch_up(after)
            if ended:
                if state.status not in TERMINAL_STATUSES:  # it ended while we followed
                    while (nxt := await wait_for_lines(after, SETTLE_MS)) != after:
                        after = nxt
                break
            if time.monotonic() - pinged > PING_S:
                await write(request, resp, b": ping\n\n")
                pinged = time.monotonic()
            after = await wait_for_lines(after, client.block_ms)
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
