"""Routes of runs and tokenizers: submit, list, state, cancel, evaluation, artifacts.

Everything is read from Redis (the run's state, its evaluation record, the tokenizer's
record), never from a local run folder: the control endpoint needs no data dir of the
actors'. An artifact in the store is downloaded through it (to a temporary file, removed
once sent); only an artifact the uploader kept on its own machine ("local", without
MT_STORE_URL) is read from the data dir, which then must be the uploader's.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from pathlib import Path

import msgspec
from aiohttp import web

from actors.client.client import RunEnded, UnknownRun
from actors.runtime import log
from actors.runtime.store import Pointer
from actors.web.context import CLIENT, REQUEST_ID, SETTINGS, STORE
from actors.web.errors import ApiError, invalid, not_found
from actors.web.http import (
    confine,
    int_query,
    json_response,
    path_id,
    read_body,
    run_of,
    text,
)
from protocol.events import ArtifactPointer
from protocol.requests import HTTP_NAMES, CorpusSource, TokenizerTrainRequest, TrainRequest
from protocol.state import RunState
from trainer.corpus import NAMED_CORPORA
from trainer.errors import FieldError, UserError

_log = log.get("control")


class RunList(msgspec.Struct, kw_only=True):
    runs: list[RunState]


class CancelAccepted(msgspec.Struct, kw_only=True):
    run_id: str
    status: str = "cancellation-requested"


class TokenizerInfo(msgspec.Struct, kw_only=True):
    tokenizer_id: str
    status: str
    kind: str = ""
    run_id: str = ""
    stats: dict[str, float] = {}
    path: str = ""  # where the tokenizer actor saved it, on its machine
    artifact_path: str = ""
    created_at: str = ""
    message: str = ""  # why it failed


async def _check_source(app: web.Application, req: CorpusSource) -> CorpusSource:
    """Exactly one corpus source, and one that can work; a path is made root-relative."""
    settings = app[SETTINGS]
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
    """The tokenizer's record says it is ready (the tokenizer actor writes it)."""
    client = app[CLIENT]
    status = await client.redis.hget(client.keys.tokenizer(tokenizer_id), "status")
    if status == b"ready":
        return
    if status:
        raise invalid(
            "tokenizer_id", f"tokenizer {tokenizer_id!r} is not ready (status {text(status)})"
        )
    raise invalid("tokenizer_id", f"unknown tokenizer {tokenizer_id!r}")


async def _check_pretrained(app: web.Application, run_id: str) -> None:
    state = await app[CLIENT].find_run(run_id)
    if state is None:
        raise invalid("pretrained_run_id", f"unknown run {run_id!r}")
    if state.status != "completed":
        raise invalid("pretrained_run_id", f"run {run_id!r} is {state.status}, not completed")


async def train(request: web.Request) -> web.StreamResponse:
    app = request.app
    req = await read_body(request, TrainRequest, flat=True)
    req.source = await _check_source(app, req.source)
    if req.chain.tokenizer_id:
        await _check_tokenizer(app, req.chain.tokenizer_id)
    if req.train.pretrained_run_id:
        await _check_pretrained(app, req.train.pretrained_run_id)
    try:
        info = await app[CLIENT].train(req)
    except FieldError as e:
        raise invalid(HTTP_NAMES.get(e.field, e.field), e.message) from None
    except UserError as e:
        raise ApiError(422, "INVALID_INPUT", str(e)) from None
    _log.info("run submitted", run_id=info.run_id, request_id=request[REQUEST_ID])
    return json_response(info, 202, {"Location": f"/runs/{info.run_id}"})


async def train_tokenizer(request: web.Request) -> web.StreamResponse:
    app = request.app
    req = await read_body(request, TokenizerTrainRequest, flat=True)
    req.source = await _check_source(app, req.source)
    try:
        info = await app[CLIENT].train_tokenizer(req)
    except FieldError as e:
        raise invalid(HTTP_NAMES.get(e.field, e.field), e.message) from None
    except UserError as e:
        raise ApiError(422, "INVALID_INPUT", str(e)) from None
    _log.info("tokenizer job submitted", run_id=info.run_id, request_id=request[REQUEST_ID])
    return json_response(info, 202, {"Location": f"/tokenizers/{info.tokenizer_id}"})


async def get_run(request: web.Request) -> web.StreamResponse:
    return json_response(await run_of(request))


async def list_runs(request: web.Request) -> web.StreamResponse:
    limit = int_query(request, "limit", 20, 1, 500)
    return json_response(RunList(runs=await request.app[CLIENT].runs(limit)))


async def cancel(request: web.Request) -> web.StreamResponse:
    """Set the cancel flag and record CancelRequested atomically, unless the run is over."""
    run_id = path_id(request, "id", "run")
    try:
        outcome = await request.app[CLIENT].cancel(run_id)
    except UnknownRun:
        raise not_found(f"unknown run {run_id!r}") from None
    except RunEnded as e:
        raise ApiError(409, "CONFLICT", str(e)) from None
    if outcome == "requested":
        _log.info("cancel requested", run_id=run_id, request_id=request[REQUEST_ID])
    return json_response(CancelAccepted(run_id=run_id), 202)


