"""The HTTP control endpoint: it validates requests, XADDs commands and reads run state, logs
and events. It never trains.

Routes follow the Model-Trainer API the Discord bot already speaks (see ROUTES; the same
table feeds /openapi.json). Conventions:

- Errors are always `{"code", "message", "request_id"}` (+ `"field"` for a bad field), from one
  middleware; unexpected exceptions become a 500 without details (they are logged).
- `X-Request-ID` is echoed when it is ≤128 chars of [A-Za-z0-9._-], else replaced by a new one.
- `X-Api-Key` is required on every route but /healthz, /readyz and the dashboard when
  `settings.api_key` is set (constant-time compare); GET requests may pass `?api_key=`
  instead, since a browser's EventSource cannot send headers.
- Request-style results (GET /runs/{id}/score/{request_id}, …/generate/…, …/chat/{session}/…,
  …/evaluate/…): pending → 202 `{"request_id", "status": "pending"}`; succeeded → 200 with
  the stored result plus `request_id` and `"status": "completed"`; failed → the error format
  with code REQUEST_FAILED and status 422 for a user error or 502 for a system error.
- Score / generate / chat / evaluate need a run whose status is "completed" (else 409).
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hmac
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar, get_args

import msgspec
from aiohttp import web
from redis.exceptions import RedisError, WatchError

from actors.client.submit import new_id, plan_tokenizer, plan_train, submit
from actors.runtime import log
from actors.runtime.config import Settings
from actors.runtime.streams import Redis, add_command, add_event, connect, request_kind
from actors.web import curves
from actors.web.dashboard import add_routes as add_dashboard
from actors.web.openapi import Operation, Param, Reply, build
from protocol.codec import FIELD
from protocol.commands import (
    ModelChat,
    ModelEvaluate,
    ModelGenerate,
    ModelScore,
    RequestCommand,
)
from protocol.events import ArtifactPointer, CancelRequested, RunCancelled, RunCompleted, RunFailed
from protocol.keys import ACTOR_NAMES, ActorName, Keys
from protocol.requests import (
    ChatRequest,
    CorpusSource,
    EvaluateRequest,
    GenerateRequest,
    RunCreated,
    ScoreRequest,
    TokenizerTrainRequest,
    TrainRequest,
    decode_flat,
)
from protocol.settings import Id
from protocol.state import RunState
from trainer.corpus import NAMED_CORPORA, resolve_corpus_path
from trainer.errors import UserError

MAX_BODY = 1024 * 1024
BLOCK_MS = 1000  # XREAD BLOCK of the live events stream; bounds shutdown and disconnect latency
LOG_POLL_S = 0.25
PING_S = 15.0
CANCEL_TTL_S = 14 * 24 * 3600
REQUEST_TTL_S = 7 * 24 * 3600  # as long as the evaluator keeps results
HISTORY_PAGE = 500
CLOCK_SKEW_MS = 5000  # events are looked up from a little before the run's created_at
TERMINAL = ("completed", "failed", "cancelled")
TERMINAL_KINDS = tuple(
    str(t.__struct_config__.tag) for t in (RunCompleted, RunFailed, RunCancelled)
)
PUBLIC_PATHS = ("/healthz", "/readyz", "/")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_ENTRY_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
_AT = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_NAMED_FIELD = re.compile(r"(?:unknown|missing required) field `(?P<name>[^`]*)`")
_NEWLINE = re.compile(r"\r\n|\r|\n")
_ID_PATTERN: str = get_args(Id)[1].pattern  # the Meta of protocol.commands.Id

_log = log.get("control")
T = TypeVar("T", bound=msgspec.Struct)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SETTINGS = web.AppKey("settings", Settings)
KEYS = web.AppKey("keys", Keys)
REDIS_URL = web.AppKey("redis_url", str)
REDIS = web.AppKey("redis", Redis)
BLOCKING = web.AppKey("blocking_redis", Redis)  # XREAD BLOCK: socket timeout > BLOCK
STOPPING = web.AppKey("stopping", asyncio.Event)
OPENAPI = web.AppKey("openapi", bytes)
REQUEST_ID = web.RequestKey("request_id", str)
STREAM = web.RequestKey("stream", web.StreamResponse)  # an SSE response already under way


# ------------------------------------------------------------------------- response bodies


class ErrorBody(msgspec.Struct, kw_only=True, omit_defaults=True):
    code: str
    message: str
    request_id: str
    field: str | None = None


class RunList(msgspec.Struct, kw_only=True):
    runs: list[RunState]


class Accepted(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A request-style command was queued; poll its result under request_id."""

    request_id: str
    run_id: str
    status: str  # "pending"
    session_id: str = ""


class Pending(msgspec.Struct, kw_only=True):
    request_id: str
    status: str = "pending"


class CancelAccepted(msgspec.Struct, kw_only=True):
    run_id: str
    status: str = "cancellation-requested"


class ChatHistory(msgspec.Struct, kw_only=True):
    session_id: str
    run_id: str
    messages: list[dict[str, str]]


class Deleted(msgspec.Struct, kw_only=True):
    session_id: str
    status: str = "deleted"


class TokenizerInfo(msgspec.Struct, kw_only=True):
    tokenizer_id: str
    status: str
    kind: str = ""
    run_id: str = ""
    stats: dict[str, float] = {}
    path: str = ""
    artifact_path: str = ""
    created_at: str = ""


class Health(msgspec.Struct, kw_only=True):
    status: str = "ok"


class Ready(msgspec.Struct, kw_only=True):
    status: str
    reason: str | None = None
    actors: dict[str, int] = {}


