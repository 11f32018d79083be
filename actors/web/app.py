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
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import get_args

import msgspec
from aiohttp import web
from redis.exceptions import RedisError

from actors.client.client import BLOCK_MS, ServiceClient
from actors.runtime import log
from actors.runtime.config import Settings
from actors.runtime.store import make_store
from actors.web import curves, requests, runs, streams
from actors.web.context import (
    CLIENT,
    MAX_BODY,
    OPENAPI,
    SETTINGS,
    STOPPING,
    STORE,
    STREAMS,
    Handler,
    Slots,
)
from actors.web.dashboard import add_routes as add_dashboard
from actors.web.errors import ApiError, ErrorBody, error_middleware, stamp_request_id
from actors.web.http import json_response
from actors.web.openapi import Operation, Param, Reply, build
from protocol.keys import ACTOR_NAMES, Keys
from protocol.requests import (
    ChatRequest,
    EvaluateRequest,
    GenerateRequest,
    RunCreated,
    ScoreRequest,
    TokenizerTrainRequest,
    TrainRequest,
)
from protocol.settings import Id
from protocol.state import RunState

_ID_PATTERN: str = get_args(Id)[1].pattern  # the Meta of protocol.settings.Id
_log = log.get("control")


class Health(msgspec.Struct, kw_only=True):
    status: str = "ok"


class Ready(msgspec.Struct, kw_only=True):
    status: str
    reason: str | None = None
    actors: dict[str, int] = {}


async def healthz(request: web.Request) -> web.StreamResponse:
    return json_response(Health())


async def readyz(request: web.Request) -> web.StreamResponse:
    client = request.app[CLIENT]
    try:
        async with asyncio.timeout(3):
            await client.redis.ping()
            counts = await client.alive_kinds()
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
    return json_response(Ready(status="ready", actors={k: v for k, v in counts.items()}))


async def openapi(request: web.Request) -> web.StreamResponse:
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


# ----------------------------------------------------------------------------- route table