class EvalRecord(msgspec.Struct, kw_only=True):
    """`<prefix>:eval:<run_id>`, written by the evaluator with its step's commit."""

    metrics: dict[str, object]
    samples: list[object] = []


async def get_eval(request: web.Request) -> web.StreamResponse:
    state = await run_of(request)
    client = request.app[CLIENT]
    raw = await client.redis.get(client.keys.eval(state.run_id))
    if raw is None:
        raise not_found(f"run {state.run_id!r} has no evaluation yet")
    record = msgspec.json.decode(raw, type=EvalRecord)
    metrics = record.metrics
    body: dict[str, object] = {"run_id": state.run_id, "status": "completed"}
    body |= {"metrics": metrics, "samples": record.samples}
    # The flat fields the old API answered with.
    body.update({k: metrics[k] for k in ("split", "loss", "perplexity") if k in metrics})
    return json_response(body)


async def get_artifact(request: web.Request) -> web.StreamResponse:
    state = await run_of(request)
    if not state.artifact:
        raise not_found(f"run {state.run_id!r} has no artifact yet")
    return json_response(msgspec.json.decode(state.artifact, type=ArtifactPointer))


async def _artifact_of(app: web.Application, kind: str, artifact_id: str) -> ArtifactPointer | None:
    """The pointer the uploader recorded: the run's state, or the tokenizer's record."""
    client = app[CLIENT]
    raw: str | bytes | None
    if kind == "run":
        state = await client.find_run(artifact_id)
        raw = state.artifact if state is not None else None
    else:
        raw = await client.redis.hget(client.keys.tokenizer(artifact_id), "artifact")
    if not raw:
        return None
    try:
        return msgspec.json.decode(raw, type=ArtifactPointer)
    except msgspec.DecodeError:  # ValidationError too
        return None  # damaged: there is nothing to download by it


async def download(request: web.Request) -> web.StreamResponse:
    kind = request.match_info["kind"]
    if kind not in ("run", "tokenizer"):
        raise not_found(f"unknown artifact kind {kind[:40]!r} (run or tokenizer)")
    artifact_id = path_id(request, "artifact_id", "artifact")
    headers = {
        "Content-Type": "application/gzip",
        "Content-Disposition": f'attachment; filename="{artifact_id}.tar.gz"',
    }
    art = await _artifact_of(request.app, kind, artifact_id)
    if art is not None and art.storage == "store" and art.backend:
        pointer = Pointer(
            backend=art.backend,
            key=art.key,
            sha256=art.sha256,
            size=art.size,
            file_id=art.file_id,
        )
        tmp = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="mt-download-"))
        try:
            path = await request.app[STORE].get(pointer, tmp / f"{artifact_id}.tar.gz")
            response = web.FileResponse(path, headers=headers)
            # prepare sends the whole file; the temporary copy goes once it is sent.
            await response.prepare(request)
            await response.write_eof()
            return response
        finally:
            await asyncio.to_thread(shutil.rmtree, tmp, True)
    path = request.app[SETTINGS].artifact_dir() / kind / f"{artifact_id}.tar.gz"
    if not await asyncio.to_thread(path.is_file):
        raise not_found(f"no {kind} artifact {artifact_id!r}")
    return web.FileResponse(path, headers=headers)


_RecordStats = dict[str, float | str | bool | None]  # a tokenizer record's "stats" (JSON)


async def get_tokenizer(request: web.Request) -> web.StreamResponse:
    app = request.app
    tokenizer_id = path_id(request, "tokenizer_id", "tokenizer")
    client = app[CLIENT]
    raw = await client.redis.hgetall(client.keys.tokenizer(tokenizer_id))
    if raw:
        fields = {text(k): text(v) for k, v in raw.items()}
        stats: dict[str, float] = {}
        with contextlib.suppress(msgspec.DecodeError):  # a corrupt record shows no stats
            # Numbers are shown; a scalar of another kind (a note) is left out.
            raw_stats = msgspec.json.decode(fields.get("stats") or "{}", type=_RecordStats)
            stats = {k: v for k, v in raw_stats.items() if isinstance(v, float)}
        path = fields.get("path", "")
        return json_response(
            TokenizerInfo(
                tokenizer_id=tokenizer_id,
                status=fields.get("status", "unknown"),
                kind=fields.get("kind", ""),
                run_id=fields.get("run_id", ""),
                stats=stats,
                path=path,
                artifact_path=path,
                created_at=fields.get("created_at", ""),
                message=fields.get("message", ""),
            )
        )
    # A tokenizer that a queued run or tokenizer job will train has no record yet.
    if tokenizer_id.endswith("-tok"):
        state = await client.find_run(tokenizer_id.removesuffix("-tok"))
        if state is not None and state.tokenizer_id == tokenizer_id:
            status = state.status if state.status in ("failed", "cancelled") else "queued"
            return json_response(
                TokenizerInfo(tokenizer_id=tokenizer_id, status=status, run_id=state.run_id)
            )
    raise not_found(f"unknown tokenizer {tokenizer_id!r}")
