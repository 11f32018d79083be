"""Helpers of the route handlers: JSON answers, request bodies, path ids, query values,
the run a path names, corpus paths confined to the corpus root."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from typing import TypeVar

import msgspec
from aiohttp import web

from actors.client.client import ServiceClient
from actors.runtime.config import Settings
from actors.web.context import CLIENT, SETTINGS
from actors.web.errors import ApiError, invalid, not_found
from protocol.requests import decode_body, decode_flat
from protocol.settings import Id
from protocol.state import RunState
from trainer.corpus import read_corpus_text, resolve_corpus_file, resolve_corpus_path
from trainer.errors import UserError

_AT = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_NAMED_FIELD = re.compile(r"(?:unknown|missing required) field `(?P<name>[^`]*)`")
T = TypeVar("T", bound=msgspec.Struct)


def json_response(
    obj: object, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
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


async def read_body(request: web.Request, typ: type[T], *, flat: bool = False) -> T:
    """Decode and validate a JSON body (an empty body is `{}`; upstream's aliases and nulls
    accepted, protocol.requests.decode_body); `flat`: a grouped request (decode_flat)."""
    try:
        # A client that sends its body slowly must not hold the handler without end.
        async with asyncio.timeout(request.app[SETTINGS].http_timeout_s):
            raw = await request.read()
    except TimeoutError:
        raise ApiError(408, "REQUEST_TIMEOUT", "the request body did not arrive in time") from None
    if not raw.strip():
        raw = b"{}"
    try:
        if flat:
            return decode_flat(raw, typ)
        return decode_body(raw, typ)
    except msgspec.ValidationError as e:
        field = field_of(str(e))
        if field:
            raise invalid(field, str(e)) from None
        raise ApiError(422, "INVALID_INPUT", f"invalid request body: {e}") from None
    except msgspec.DecodeError as e:
        raise ApiError(400, "INVALID_JSON", f"the request body is not valid JSON: {e}") from None


def valid_id(value: str) -> bool:
    try:
        msgspec.convert(value, Id)
    except msgspec.ValidationError:
        return False
    return True


def path_id(request: web.Request, name: str, what: str) -> str:
    value = request.match_info[name]
    if not valid_id(value):
        raise not_found(f"unknown {what} {value[:140]!r}")
    return value


def int_query(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
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


def bool_query(request: web.Request, name: str, default: bool) -> bool:
    raw = request.query.get(name, "").lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise invalid(name, f"expected true or false, got {raw[:40]!r}")


def text(raw: bytes | str) -> str:
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw


async def run_of(request: web.Request, client: ServiceClient | None = None) -> RunState:
    """The run the path names (404 when unknown), read through `client` if given (a stream's
    own connection) or the app's."""
    run_id = path_id(request, "id", "run")
    state = await (client or request.app[CLIENT]).find_run(run_id)
    if state is None:
        raise not_found(f"unknown run {run_id!r}")
    return state


async def completed_run(request: web.Request) -> RunState:
    state = await run_of(request)
    if state.status != "completed":
        raise ApiError(
            409, "CONFLICT", f"run {state.run_id!r} is {state.status}; it must be completed first"
        )
    return state


def confine(settings: Settings, field: str, user_path: str, *, file: bool = False) -> str:
    """The path relative to the corpus root, if it exists inside it (symlinks resolved);
    `file`: and is a readable file. The error names the field, never a server path."""
    try:
        if file:
            real = resolve_corpus_file(settings.corpus_root, user_path, field)
        else:
            real = resolve_corpus_path(settings.corpus_root, user_path)
    except (UserError, OSError, ValueError) as e:
        raise invalid(field, str(e) if isinstance(e, UserError) else "invalid path") from None
    return real.relative_to(settings.corpus_root.resolve()).as_posix()


def read_text(settings: Settings, field: str, user_path: str, max_chars: int) -> str:
    """The text of a file under the corpus root; the error names the field."""
    try:
        return read_corpus_text(settings.corpus_root, user_path, field, max_chars)
    except (UserError, OSError) as e:
        raise invalid(field, str(e) if isinstance(e, UserError) else "cannot read it") from None
