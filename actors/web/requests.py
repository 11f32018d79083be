"""Routes of request-style work on a completed run: score, generate, chat and evaluate are
queued (202 with a request id); their results are polled (202 pending, 200 done, 422/502
failed); chat sessions can be read and forgotten."""

from __future__ import annotations

import asyncio
import time

import msgspec
from aiohttp import web

from actors.client.submit import new_id
from actors.web.context import CLIENT, SETTINGS
from actors.web.errors import ApiError, not_found
from actors.web.http import completed_run, confine, json_response, path_id, read_body, run_of
from protocol.commands import ModelChat, ModelEvaluate, ModelGenerate, ModelScore, RequestCommand
from protocol.events import RequestKind
from protocol.keys import CHAT_TTL_S
from protocol.requests import ChatRequest, EvaluateRequest, GenerateRequest, ScoreRequest


class Accepted(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A request-style command was queued; poll its result under request_id."""

    request_id: str
    run_id: str
    status: str  # "pending"
    session_id: str = ""


class Pending(msgspec.Struct, kw_only=True):
    request_id: str
    status: str = "pending"


class ChatHistory(msgspec.Struct, kw_only=True):
    session_id: str
    run_id: str
    messages: list[dict[str, str]]


class Deleted(msgspec.Struct, kw_only=True):
    session_id: str
    status: str = "deleted"


async def _queue(app: web.Application, cmd: RequestCommand) -> web.StreamResponse:
    """XADD a request-style command with a marker of which run and route its id belongs
    to, and answer 202 with the id to poll."""
    await app[CLIENT].queue(cmd)
    rid = cmd.request_id
    session_id = cmd.session_id if isinstance(cmd, ModelChat) else ""
    accepted = Accepted(request_id=rid, run_id=cmd.run_id, status="pending", session_id=session_id)
    return json_response(accepted, 202)


async def evaluate(request: web.Request) -> web.StreamResponse:
    state = await completed_run(request)
    req = await read_body(request, EvaluateRequest)
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
    state = await completed_run(request)
    req = await read_body(request, ScoreRequest)
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
    state = await completed_run(request)
    req = await read_body(request, GenerateRequest)
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


async def _bind_session(request: web.Request, run_id: str, session_id: str) -> None:
    """A session id belongs to the run it was started in: through another run it is a 404."""
    client = request.app[CLIENT]
    key = client.keys.chat_owner(session_id)
    owner = await client.redis.set(key, run_id, nx=True, ex=CHAT_TTL_S, get=True)
    if owner is None:
        return
    if owner != run_id.encode():
        raise not_found(f"unknown chat session {session_id!r}")
    await client.redis.expire(key, CHAT_TTL_S)


async def chat(request: web.Request) -> web.StreamResponse:
    state = await completed_run(request)
    req = await read_body(request, ChatRequest)
    session_id = req.session_id or new_id("chat")
    await _bind_session(request, state.run_id, session_id)
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


async def _result(request: web.Request, what: RequestKind) -> web.StreamResponse:
    """See the module docstring: 202 pending, 200 done, 422/502 failed."""
    state = await run_of(request)
    request_id = path_id(request, "request_id", f"{what} request")
    client = request.app[CLIENT]
    stored = await client.result(request_id)
    if stored is None:
        marker = await client.request_marker(request_id)
        if marker is None or marker.what != what or marker.run_id != state.run_id:
            raise not_found(f"no {what} request {request_id!r} for this run")
        return json_response(Pending(request_id=request_id), 202)
    if stored.what != what:
        raise not_found(f"no {what} request {request_id!r}")
    if stored.ok:
        body = msgspec.to_builtins(stored)
        return json_response({**body, "request_id": request_id, "status": "completed"})
    kind = stored.error_kind
    raise ApiError(
        422 if kind == "user" else 502,
        "REQUEST_FAILED",
        stored.message or "failed",
        extra={"what": what, "error_kind": kind, "status": "failed"},
    )


async def score_result(request: web.Request) -> web.StreamResponse:
    return await _result(request, "score")


async def generate_result(request: web.Request) -> web.StreamResponse:
    return await _result(request, "generate")


async def evaluate_result(request: web.Request) -> web.StreamResponse:
    return await _result(request, "evaluate")


async def chat_result(request: web.Request) -> web.StreamResponse:
    path_id(request, "session_id", "chat session")
    return await _result(request, "chat")


async def chat_history(request: web.Request) -> web.StreamResponse:
    state = await run_of(request)
    session_id = path_id(request, "session_id", "chat session")
    client = request.app[CLIENT]
    stored = await client.redis.lrange(client.keys.chat(state.run_id, session_id), 0, -1)
    if not stored:
        raise not_found(f"unknown chat session {session_id!r}")
    messages = [msgspec.json.decode(raw, type=dict[str, str]) for raw in stored]
    return json_response(ChatHistory(session_id=session_id, run_id=state.run_id, messages=messages))


async def chat_delete(request: web.Request) -> web.StreamResponse:
    state = await run_of(request)
    session_id = path_id(request, "session_id", "chat session")
    client = request.app[CLIENT]
    if not await client.redis.delete(client.keys.chat(state.run_id, session_id)):
        raise not_found(f"unknown chat session {session_id!r}")
    return json_response(Deleted(session_id=session_id))