# ----------------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An error answer in the standard format; raised anywhere in a handler."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        extra: Mapping[str, object] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.extra = dict(extra or {})
        self.headers = dict(headers or {})


def not_found(message: str) -> ApiError:
    return ApiError(404, "NOT_FOUND", message)


def invalid(field: str, message: str) -> ApiError:
    return ApiError(422, "INVALID_INPUT", f"{field}: {message}", field=field)


_HTTP_CODES: dict[int, str] = {
    400: "BAD_REQUEST",
    401: "UNAUTHORIZED",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    409: "CONFLICT",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    422: "INVALID_INPUT",
    503: "UNAVAILABLE",
}


def _error_response(request: web.Request, e: ApiError) -> web.Response:
    body: dict[str, object] = {
        "code": e.code,
        "message": e.message,
        "request_id": request.get(REQUEST_ID, ""),
    }
    if e.field is not None:
        body["field"] = e.field
    body.update({k: v for k, v in e.extra.items() if k not in body})
    return web.Response(
        body=msgspec.json.encode(body),
        status=e.status,
        content_type="application/json",
        headers=e.headers,
    )


def _from_http(request: web.Request, e: web.HTTPException) -> ApiError:
    headers = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
    if e.status == 404:
        message = f"no route {request.method} {request.path}"
    elif e.status == 405:
        message = f"method {request.method} not allowed on {request.path}"
    else:
        message = e.text or e.reason
    code = _HTTP_CODES.get(e.status, "HTTP_ERROR")
    return ApiError(e.status, code, message.removeprefix(f"{e.status}: "), headers=headers)


def _request_id(header: str | None) -> str:
    if header is not None and _REQUEST_ID.fullmatch(header):
        return header
    return uuid.uuid4().hex


