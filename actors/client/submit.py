"""Submitting work: every id of a run is fixed here, and the whole chain is built up front.

Each command carries the rest of the chain, so each actor starts the next step itself.
The control endpoint, the CLI and replay all submit through these functions.
"""

from __future__ import annotations

import secrets
import time

from actors.runtime.connection import Redis
from actors.runtime.outcome import add_command, add_event
from protocol.commands import (
    ArtifactUpload,
    ChainCommand,
    CorpusIngest,
    ModelEvaluate,
    ModelTrain,
    TokenizerTrain,
    actor_of,
    check_command,
)
from protocol.events import RunQueued
from protocol.keys import ActorName, Keys
from protocol.requests import CorpusSource, RunCreated, TokenizerTrainRequest, TrainRequest
from protocol.settings import CorpusSettings, TokenizerSettings, with_fields
from trainer.errors import FieldError


def new_id(kind: str) -> str:
    """Sortable by time and unique within a second (64 random bits)."""
    return f"{kind}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(4)}"


def _ingest(
    source: CorpusSource, corpus: CorpusSettings, run_id: str, corpus_id: str, now: float
) -> CorpusIngest:
    sources = [s for s in (source.corpus_path, source.corpus_name, source.corpus_file_id) if s]
    if len(sources) != 1:
        raise FieldError(
            "corpus_path", "give exactly one of corpus_path, corpus_name, corpus_file_id"
        )
    return with_fields(
        CorpusIngest,
        corpus,
        command_id=f"{run_id}.ingest",
        run_id=run_id,
        corpus_id=corpus_id,
        user_id=source.user_id,
        requested_at=now,
        path=source.corpus_path,
        named=source.corpus_name,
        file_id=source.corpus_file_id,
    )


def _tokenizer(
    source: CorpusSource,
    tokenizer: TokenizerSettings,
    run_id: str,
    corpus_id: str,
    tok_id: str,
    now: float,
) -> TokenizerTrain:
    return with_fields(
        TokenizerTrain,
        tokenizer,
        command_id=f"{run_id}.tokenizer",
        run_id=run_id,
        tokenizer_id=tok_id,
        corpus_id=corpus_id,
        user_id=source.user_id,
        requested_at=now,
    )


def checked_chain(chain: list[ChainCommand]) -> list[ChainCommand]:
    """The chain, each step checked (protocol.commands.check_command) before anything is
    queued; raises FieldError naming the field."""
    for cmd in chain:
        check_command(cmd)
    return chain


def plan_train(req: TrainRequest, run_id: str | None = None) -> list[ChainCommand]:
    """The chain of a training run: ingest → tokenizer (unless given) → trainer → evaluator
    → uploader, checked."""
    run_id = run_id or new_id("run")
    now = time.time()
    corpus_id = f"{run_id}-corpus"
    user_id = req.source.user_id
    chain: list[ChainCommand] = [_ingest(req.source, req.corpus, run_id, corpus_id, now)]
    tok_id = req.chain.tokenizer_id
    if not tok_id:
        tok_id = f"{run_id}-tok"
        chain.append(_tokenizer(req.source, req.tokenizer, run_id, corpus_id, tok_id, now))
    chain.append(
        with_fields(
            ModelTrain,
            req.train,
            command_id=f"{run_id}.trainer",
            run_id=run_id,
            corpus_id=corpus_id,
            tokenizer_id=tok_id,
            user_id=user_id,
            requested_at=now,
        )
    )
    chain.append(
        ModelEvaluate(
            command_id=f"{run_id}.evaluator",
            run_id=run_id,
            user_id=user_id,
            requested_at=now,
            split="test",
        )
    )
    if req.chain.upload:
        chain.append(
            ArtifactUpload(
                command_id=f"{run_id}.uploader",
                run_id=run_id,
                user_id=user_id,
                requested_at=now,
            )
        )
    return checked_chain(chain)


def plan_tokenizer(req: TokenizerTrainRequest, run_id: str | None = None) -> list[ChainCommand]:
    """A tokenizer job is a short run of its own: ingest → tokenizer, checked."""
    run_id = run_id or new_id("tokjob")
    now = time.time()
    corpus_id = f"{run_id}-corpus"
    return checked_chain(
        [
            _ingest(req.source, req.corpus, run_id, corpus_id, now),
            _tokenizer(req.source, req.tokenizer, run_id, corpus_id, f"{run_id}-tok", now),
        ]
    )


def created(chain: list[ChainCommand]) -> RunCreated:
    first = chain[0]
    tok = next((c.tokenizer_id for c in chain if isinstance(c, ModelTrain | TokenizerTrain)), "")
    corpus = first.corpus_id if isinstance(first, CorpusIngest) else ""
    return RunCreated(
        run_id=first.run_id,
        job_id=first.run_id,
        corpus_id=corpus,
        tokenizer_id=tok,
        steps=[actor_of(c) for c in chain],
    )


async def submit(redis: Redis, keys: Keys, chain: list[ChainCommand]) -> RunCreated:
    """Queue a run: its run.queued event, its index entry and its first command, atomically."""
    first = chain[0]
    first.rest = list(chain[1:])
    info = created(chain)
    steps: list[ActorName] = [actor_of(c) for c in chain]
    train = next((c for c in chain if isinstance(c, ModelTrain)), None)
    corpus = ""
    if isinstance(first, CorpusIngest):
        corpus = (
            first.named or first.path or (f"data-bank:{first.file_id}" if first.file_id else "")
        )
    now = time.time()
    event = RunQueued(
        run_id=info.run_id,
        user_id=first.user_id,
        at=now,
        steps=steps,
        corpus=corpus,
        model_family=train.model_family if train else "",
        model_size=train.model_size if train else "",
        tokenizer_id=info.tokenizer_id,
    )
    async with redis.pipeline(transaction=True) as pipe:
        add_event(pipe, keys, event)
        pipe.zadd(keys.runs, {info.run_id: now})
        add_command(pipe, keys, first)
        await pipe.execute()
    return info
