"""Routes of request-style work on a completed run: score, generate, chat and evaluate are
queued (202 with a request id); their results are polled (202 pending, 200 done, 422/502
failed), with upstream's flat result fields beside ours; chat sessions can be read and
forgotten. Bodies in upstream's spelling are accepted (protocol.requests)."""

from __future__ import annotations

import asyncio
import time

import msgspec
from aiohttp import web

from actors.client.submit import new_id
from actors.web.context import CLIENT, SETTINGS
from actors.web.errors import ApiError, invalid, not_found
from actors.web.http import (
    completed_run,
    confine,
    json_response,
    path_id,
    read_body,
    read_text,
    run_of,
)
from protocol.commands import ModelChat, ModelEvaluate, ModelGenerate, ModelScore, RequestCommand
from protocol.events import RequestKind
from protocol.keys import CHAT_TTL_S
from protocol.requests import (
    MAX_PROMPT_CHARS,
    MAX_SCORE_CHARS,
    ChatRequest,
    EvaluateRequest,
    GenerateRequest,
    ScoreRequest,
)
from protocol.settings import GenerateSettings, SamplingSettings, with_fields


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
    path = ""
    if req.path:  # or path_override, which decode_body put here
        path = await asyncio.to_thread(confine, settings, "path", req.path, file=True)
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
    if bool(req.text) == bool(req.path):
        raise invalid("text", "give exactly one of text and path")
    text = req.text
    if req.path:
        settings = request.app[SETTINGS]
        text = await asyncio.to_thread(read_text, settings, "path", req.path, MAX_SCORE_CHARS)
        if not text:
            raise invalid("path", f"{req.path!r} is empty: nothing to score")
    request_id = new_id("score")
    return await _queue(
        request.app,
        ModelScore(
            command_id=request_id,
            run_id=state.run_id,
            request_id=request_id,
            user_id=req.user_id,
            requested_at=time.time(),
            text=text,
            detail=req.detail or req.detail_level == "per_char",
            top_k=req.top_k,
        ),
    )


async def generate(request: web.Request) -> web.StreamResponse:
    state = await completed_run(request)
    req = await read_body(request, GenerateRequest)
    prompt = req.prompt
    if req.prompt_path:
        if req.prompt:
            raise invalid("prompt_path", "give prompt or prompt_path, not both")
        settings = request.app[SETTINGS]
        prompt = await asyncio.to_thread(
            read_text, settings, "prompt_path", req.prompt_path, MAX_PROMPT_CHARS
        )
    request_id = new_id("gen")
    return await _queue(
        request.app,
        # The body's generate settings travel as they are (no copy by hand).
        with_fields(
            ModelGenerate,
            msgspec.convert(req, GenerateSettings, from_attributes=True),
            command_id=request_id,
            run_id=state.run_id,
            request_id=request_id,
            user_id=req.user_id,
            requested_at=time.time(),
            prompt=prompt,
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
        with_fields(
            ModelChat,
            msgspec.convert(req, SamplingSettings, from_attributes=True),
            command_id=request_id,
            run_id=state.run_id,
            request_id=request_id,
            session_id=session_id,
            user_id=req.user_id,
            requested_at=time.time(),
            message=req.message,
        ),
    )


# ------------------------------------------------------- upstream's flat result fields
# Upstream's Model-Trainer API answers with flat fields (loss, outputs, response, ...); a
# result here carries them beside ours, read from our result by these shapes.


class _Top(msgspec.Struct):
    token: str
    prob: float


class _Token(msgspec.Struct):
    token: str
    top_k: list[_Top] = []


class _Score(msgspec.Struct):
    loss: float | None = None
    perplexity: float | None = None
    surprisal_bits: list[float] | None = None
    tokens: list[_Token] | None = None


class _Generated(msgspec.Struct):
    samples: list[str] = []
    steps: int | None = None
    eos_terminated: list[bool] | None = None


class _Reply(msgspec.Struct):
    reply: str | None = None
    session_id: str | None = None


class _Evaluated(msgspec.Struct):
    split: str | None = None
    loss: float | None = None
    perplexity: float | None = None


def upstream_fields(what: RequestKind, result: object) -> dict[str, object]:
    """Upstream's flat fields of a result: score → loss, perplexity, surprisal (bits per
    token), topk ([token, prob] per token) and tokens (with detail); generate → outputs,
    steps, eos_terminated; chat → response, session_id; evaluate → split, loss,
    perplexity. A result of another shape has none."""
    try:
        match what:
            case "score":
                sc = msgspec.convert(result, _Score)
                tokens = sc.tokens
                return {
                    "loss": sc.loss,
                    "perplexity": sc.perplexity,
                    "surprisal": sc.surprisal_bits,
                    "topk": [[[t.token, t.prob] for t in tok.top_k] for tok in tokens]
                    if tokens is not None
                    else None,
                    "tokens": [tok.token for tok in tokens] if tokens is not None else None,
                }
            case "generate":
                gen = msgspec.convert(result, _Generated)
                return {
                    "outputs": gen.samples,
                    "steps": gen.steps,
                    "eos_terminated": gen.eos_terminated,
                }
            case "chat":
                chat = msgspec.convert(result, _Reply)
                return {"response": chat.reply, "session_id": chat.session_id}
            case "evaluate":
                ev = msgspec.convert(result, _Evaluated)
                return {"split": ev.split, "loss": ev.loss, "perplexity": ev.perplexity}
    except msgspec.ValidationError:
        return {}
    return {}


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
        flat = upstream_fields(what, stored.result)
        return json_response({**flat, **body, "request_id": request_id, "status": "completed"})
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