_TAIL = Param(
    "tail",
    {"type": "integer", "minimum": 0, "maximum": 10_000, "default": 200},
    "lines of history to send first",
)
_FOLLOW = Param("follow", {"type": "boolean", "default": True}, "keep streaming until the run ends")
_LAST_ID = Param("Last-Event-ID", {"type": "string"}, "resume after this SSE id", where="header")
_QUEUED = (400, 401, 404, 408, 409, 413, 415, 422)
_PENDING = Reply(202, "still pending", requests.Pending)
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
            errors=(400, 401, 408, 413, 415, 422),
        ),
        runs.train,
    ),
    (
        Operation(
            "GET",
            "/runs",
            "recent runs, newest first",
            (Reply(200, "runs", runs.RunList),),
            params=(
                Param("limit", {"type": "integer", "minimum": 1, "maximum": 500, "default": 20}),
            ),
            errors=(401, 422),
        ),
        runs.list_runs,
    ),
    (
        Operation("GET", "/runs/{id}", "a run's state", (Reply(200, "state", RunState),)),
        runs.get_run,
    ),
    (
        Operation(
            "GET",
            "/runs/{id}/logs",
            "the last lines of the run's log",
            (Reply(200, "log lines", media="text/plain"),),
            params=(_TAIL,),
            errors=(401, 404, 422),
        ),
        streams.get_logs,
    ),
    (
        Operation(
            "GET",
            "/runs/{id}/logs/stream",
            "the run's log as server-sent events",
            (Reply(200, "SSE: data = a log line; event 'end' at the end", media=_SSE),),
            params=(_TAIL, _FOLLOW, _LAST_ID),
            errors=(401, 404, 422, 503),
        ),
        streams.stream_logs,
    ),
    (
        Operation(
            "GET",
            "/runs/{id}/events",
            "the run's events as server-sent events",
            (Reply(200, "SSE: event = kind, data = the event JSON, id = entry id", media=_SSE),),
            params=(_FOLLOW, _LAST_ID),
            errors=(401, 404, 422, 503),
        ),
        streams.stream_events,
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
        curves.get_curves,
    ),
    (
        Operation(
            "POST",
            "/runs/{id}/cancel",
            "cancel a queued or running run",
            (Reply(202, "cancellation requested", runs.CancelAccepted),),
            errors=(401, 404, 409),
        ),
        runs.cancel,
    ),
    (
        Operation(
            "POST",
            "/runs/{id}/evaluate",
            "evaluate a completed run",
            (Reply(202, "queued", requests.Accepted),),
            body=EvaluateRequest,
            errors=_QUEUED,
        ),
        requests.evaluate,
    ),
    (
        Operation(
            "GET",
            "/runs/{id}/evaluate/{request_id}",
            "an evaluate request's result",
            (_DONE, _PENDING),
            errors=(401, 404, 422, 502),
        ),
        requests.evaluate_result,
    ),
    (
        Operation(
            "GET",
            "/runs/{id}/eval",
            "the run's evaluation (metrics and samples)",
            (Reply(200, "metrics and samples"),),
        ),
        runs.get_eval,
    ),
    (
        Operation(
            "GET",
            "/runs/{id}/artifact",
            "the run's artifact pointer",
            (Reply(200, "storage, uri, file_id, size, sha256"),),
        ),
        runs.get_artifact,
    ),
    (
        Operation(
            "POST",
            "/runs/{id}/score",
            "score text with a completed run's model",
            (Reply(202, "queued", requests.Accepted),),
            body=ScoreRequest,
            errors=_QUEUED,
        ),
        requests.score,
    ),
    (
        Operation(
            "GET",
            "/runs/{id}/score/{request_id}",
            "a score request's result",
            (_DONE, _PENDING),
            errors=(401, 404, 422, 502),
        ),
        requests.score_result,
    ),
    (
        Operation(
            "POST",
            "/runs/{id}/generate",
            "sample text from a completed run's model",
            (Reply(202, "queued", requests.Accepted),),
            body=GenerateRequest,
            errors=_QUEUED,
        ),
        requests.generate,
    ),
    (
        Operation(
            "GET",
            "/runs/{id}/generate/{request_id}",
            "a generate request's result",
            (_DONE, _PENDING),
            errors=(401, 404, 422, 502),
        ),
        requests.generate_result,
    ),
    (
        Operation(
            "POST",
            "/runs/{id}/chat",
            "send a chat message (new session when none given)",
            (Reply(202, "queued", requests.Accepted),),
            body=ChatRequest,
            errors=_QUEUED,
        ),
        requests.chat,
    ),
    (
        Operation(
            "GET",
            "/runs/{id}/chat/{session_id}",
            "a chat session's messages",
            (Reply(200, "history", requests.ChatHistory),),
        ),
        requests.chat_history,
    ),
    (
        Operation(
            "DELETE",
            "/runs/{id}/chat/{session_id}",
            "forget a chat session",
            (Reply(200, "deleted", requests.Deleted),),
        ),
        requests.chat_delete,
    ),
    (
        Operation(
            "GET",
            "/runs/{id}/chat/{session_id}/{request_id}",
            "a chat request's result",
            (_DONE, _PENDING),
            errors=(401, 404, 422, 502),
        ),
        requests.chat_result,
    ),
    (
        Operation(
            "GET",
            "/artifacts/{kind}/{artifact_id}",
            "download an artifact (.tar.gz), from the store or this machine",
            (Reply(200, "the archive", media="application/gzip"),),
            params=(Param("kind", {"enum": ["run", "tokenizer"]}, where="path"),),
        ),
        runs.download,
    ),
    (
        Operation(
            "POST",
            "/tokenizers/train",
            "train a tokenizer on its own",
            (Reply(202, "queued", RunCreated),),
            body=TokenizerTrainRequest,
            flat_body=True,
            errors=(400, 401, 408, 413, 415, 422),
        ),
        runs.train_tokenizer,
    ),
    (
        Operation(
            "GET",
            "/tokenizers/{tokenizer_id}",
            "a tokenizer's status and stats",
            (Reply(200, "tokenizer", runs.TokenizerInfo),),
        ),
        runs.get_tokenizer,
    ),
)


# -------------------------------------------------------------------------------- the app


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
    app[STOPPING] = asyncio.Event()
    app[OPENAPI] = msgspec.json.encode(openapi_document(settings))
    app[STREAMS] = Slots(settings.max_streams)

    async def client_ctx(app: web.Application) -> AsyncIterator[None]:
        # Live streams each read through a connection of their own (ServiceClient.dedicated).
        app[CLIENT] = ServiceClient.connect(redis_url, Keys(settings.prefix), block_ms=BLOCK_MS)
        try:
            yield
        finally:
            await app[CLIENT].aclose()

    async def store_ctx(app: web.Application) -> AsyncIterator[None]:
        app[STORE] = make_store(settings)
        try:
            yield
        finally:
            await app[STORE].aclose()

    app.cleanup_ctx.append(client_ctx)
    app.cleanup_ctx.append(store_ctx)
    app.on_shutdown.append(_on_shutdown)
    app.on_response_prepare.append(stamp_request_id)
    for op, handler in ROUTES:
        app.router.add_route(op.method, op.path, handler)
    add_dashboard(app)
    return app


def make_runner(settings: Settings, redis_url: str) -> web.AppRunner:
    """The app's runner. A connection has `http_timeout_s` to send a whole request head, and
    an idle keep-alive one is closed after as long: aiohttp's keep-alive timer also runs from
    the moment a connection opens until its first request is complete, so a client that
    sends its headers slowly (slowloris) is cut off. No access log: ?api_key= must not end
    up in a log file."""
    return web.AppRunner(
        create_app(settings, redis_url),
        shutdown_timeout=5.0,
        access_log=None,
        keepalive_timeout=settings.http_timeout_s,
    )


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
    runner = make_runner(settings, redis_url)
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
