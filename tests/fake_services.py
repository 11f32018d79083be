"""Real local HTTP servers (aiohttp, 127.0.0.1, a free port) that speak the contracts of the
Data Bank and of Discord's REST API, so the clients are tested over real sockets.

Both record every request; both can be told to misbehave (wrong key, server errors, rate
limits, a range they ignore, bytes they corrupt).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
from aiohttp import BodyPartReader, web


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: object = None  # decoded JSON for JSON requests
    status: int = 0  # what the server answered
    at: float = field(default_factory=time.monotonic)


class _Server:
    def __init__(self) -> None:
        self.app = web.Application(client_max_size=1 << 30)
        self.requests: list[Recorded] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> str:
        self._runner = web.AppRunner(self.app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def record(self, request: web.Request, status: int, body: object = None) -> None:
        self.requests.append(
            Recorded(request.method, request.path, dict(request.headers), body, status)
        )


def _error(status: int, code: str, message: str) -> web.Response:
    body = {"code": code, "message": message, "request_id": secrets.token_hex(8)}
    return web.json_response(body, status=status)


class FakeDataBank(_Server):
    """POST /files (multipart `file`, X-API-Key) → 201 {file_id, size, sha256, ...};
    GET /files/{id} with Range support (206, 416)."""

    def __init__(self, root: Path, key: str = "bank-key") -> None:
        super().__init__()
        self.root = root
        self.key = key
        self.answer_status: int | None = None  # answer every request with this status
        self.fail_times = 0  # answer the next N uploads with fail_status, then succeed
        self.fail_status = 503
        self.misreport_times = 0  # answer the next N uploads 201 with a wrong sha256
        self.ignore_range = False  # answer 200 with the whole file even to a Range request
        self.tamper = False  # serve the file with its first byte flipped
        root.mkdir(parents=True, exist_ok=True)
        self.app.router.add_post("/files", self.post_file)
        self.app.router.add_get("/files/{file_id}", self.get_file)

    def put(self, data: bytes) -> str:
        """Store a file directly (test setup); returns its id."""
        file_id = hashlib.sha256(data).hexdigest()
        (self.root / file_id).write_bytes(data)
        return file_id

    def stored(self, file_id: str) -> bytes:
        return (self.root / file_id).read_bytes()

    def _auth(self, request: web.Request) -> web.Response | None:
        if self.answer_status is not None:
            return _error(self.answer_status, "FORCED", f"told to answer {self.answer_status}")
        key = request.headers.get("X-API-Key")
        if not key:
            return _error(401, "UNAUTHORIZED", "Missing or invalid API key")
        if key != self.key:
            return _error(403, "FORBIDDEN", "Invalid API key or insufficient permission")
        return None

    async def post_file(self, request: web.Request) -> web.Response:
        denied = self._auth(request)
        if denied is not None:
            self.record(request, denied.status)
            return denied
        if self.fail_times > 0:
            self.fail_times -= 1
            await request.read()
            self.record(request, self.fail_status)
            return _error(self.fail_status, "UNAVAILABLE", "try again later")
        reader = await request.multipart()
        part = await reader.next()
        while part is not None and not (isinstance(part, BodyPartReader) and part.name == "file"):
            part = await reader.next()
        if not isinstance(part, BodyPartReader):
            self.record(request, 400)
            return _error(400, "INVALID_INPUT", "no file field")
        digest, size = hashlib.sha256(), 0
        tmp = self.root / f".upload-{secrets.token_hex(4)}"
        with tmp.open("wb") as f:
            while chunk := await part.read_chunk(1 << 16):
                digest.update(chunk)
                size += len(chunk)
                f.write(chunk)
        file_id = digest.hexdigest()
        tmp.replace(self.root / file_id)
        content_type = part.headers.get("Content-Type", "application/octet-stream")
        self.record(request, 201)
        reported = file_id
        if self.misreport_times > 0:
            self.misreport_times -= 1
            reported = "0" * 64
        return web.json_response(
            {
                "file_id": reported,
                "size": size,
                "sha256": reported,
                "content_type": content_type,
                "created_at": "2024-11-27T10:30:00+00:00",
            },
            status=201,
        )

    async def get_file(self, request: web.Request) -> web.Response:
        denied = self._auth(request)
        if denied is not None:
            self.record(request, denied.status)
            return denied
        path = self.root / request.match_info["file_id"]
        if not path.is_file():
            self.record(request, 404)
            return _error(404, "NOT_FOUND", "File not found")
        data = path.read_bytes()
        if self.tamper:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        size = len(data)
        header = request.headers.get("Range")
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", header or "")
        if header is None or self.ignore_range or m is None:
            self.record(request, 200)
            return web.Response(body=data, headers={"Accept-Ranges": "bytes"})
        if m.group(1):
            start = int(m.group(1))
            end = int(m.group(2)) if m.group(2) else size - 1
        else:  # suffix form: the last N bytes
            start, end = max(0, size - int(m.group(2))), size - 1
        if start >= size or end < start:
            self.record(request, 416)
            return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
        end = min(end, size - 1)
        self.record(request, 206)
        return web.Response(
            status=206,
            body=data[start : end + 1],
            headers={"Content-Range": f"bytes {start}-{end}/{size}", "Accept-Ranges": "bytes"},
        )


class FakeDiscord(_Server):
    """The slice of Discord's REST API a bot needs for direct messages.

    `rate_limit` next requests are answered 429 with `retry_after` seconds in the body (and
    the Retry-After header); every request is recorded, with what was answered."""

    def __init__(self, token: str = "bot-token") -> None:
        super().__init__()
        self.token = token
        self.rate_limit = 0
        self.retry_after = 0.3
        self.retry_after_in_body = True  # False: only the Retry-After header says how long
        self.messages: dict[str, object] = {}  # message id → last body posted or patched
        self._next_id = 1000
        self.app.router.add_post("/users/@me/channels", self.open_dm)
        self.app.router.add_post("/channels/{channel_id}/messages", self.post_message)
        self.app.router.add_patch("/channels/{channel_id}/messages/{message_id}", self.edit_message)

    def _snowflake(self) -> str:
        self._next_id += 1
        return str(self._next_id)

    async def _gate(self, request: web.Request) -> tuple[object, web.Response | None]:
        body: object = msgspec.json.decode(await request.read()) if request.can_read_body else None
        if request.headers.get("Authorization") != f"Bot {self.token}":
            self.record(request, 401, body)
            return body, web.json_response({"message": "401: Unauthorized", "code": 0}, status=401)
        if self.rate_limit > 0:
            self.rate_limit -= 1
            self.record(request, 429, body)
            limited: dict[str, object] = {"message": "You are being rate limited.", "global": False}
            if self.retry_after_in_body:
                limited["retry_after"] = self.retry_after
            return body, web.json_response(
                limited, status=429, headers={"Retry-After": str(self.retry_after)}
            )
        return body, None

    async def open_dm(self, request: web.Request) -> web.Response:
        body, refused = await self._gate(request)
        if refused is not None:
            return refused
        recipient = body.get("recipient_id") if isinstance(body, dict) else None
        if not isinstance(recipient, str):
            self.record(request, 400, body)
            return web.json_response({"message": "Invalid Form Body", "code": 50035}, status=400)
        self.record(request, 200, body)
        return web.json_response({"id": f"dm{recipient}", "type": 1})

    async def post_message(self, request: web.Request) -> web.Response:
        body, refused = await self._gate(request)
        if refused is not None:
            return refused
        message_id = self._snowflake()
        self.messages[message_id] = body
        self.record(request, 200, body)
        return web.json_response({"id": message_id, "channel_id": request.match_info["channel_id"]})

    async def edit_message(self, request: web.Request) -> web.Response:
        body, refused = await self._gate(request)
        if refused is not None:
            return refused
        message_id = request.match_info["message_id"]
        if message_id not in self.messages:
            self.record(request, 404, body)
            return web.json_response({"message": "Unknown Message", "code": 10008}, status=404)
        self.messages[message_id] = body
        self.record(request, 200, body)
        return web.json_response({"id": message_id, "channel_id": request.match_info["channel_id"]})
