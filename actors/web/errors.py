"""Errors in one format: `{"code", "message", "request_id"}` (+ `"field"`), from one
middleware that also sets the request id and refuses, before any handler, requests from
other origins, without the API key, or with a body that is not JSON."""

from __future__ import annotations

import contextlib
import hmac
import re
import uuid
from collections.abc import Mapping

import msgspec
from aiohttp import hdrs, web
from redis.exceptions import RedisError
from yarl import URL

from actors.runtime import log
from actors.web.context import REQUEST_ID, SETTINGS, STREAM, Handler
from actors.web.sse import sse

PUBLIC_PATHS = ("/healthz", "/readyz", "/")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_log = log.get("control")


class ErrorBody(msgspec.Struct, kw_only=True, omit_defaults=True):
    code: str
    message: str
    request_id: str
    field: str | None = None


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
    403: "FORBIDDEN",
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


def _same_origin(request: web.Request, origin: str) -> bool:
    """Whether a browser's `Origin` names this endpoint: its host and port are those of the
    Host the request was sent to, or of X-Forwarded-Host behind a proxy (a header no page can
    add without a CORS preflight, which this endpoint never grants). The scheme is not
    compared, since a TLS proxy in front changes it."""
    try:
        url = URL(origin)
        if url.scheme not in ("http", "https") or not url.host or url.raw_path not in ("", "/"):
            return False
        hosts = [request.host, request.headers.get("X-Forwarded-Host", "")]
        ours = [URL.build(scheme=url.scheme, authority=host) for host in hosts if host]
    except ValueError:
        return False
    return any((u.host, u.port) == (url.host, url.port) for u in ours)


_BODY_METHODS = ("POST", "PUT", "PATCH")
_JSON = "application/json"


def _refusal(request: web.Request) -> ApiError | None:
    """What a request is refused for before any handler runs: a page of another origin (a
    browser says so in `Origin`), a missing or wrong API key, or a body that is not JSON.

    Without an API key (the default) these are what keeps any web page the user visits from
    submitting or cancelling runs on their local endpoint: a cross-origin page can send a
    text/plain or form POST without a preflight, but never an application/json one, and a
    browser names the page's origin on every POST."""
    origin = request.headers.get(hdrs.ORIGIN)
    if origin is not None and not _same_origin(request, origin):
        return ApiError(403, "FORBIDDEN", "requests from other origins are not allowed")
    if not _authorized(request, request.app[SETTINGS].api_key):
        return ApiError(401, "UNAUTHORIZED", "missing or invalid X-Api-Key")
    # A bodiless POST (a cancel) may say anything: clients such as aiohttp's send
    # application/octet-stream with it, and a browser sends Origin, refused above.
    if request.method in _BODY_METHODS and request.body_exists and request.content_type != _JSON:
        return ApiError(
            415,
            "UNSUPPORTED_MEDIA_TYPE",
            "a request body must be JSON, sent with Content-Type: application/json",
        )
    return None


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, origin, API key, body type, and every error in the one JSON format."""
    request[REQUEST_ID] = _request_id(request.headers.get("X-Request-ID"))
    try:
        if refused := _refusal(request):
            raise refused
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


async def stamp_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """Every response carries X-Request-ID, streamed ones included."""
    response.headers["X-Request-ID"] = request.get(REQUEST_ID) or uuid.uuid4().hex