def _authorized(request: web.Request, api_key: str | None) -> bool:
    if api_key is None:
        return True
    path = request.path
    if path in PUBLIC_PATHS or path.startswith("/static/"):
        return True
    given = request.headers.get("X-Api-Key")
    if given is None and request.method == "GET":
        # EventSource cannot send headers: the dashboard's streams pass ?api_key=.
        given = request.query.get("api_key")
    given = given or ""
    return hmac.compare_digest(
        given.encode("utf-8", "surrogateescape"), api_key.encode("utf-8", "surrogateescape")
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, API key, and every error in the one JSON format."""
    request[REQUEST_ID] = _request_id(request.headers.get("X-Request-ID"))
    try:
        if not _authorized(request, request.app[SETTINGS].api_key):
            raise ApiError(401, "UNAUTHORIZED", "missing or invalid X-Api-Key")
        return await handler(request)
    except ApiError as e:
        return await _answer(request, e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return await _answer(request, _from_http(request, e))
    except RedisError as e:
        _log.warning("redis error", request_id=request[REQUEST_ID], error=repr(e))
        return await _answer(
            request, ApiError(503, "UNAVAILABLE", f"Redis is unavailable: {type(e).__name__}")
        )
    except Exception:
        _log.exception(
            "unhandled error",
            request_id=request[REQUEST_ID],
            method=request.method,
            path=request.path,
        )
        message = (
            f"internal error; the server log has the details under request {request[REQUEST_ID]}"
        )
        return await _answer(request, ApiError(500, "INTERNAL_ERROR", message))


async def _answer(request: web.Request, e: ApiError) -> web.StreamResponse:
    """The error response; a stream already under way gets an `error` event and ends."""
    if STREAM not in request:
        return _error_response(request, e)
    stream = request[STREAM]
    body = {"code": e.code, "message": e.message, "request_id": request[REQUEST_ID]}
    with contextlib.suppress(ConnectionError):
        await stream.write(sse(msgspec.json.encode(body).decode(), event="error"))
    return stream


async def _stamp_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """Every response carries X-Request-ID, streamed ones included."""
    response.headers["X-Request-ID"] = request.get(REQUEST_ID) or uuid.uuid4().hex


# ---------------------------------------------------------------------------------- helpers


def _json(obj: object, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(obj),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def field_of(message: str) -> str:
    """The field a msgspec validation message is about: `$.a.b[0]` → `a.b[0]`."""
    path = ""
    if m := _AT.search(message):
        path = m["path"].lstrip(".")
    if n := _NAMED_FIELD.search(message):
        path = f"{path}.{n['name']}" if path else n["name"]
    return path


async def _body(request: web.Request, typ: type[T], *, flat: bool = False) -> T:
    """Decode and validate a JSON body (an empty body is `{}`); `flat`: a grouped request
    (protocol.requests.decode_flat)."""
    raw = await request.read()
    if not raw.strip():
        raw = b"{}"
    try:
        if flat:
            return decode_flat(raw, typ)
        return msgspec.json.decode(raw, type=typ)
    except msgspec.ValidationError as e:
        field = field_of(str(e))
        if field:
            raise invalid(field, str(e)) from None
        raise ApiError(422, "INVALID_INPUT", f"invalid request body: {e}") from None
    except msgspec.DecodeError as e:
        raise ApiError(400, "INVALID_JSON", f"the request body is not valid JSON: {e}") from None


def _valid_id(value: str) -> bool:
    try:
        msgspec.convert(value, Id)
    except msgspec.ValidationError:
        return False
    return True


def _path_id(request: web.Request, name: str, what: str) -> str:
    value = request.match_info[name]
    if not _valid_id(value):
        raise not_found(f"unknown {what} {value[:140]!r}")
    return value


def _int_query(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name, "")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise invalid(name, f"expected an integer, got {raw[:40]!r}") from None
    if not lo <= value <= hi:
        raise invalid(name, f"must be between {lo} and {hi}, got {value}")
    return value


def _bool_query(request: web.Request, name: str, default: bool) -> bool:
    raw = request.query.get(name, "").lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise invalid(name, f"expected true or false, got {raw[:40]!r}")


def _text(raw: bytes | str) -> str:
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw


async def load_run(redis: Redis, keys: Keys, run_id: str) -> RunState | None:
    raw = await redis.hgetall(keys.run(run_id))
    if not raw:
        return None
    return RunState.from_hash(run_id, {_text(k): _text(v) for k, v in raw.items()})


async def _run(request: web.Request) -> RunState:
    run_id = _path_id(request, "id", "run")
    state = await load_run(request.app[REDIS], request.app[KEYS], run_id)
    if state is None:
        raise not_found(f"unknown run {run_id!r}")
    return state


async def _completed_run(request: web.Request) -> RunState:
    state = await _run(request)
    if state.status != "completed":
        raise ApiError(
            409, "CONFLICT", f"run {state.run_id!r} is {state.status}; it must be completed first"
        )
    return state


def confine(settings: Settings, field: str, user_path: str) -> str:
    """The path relative to the corpus root, if it exists inside it (symlinks resolved)."""
    try:
        real = resolve_corpus_path(settings.corpus_root, user_path)
    except (UserError, OSError, ValueError) as e:
        raise invalid(field, str(e) if isinstance(e, UserError) else f"invalid path: {e}") from None
    return real.relative_to(settings.corpus_root.resolve()).as_posix()


async def _check_source(app: web.Application, source: CorpusSource) -> CorpusSource:
    """Exactly one corpus source, and one that can work; a path is made root-relative."""
    settings = app[SETTINGS]
    req = source
    sources = {
        "corpus_path": req.corpus_path,
        "corpus_name": req.corpus_name,
        "corpus_file_id": req.corpus_file_id,
    }
    given = [name for name, value in sources.items() if value]
    if len(given) != 1:
        got = "none" if not given else " and ".join(given)
        raise invalid(
            given[-1] if given else "corpus_path",
            f"give exactly one of corpus_path, corpus_name, corpus_file_id (got {got})",
        )
    if req.corpus_name and req.corpus_name not in NAMED_CORPORA:
        known = ", ".join(sorted(NAMED_CORPORA))
        raise invalid("corpus_name", f"unknown corpus {req.corpus_name!r}; known: {known}")
    if req.corpus_file_id and not settings.data_bank_url:
        raise invalid("corpus_file_id", "needs a Data Bank service: set MT_DATA_BANK_URL")
    if req.corpus_path:
        rel = await asyncio.to_thread(confine, settings, "corpus_path", req.corpus_path)
        return msgspec.structs.replace(req, corpus_path=rel)
    return req


async def _check_tokenizer(app: web.Application, tokenizer_id: str) -> None:
    status = await app[REDIS].hget(app[KEYS].tokenizer(tokenizer_id), "status")
    if status == b"ready" or app[SETTINGS].tokenizer_dir(tokenizer_id).is_dir():
        return
    if status:
        raise invalid(
            "tokenizer_id", f"tokenizer {tokenizer_id!r} is not ready (status {_text(status)})"
        )
    raise invalid("tokenizer_id", f"unknown tokenizer {tokenizer_id!r}")


async def _check_pretrained(app: web.Application, run_id: str) -> None:
    state = await load_run(app[REDIS], app[KEYS], run_id)
    if state is None:
        raise invalid("pretrained_run_id", f"unknown run {run_id!r}")
    if state.status != "completed":
        raise invalid("pretrained_run_id", f"run {run_id!r} is {state.status}, not completed")


async def _queue(app: web.Application, cmd: RequestCommand) -> web.StreamResponse:
    """XADD a request-style command with a marker of which run and route its id belongs
    to, and answer 202 with the id to poll."""
    keys, rid = app[KEYS], cmd.request_id
    marker = msgspec.json.encode({"what": request_kind(cmd), "run_id": cmd.run_id})
    async with app[REDIS].pipeline(transaction=True) as pipe:
        pipe.set(keys.request(rid), marker, ex=REQUEST_TTL_S)
        add_command(pipe, keys, cmd)
        await pipe.execute()
    session_id = cmd.session_id if isinstance(cmd, ModelChat) else ""
    accepted = Accepted(request_id=rid, run_id=cmd.run_id, status="pending", session_id=session_id)
    return _json(accepted, 202)


# ------------------------------------------------------------------------------- log files


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


# -------------------------------------------------------------------------------------- SSE


def sse(data: str, *, event: str = "", eid: str = "") -> bytes:
    lines = [f"event: {event}"] if event else []
    if eid:
        lines.append(f"id: {eid}")
    lines.extend(f"data: {line}" for line in _NEWLINE.split(data))
    return ("\n".join(lines) + "\n\n").encode()


async def _open_stream(request: web.Request) -> web.StreamResponse:
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


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


class _Peek(msgspec.Struct):
    """Just enough of an event to filter the stream by run."""

    kind: str = ""
    run_id: str = ""


_peek = msgspec.json.Decoder(_Peek)


def stream_entries(entries: object) -> list[tuple[str, bytes]]:
    """(entry id, payload) of an XRANGE reply or one stream of an XREAD reply."""
    out: list[tuple[str, bytes]] = []
    if not isinstance(entries, list):
        return out
    for entry_id, fields in entries:
        if isinstance(fields, dict):  # None: deleted while we read
            data = fields.get(FIELD.encode(), b"")
            out.append((_text(entry_id), data if isinstance(data, bytes) else b""))
    return out


def _peek_event(data: bytes) -> _Peek | None:
    try:
        return _peek.decode(data)
    except msgspec.DecodeError:
        return None


# ----------------------------------------------------------------------------------- routes


async def healthz(request: web.Request) -> web.StreamResponse:
    return _json(Health())


async def alive_kinds(redis: Redis, keys: Keys) -> dict[ActorName, int]:
    """Live consumers per actor kind (heartbeat keys with a TTL), by one SCAN."""
    patterns = {actor: keys.alive_pattern(actor) for actor in ACTOR_NAMES}
    counts: dict[ActorName, int] = {}
    async for key in redis.scan_iter(match=f"{keys.prefix}:alive:*", count=1000):
        name = _text(key)
        for actor, pattern in patterns.items():
            if fnmatch.fnmatchcase(name, pattern):
                counts[actor] = counts.get(actor, 0) + 1
    return counts


async def readyz(request: web.Request) -> web.StreamResponse:
    redis, keys = request.app[REDIS], request.app[KEYS]
    try:
        async with asyncio.timeout(3):
            await redis.ping()
            counts = await alive_kinds(redis, keys)
    except (RedisError, OSError, TimeoutError) as e:
        raise ApiError(
            503,
            "NOT_READY",
            f"Redis is unreachable ({type(e).__name__})",
            extra={"status": "degraded", "reason": "redis-unavailable"},
        ) from None
    missing = [actor for actor in ACTOR_NAMES if actor not in counts]
    if missing:
        raise ApiError(
            503,
            "NOT_READY",
            f"no live consumer for: {', '.join(missing)}",
            extra={"status": "degraded", "reason": "no-worker", "missing": missing},
        )
    return _json(Ready(status="ready", actors={k: v for k, v in counts.items()}))


async def openapi(request: web.Request) -> web.StreamResponse:
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


async def train(request: web.Request) -> web.StreamResponse:
    app = request.app
    req = await _body(request, TrainRequest, flat=True)
    req.source = await _check_source(app, req.source)
    if req.chain.tokenizer_id:
        await _check_tokenizer(app, req.chain.tokenizer_id)
    if req.train.pretrained_run_id:
        await _check_pretrained(app, req.train.pretrained_run_id)
    try:
        chain = plan_train(req)
    except UserError as e:
        raise ApiError(422, "INVALID_INPUT", str(e)) from None
    info = await submit(app[REDIS], app[KEYS], chain)
    _log.info("run submitted", run_id=info.run_id, request_id=request[REQUEST_ID])
    return _json(info, 202, {"Location": f"/runs/{info.run_id}"})


async def train_tokenizer(request: web.Request) -> web.StreamResponse:
    app = request.app
    req = await _body(request, TokenizerTrainRequest, flat=True)
    req.source = await _check_source(app, req.source)
    try:
        chain = plan_tokenizer(req)
    except UserError as e:
        raise ApiError(422, "INVALID_INPUT", str(e)) from None
    info = await submit(app[REDIS], app[KEYS], chain)
    _log.info("tokenizer job submitted", run_id=info.run_id, request_id=request[REQUEST_ID])
    return _json(info, 202, {"Location": f"/tokenizers/{info.tokenizer_id}"})


async def get_run(request: web.Request) -> web.StreamResponse:
    return _json(await _run(request))


async def list_runs(request: web.Request) -> web.StreamResponse:
    limit = _int_query(request, "limit", 20, 1, 500)
    redis, keys = request.app[REDIS], request.app[KEYS]
    newest = await redis.zrevrange(keys.runs, 0, limit - 1)
    run_ids = [_text(r) for r in newest if isinstance(r, bytes | str)]
    async with redis.pipeline(transaction=False) as pipe:
        for run_id in run_ids:
            pipe.hgetall(keys.run(run_id))
        hashes = await pipe.execute()
    runs = [
        RunState.from_hash(run_id, {_text(k): _text(v) for k, v in fields.items()})
        for run_id, fields in zip(run_ids, hashes, strict=True)
        if fields
    ]
    return _json(RunList(runs=runs))


async def cancel(request: web.Request) -> web.StreamResponse:
    """Set the cancel flag and record CancelRequested atomically, unless the run is over."""
    run_id = _path_id(request, "id", "run")
    redis, keys = request.app[REDIS], request.app[KEYS]
    for _ in range(20):  # a concurrent state change (a heartbeat) retries the transaction
        async with redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(keys.run(run_id), keys.cancel(run_id))
                raw = await pipe.hgetall(keys.run(run_id))
                if not raw:
                    raise not_found(f"unknown run {run_id!r}")
                state = RunState.from_hash(run_id, {_text(k): _text(v) for k, v in raw.items()})
                if state.status in TERMINAL:
                    raise ApiError(409, "CONFLICT", f"run {run_id!r} is already {state.status}")
                if await pipe.exists(keys.cancel(run_id)):
                    return _json(CancelAccepted(run_id=run_id), 202)
                pipe.multi()  # type: ignore[no-untyped-call]  # redis-py leaves multi() untyped
                pipe.set(keys.cancel(run_id), b"1", ex=CANCEL_TTL_S)
                add_event(pipe, keys, CancelRequested(run_id=run_id, user_id=state.user_id))
                await pipe.execute()
            except WatchError:
                continue
        _log.info("cancel requested", run_id=run_id, request_id=request[REQUEST_ID])
        return _json(CancelAccepted(run_id=run_id), 202)
    raise ApiError(503, "UNAVAILABLE", "the run kept changing; try the cancel again")


async def evaluate(request: web.Request) -> web.StreamResponse:
    state = await _completed_run(request)
    req = await _body(request, EvaluateRequest)
    settings = request.app[SETTINGS]
    path = await asyncio.to_thread(confine, settings, "path", req.path) if req.path else ""
    request_id = new_id("eval")
    return await _queue(
        request.app,
        ModelEvaluate(
            command_id=request_id,
            run_id=state.run_id,
            request_id=request_id,
            user_id=req.user_id,
            requested_at=time.time(),
            split=req.split,
            path=path,
        ),
    )


async def score(request: web.Request) -> web.StreamResponse:
    state = await _completed_run(request)
    req = await _body(request, ScoreRequest)
    request_id = new_id("score")
    return await _queue(
        request.app,
        ModelScore(
            command_id=request_id,
            run_id=state.run_id,
            request_id=request_id,
            user_id=req.user_id,
            requested_at=time.time(),
            text=req.text,
            detail=req.detail,
            top_k=req.top_k,
        ),
    )


async def generate(request: web.Request) -> web.StreamResponse:
    state = await _completed_run(request)
    req = await _body(request, GenerateRequest)
    request_id = new_id("gen")
    return await _queue(
        request.app,
        ModelGenerate(
            command_id=request_id,
            run_id=state.run_id,
            request_id=request_id,
            user_id=req.user_id,
            requested_at=time.time(),
            prompt=req.prompt,
            stop=req.stop,
            num_return_sequences=req.num_return_sequences,
            max_new_tokens=req.max_new_tokens,
            temperature=req.temperature,
            top_k=req.top_k,
            top_p=req.top_p,
            seed=req.seed,
            stop_on_eos=req.stop_on_eos,
        ),
    )


async def chat(request: web.Request) -> web.StreamResponse:
    state = await _completed_run(request)
    req = await _body(request, ChatRequest)
    session_id = req.session_id or new_id("chat")
    request_id = new_id("chatreq")
    return await _queue(
        request.app,
        ModelChat(
            command_id=request_id,
            run_id=state.run_id,
            request_id=request_id,
            session_id=session_id,
            user_id=req.user_id,
            requested_at=time.time(),
            message=req.message,
            max_new_tokens=req.max_new_tokens,
            temperature=req.temperature,
            top_k=req.top_k,
            top_p=req.top_p,
            seed=req.seed,
        ),
    )


async def _result(request: web.Request, what: str) -> web.StreamResponse:
    """See the module docstring: 202 pending, 200 done, 422/502 failed."""
    state = await _run(request)
    request_id = _path_id(request, "request_id", f"{what} request")
    keys, redis = request.app[KEYS], request.app[REDIS]
    raw = await redis.get(keys.result(request_id))
    if raw is None:
        marker = await redis.get(keys.request(request_id))
        owner = msgspec.json.decode(marker, type=dict[str, str]) if marker else {}
        if owner.get("what") != what or owner.get("run_id") != state.run_id:
            raise not_found(f"no {what} request {request_id!r} for this run")
        return _json(Pending(request_id=request_id), 202)
    stored = msgspec.json.decode(raw, type=dict[str, object])
    if stored.get("what") != what:
        raise not_found(f"no {what} request {request_id!r}")
    if stored.get("ok") is True:
        return _json({**stored, "request_id": request_id, "status": "completed"})
    kind = str(stored.get("error_kind", "system"))
    raise ApiError(
        422 if kind == "user" else 502,
        "REQUEST_FAILED",
        str(stored.get("message", "failed")),
        extra={"what": what, "error_kind": kind, "status": "failed"},
    )


async def score_result(request: web.Request) -> web.StreamResponse:
    return await _result(request, "score")


async def generate_result(request: web.Request) -> web.StreamResponse:
    return await _result(request, "generate")


async def evaluate_result(request: web.Request) -> web.StreamResponse:
    return await _result(request, "evaluate")


async def chat_result(request: web.Request) -> web.StreamResponse:
    _path_id(request, "session_id", "chat session")
    return await _result(request, "chat")


async def chat_history(request: web.Request) -> web.StreamResponse:
    state = await _run(request)
    session_id = _path_id(request, "session_id", "chat session")
    raw = await request.app[REDIS].get(request.app[KEYS].chat(session_id))
    if raw is None:
        raise not_found(f"unknown chat session {session_id!r}")
    messages = msgspec.json.decode(raw, type=list[dict[str, str]])
    return _json(ChatHistory(session_id=session_id, run_id=state.run_id, messages=messages))


async def chat_delete(request: web.Request) -> web.StreamResponse:
    await _run(request)
    session_id = _path_id(request, "session_id", "chat session")
    if not await request.app[REDIS].delete(request.app[KEYS].chat(session_id)):
        raise not_found(f"unknown chat session {session_id!r}")
    return _json(Deleted(session_id=session_id))


def _read_eval(run_dir: Path, max_samples: int = 50) -> dict[str, object] | None:
    try:
        metrics = msgspec.json.decode((run_dir / "eval" / "metrics.json").read_bytes())
    except FileNotFoundError:
        return None
    samples: list[object] = []
    with (
        contextlib.suppress(FileNotFoundError),
        (run_dir / "eval" / "samples.jsonl").open("rb") as f,
    ):
        for line in f:
            if len(samples) >= max_samples:
                break
            if line.strip():
                with contextlib.suppress(msgspec.DecodeError):
                    samples.append(msgspec.json.decode(line))
    body: dict[str, object] = {"status": "completed", "metrics": metrics, "samples": samples}
    if isinstance(metrics, dict):  # the flat fields the old API answered with
        body.update({k: metrics[k] for k in ("split", "loss", "perplexity") if k in metrics})
    return body


async def get_eval(request: web.Request) -> web.StreamResponse:
    state = await _run(request)
    run_dir = request.app[SETTINGS].run_dir(state.run_id)
    body = await asyncio.to_thread(_read_eval, run_dir)
    if body is None:
        raise not_found(f"run {state.run_id!r} has no evaluation yet")
    return _json({"run_id": state.run_id, **body})


async def get_artifact(request: web.Request) -> web.StreamResponse:
    state = await _run(request)
    if not state.artifact:
        raise not_found(f"run {state.run_id!r} has no artifact yet")
    return _json(msgspec.json.decode(state.artifact, type=ArtifactPointer))


async def download(request: web.Request) -> web.StreamResponse:
    kind = request.match_info["kind"]
    if kind not in ("run", "tokenizer"):
        raise not_found(f"unknown artifact kind {kind[:40]!r} (run or tokenizer)")
    artifact_id = _path_id(request, "artifact_id", "artifact")
    path = request.app[SETTINGS].artifact_dir() / kind / f"{artifact_id}.tar.gz"
    if not await asyncio.to_thread(path.is_file):
        raise not_found(f"no {kind} artifact {artifact_id!r}")
    return web.FileResponse(
        path,
        headers={
            "Content-Type": "application/gzip",
            "Content-Disposition": f'attachment; filename="{artifact_id}.tar.gz"',
        },
    )


_RecordStats = dict[str, float | str | bool | None]  # a tokenizer record's "stats" (JSON)


async def get_tokenizer(request: web.Request) -> web.StreamResponse:
    app = request.app
    tokenizer_id = _path_id(request, "tokenizer_id", "tokenizer")
    raw = await app[REDIS].hgetall(app[KEYS].tokenizer(tokenizer_id))
    tok_dir = app[SETTINGS].tokenizer_dir(tokenizer_id)
    if raw:
        fields = {_text(k): _text(v) for k, v in raw.items()}
        stats: dict[str, float] = {}
        with contextlib.suppress(msgspec.DecodeError):  # a corrupt record shows no stats
            # Numbers are shown; a scalar of another kind (a note) is left out.
            raw_stats = msgspec.json.decode(fields.get("stats") or "{}", type=_RecordStats)
            stats = {k: v for k, v in raw_stats.items() if isinstance(v, float)}
        path = fields.get("path", "")
        return _json(
            TokenizerInfo(
                tokenizer_id=tokenizer_id,
                status=fields.get("status", "unknown"),
                kind=fields.get("kind", ""),
                run_id=fields.get("run_id", ""),
                stats=stats,
                path=path,
                artifact_path=path,
                created_at=fields.get("created_at", ""),
            )
        )
    if await asyncio.to_thread(tok_dir.is_dir):
        return _json(
            TokenizerInfo(
                tokenizer_id=tokenizer_id,
                status="ready",
                path=str(tok_dir),
                artifact_path=str(tok_dir),
            )
        )
    # A tokenizer that a queued run or tokenizer job will train has no record yet.
    if tokenizer_id.endswith("-tok"):
        state = await load_run(app[REDIS], app[KEYS], tokenizer_id.removesuffix("-tok"))
        if state is not None and state.tokenizer_id == tokenizer_id:
            status = state.status if state.status in ("failed", "cancelled") else "queued"
            return _json(
                TokenizerInfo(tokenizer_id=tokenizer_id, status=status, run_id=state.run_id)
            )
    raise not_found(f"unknown tokenizer {tokenizer_id!r}")


async def get_logs(request: web.Request) -> web.StreamResponse:
    state = await _run(request)
    tail = _int_query(request, "tail", 200, 0, 10_000)
    path = request.app[SETTINGS].run_dir(state.run_id) / "logs.jsonl"
    try:
        lines, _ = await asyncio.to_thread(tail_lines, path, tail)
    except FileNotFoundError:
        raise not_found(f"run {state.run_id!r} has no logs yet") from None
    text = "".join(render_log_line(line) + "\n" for line in lines if line.strip())
    return web.Response(text=text, content_type="text/plain")


async def stream_logs(request: web.Request) -> web.StreamResponse:
    """SSE of the run's logs.jsonl: the tail, then (follow) appended lines until the run ends.

    Each batch's last message has `id: <byte offset>`; a Last-Event-ID resumes from there."""
    state = await _run(request)
    tail = _int_query(request, "tail", 200, 0, 10_000)
    follow = _bool_query(request, "follow", True)
    app = request.app
    path = app[SETTINGS].run_dir(state.run_id) / "logs.jsonl"
    last = request.headers.get("Last-Event-ID", "")
    resp = await _open_stream(request)

    async def send(lines: list[bytes], offset: int) -> None:
        lines = [line for line in lines if line.strip()]
        for i, line in enumerate(lines):
            eid = str(offset) if i == len(lines) - 1 else ""
            await resp.write(sse(render_log_line(line), eid=eid))

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
        while follow and not app[STOPPING].is_set() and not _gone(request):
            # Status first, then the file: lines written before the run ended are all sent.
            current = await load_run(app[REDIS], app[KEYS], state.run_id)
            status = current.status if current else status
            offset = await catch_up(offset)
            if status in TERMINAL:
                break
            if time.monotonic() - pinged > PING_S:
                await resp.write(b": ping\n\n")
                pinged = time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(app[STOPPING].wait(), LOG_POLL_S)
        if not _gone(request):
            end = msgspec.json.encode({"status": status}).decode()
            await resp.write(sse(end, event="end"))
    except ConnectionError:
        pass  # the client went away
    return resp


async def stream_events(request: web.Request) -> web.StreamResponse:
    """SSE of the run's events: history (XRANGE from its creation, filtered by run), then
    live ones (XREAD BLOCK) until a terminal event; follow=false ends at the history's end.

    `id:` is the stream entry id, so Last-Event-ID resumes exactly."""
    state = await _run(request)
    follow = _bool_query(request, "follow", True) and state.status not in TERMINAL
    app = request.app
    redis, keys = app[REDIS], app[KEYS]
    last = request.headers.get("Last-Event-ID", "")
    if not _ENTRY_ID.fullmatch(last):
        last = f"{max(0, int(state.created_at * 1000) - CLOCK_SKEW_MS)}-0"
    resp = await _open_stream(request)

    async def send(entries: list[tuple[str, bytes]]) -> bool:
        """Send this run's events; True once its terminal event went out."""
        nonlocal last
        for entry_id, data in entries:
            last = entry_id
            peek = _peek_event(data)
            if peek is None or peek.run_id != state.run_id:
                continue
            await resp.write(sse(_text(data), event=peek.kind, eid=last))
            if peek.kind in TERMINAL_KINDS:
                return True
        return False

    try:
        done = False
        while not done:
            reply = await redis.xrange(keys.events, min=f"({last}", max="+", count=HISTORY_PAGE)
            page = stream_entries(reply)
            done = await send(page)
            if len(page) < HISTORY_PAGE:
                break
        pinged = time.monotonic()
        while follow and not done and not app[STOPPING].is_set() and not _gone(request):
            live = await app[BLOCKING].xread(
                {keys.events: last}, count=HISTORY_PAGE, block=BLOCK_MS
            )
            for _stream, entries in live if isinstance(live, list) else []:
                done = await send(stream_entries(entries))
                if done:
                    break
            if time.monotonic() - pinged > PING_S:
                await resp.write(b": ping\n\n")
                pinged = time.monotonic()
    except ConnectionError:
        pass  # the client went away
    return resp


# ----------------------------------------------------------------------------- route table

_TAIL = Param(
    "tail",
    {"type": "integer", "minimum": 0, "maximum": 10_000, "default": 200},
    "lines of history to send first",
)
_FOLLOW = Param("follow", {"type": "boolean", "default": True}, "keep streaming until the run ends")
_LAST_ID = Param("Last-Event-ID", {"type": "string"}, "resume after this SSE id", where="header")
_QUEUED = (400, 401, 404, 409, 413, 422)
_PENDING = Reply(202, "still pending", Pending)
_DONE = Reply(200, "the stored result with request_id and status 'completed'")
_SSE = "text/event-stream"

ROUTES: tuple[tuple[Operation, Handler], ...] = (
    (
        Operation(
            "GET",
            "/healthz",
            "liveness",
            (Reply(200, "the process is up", Health),),
            errors=(),
            public=True,
        ),
        healthz,
    ),
    (
        Operation(
            "GET",
            "/readyz",
            "readiness: Redis and a live consumer of every actor kind",
            (Reply(200, "ready", Ready),),
            errors=(503,),
            public=True,
        ),
        readyz,
    ),
    (
        Operation(
            "GET", "/openapi.json", "this document", (Reply(200, "OpenAPI 3.1"),), errors=(401,)
        ),
        openapi,
    ),
    (
        Operation(
            "POST",
            "/runs/train",
            "submit a training run",
            (Reply(202, "queued", RunCreated),),
            body=TrainRequest,
            flat_body=True,
            errors=(400, 401, 413, 422),
        ),
        train,
    ),
    (
        Operation(
            "GET",
            "/runs",
            "recent runs, newest first",
            (Reply(200, "runs", RunList),),
            params=(
                Param("limit", {"type": "integer", "minimum": 1, "maximum": 500, "default": 20}),
            ),
            errors=(401, 422),
        ),
        list_runs,
    ),
    (Operation("GET", "/runs/{id}", "a run's state", (Reply(200, "state", RunState),)), get_run),
    (
        Operation(
            "GET",
            "/runs/{id}/logs",
            "the last lines of the run's log",
            (Reply(200, "log lines", media="text/plain"),),
            params=(_TAIL,),
            errors=(401, 404, 422),
        ),
        get_logs,
    ),
    (
        Operation(
            "GET",
            "/runs/{id}/logs/stream",
            "the run's log as server-sent events",
            (Reply(200, "SSE: data = a log line; event 'end' at the end", media=_SSE),),
            params=(_TAIL, _FOLLOW, _LAST_ID),
            errors=(401, 404, 422),
        ),
        stream_logs,
    ),
    (
        Operation(
            "GET",
            "/runs/{id}/events",
            "the run's events as server-sent events",
            (Reply(200, "SSE: event = kind, data = the event JSON, id = entry id", media=_SSE),),
            params=(_FOLLOW, _LAST_ID),
            errors=(401, 404, 422),
        ),
        stream_events,
    ),
    (
        Operation(
            "GET",
            "/runs/{id}/curves",
            "the run's training curves: [step, value] points from its recorded events",
            (Reply(200, "train loss, validation loss, lr and tokens/s by step", curves.Curves),),
            params=(curves.AFTER,),
            errors=(401, 404),
        ),
        curves.handler(_run, lambda app: (app[REDIS], app[KEYS])),
    ),
    (
        Operation(
            "POST",
            "/runs/{id}/cancel",
            "cancel a queued or running run",
            (Reply(202, "cancellation requested", CancelAccepted),),
            errors=(401, 404, 409),
        ),
        cancel,
    ),
    (
        Operation(
            "POST",
            "/runs/{id}/evaluate",
            "evaluate a completed run",
            (Reply(202, "queued", Accepted),),
            body=EvaluateRequest,
            errors=_QUEUED,
        ),
        evaluate,
    ),
    (
        Operation(
            "GET",
            "/runs/{id}/evaluate/{request_id}",
            "an evaluate request's result",
            (_DONE, _PENDING),
            errors=(401, 404, 422, 502),
        ),
        evaluate_result,
    ),
    (
        Operation(
            "GET",
            "/runs/{id}/eval",
            "the run's evaluation (metrics and samples)",
            (Reply(200, "metrics and samples"),),
        ),
        get_eval,
    ),
    (
        Operation(
            "GET",
            "/runs/{id}/artifact",
            "the run's artifact pointer",
            (Reply(200, "storage, uri, file_id, size, sha256"),),
        ),
        get_artifact,
    ),
    (
        Operation(
            "POST",
            "/runs/{id}/score",
            "score text with a completed run's model",
            (Reply(202, "queued", Accepted),),
            body=ScoreRequest,
            errors=_QUEUED,
        ),
        score,
    ),
    (
        Operation(
            "GET",
            "/runs/{id}/score/{request_id}",
            "a score request's result",
            (_DONE, _PENDING),
            errors=(401, 404, 422, 502),
        ),
        score_result,
    ),
    (
        Operation(
            "POST",
            "/runs/{id}/generate",
            "sample text from a completed run's model",
            (Reply(202, "queued", Accepted),),
            body=GenerateRequest,
            errors=_QUEUED,
        ),
        generate,
    ),
    (
        Operation(
            "GET",
            "/runs/{id}/generate/{request_id}",
            "a generate request's result",
            (_DONE, _PENDING),
            errors=(401, 404, 422, 502),
        ),
        generate_result,
    ),
    (
        Operation(
            "POST",
            "/runs/{id}/chat",
            "send a chat message (new session when none given)",
            (Reply(202, "queued", Accepted),),
            body=ChatRequest,
            errors=_QUEUED,
        ),
        chat,
    ),
    (
        Operation(
            "GET",
            "/runs/{id}/chat/{session_id}",
            "a chat session's messages",
            (Reply(200, "history", ChatHistory),),
        ),
        chat_history,
    ),
    (
        Operation(
            "DELETE",
            "/runs/{id}/chat/{session_id}",
            "forget a chat session",
            (Reply(200, "deleted", Deleted),),
        ),
        chat_delete,
    ),
    (
        Operation(
            "GET",
            "/runs/{id}/chat/{session_id}/{request_id}",
            "a chat request's result",
            (_DONE, _PENDING),
            errors=(401, 404, 422, 502),
        ),
        chat_result,
    ),
    (
        Operation(
            "GET",
            "/artifacts/{kind}/{artifact_id}",
            "download a local artifact (.tar.gz)",
            (Reply(200, "the archive", media="application/gzip"),),
            params=(Param("kind", {"enum": ["run", "tokenizer"]}, where="path"),),
        ),
        download,
    ),
    (
        Operation(
            "POST",
            "/tokenizers/train",
            "train a tokenizer on its own",
            (Reply(202, "queued", RunCreated),),
            body=TokenizerTrainRequest,
            flat_body=True,
            errors=(400, 401, 413, 422),
        ),
        train_tokenizer,
    ),
    (
        Operation(
            "GET",
            "/tokenizers/{tokenizer_id}",
            "a tokenizer's status and stats",
            (Reply(200, "tokenizer", TokenizerInfo),),
        ),
        get_tokenizer,
    ),
)


# -------------------------------------------------------------------------------- the app


async def _redis_ctx(app: web.Application) -> AsyncIterator[None]:
    app[REDIS] = connect(app[REDIS_URL])
    app[BLOCKING] = connect(app[REDIS_URL], blocking=True, block_ms=BLOCK_MS)
    try:
        yield
    finally:
        await app[BLOCKING].aclose()
        await app[REDIS].aclose()


async def _on_shutdown(app: web.Application) -> None:
    # Open SSE streams notice this within one poll / one XREAD BLOCK and end.
    app[STOPPING].set()


def openapi_document(settings: Settings) -> dict[str, object]:
    return build(
        [op for op, _ in ROUTES],
        title="model-trainer control endpoint",
        version="1",
        error=ErrorBody,
        id_pattern=_ID_PATTERN,
        api_key=settings.api_key is not None,
    )


def create_app(settings: Settings, redis_url: str) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY, middlewares=[error_middleware])
    app[SETTINGS] = settings
    app[KEYS] = Keys(settings.prefix)
    app[REDIS_URL] = redis_url
    app[STOPPING] = asyncio.Event()
    app[OPENAPI] = msgspec.json.encode(openapi_document(settings))
    app.cleanup_ctx.append(_redis_ctx)
    app.on_shutdown.append(_on_shutdown)
    app.on_response_prepare.append(_stamp_request_id)
    for op, handler in ROUTES:
        app.router.add_route(op.method, op.path, handler)
    add_dashboard(app)
    return app


def bound_url(runner: web.AppRunner) -> str:
    host, port = runner.addresses[0][:2]
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}"


async def serve(
    settings: Settings,
    redis_url: str,
    host: str,
    port: int,
    *,
    on_ready: Callable[[str], Awaitable[None]] | None = None,
) -> None:
    """Run the endpoint until cancelled; the bound URL goes to `on_ready` and the log."""
    # No access log: ?api_key= must not end up in a log file.
    runner = web.AppRunner(create_app(settings, redis_url), shutdown_timeout=5.0, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        url = bound_url(runner)
        _log.info("control endpoint listening", url=url)
        if on_ready is not None:
            await on_ready(url)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
