"""tokenizer: `tokenizer.train` — fetches the corpus by its pointer (`Keys.corpus`, field
`stored`) unless this machine has it, trains on its train split in the actor's pool, saves
the tokenizer under tokenizers/<tokenizer_id>/ with its stats and stores that folder
(`tokenizers/<tokenizer_id>`), its pointer recorded as field `stored` of the record in the
step's fenced commit. The record
`mt:tokenizer:<id>` (status, kind, run_id, path, created_at, stats with vocab_size, message
on failure) is all `GET /tokenizers/{id}` shows: the control endpoint reads no tokenizer
folder."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from actors.runtime.artifacts import fetch, hold, pointer_write, publish, read_pointer
from actors.runtime.config import Settings
from actors.runtime.outcome import Outcome
from actors.runtime.pool import PoolActor
from actors.runtime.store import make_store
from actors.runtime.streams import Context
from protocol.commands import Base, TokenizerTrain, check_command
from protocol.events import TokenizerReady
from protocol.settings import TokenizerSettings
from trainer.errors import UserError

if TYPE_CHECKING:
    from trainer.tokenizer import TokenizerStats


def train(
    corpus_dir: str,
    out_dir: str,
    settings: TokenizerSettings,
) -> TokenizerStats:
    """Runs in a pool child."""
    from trainer.tokenizer import TokenizerConfig, train_tokenizer

    config = msgspec.convert(settings, TokenizerConfig, from_attributes=True)
    config.validate()
    return train_tokenizer(Path(corpus_dir), Path(out_dir), config)


class TokenizerActor(PoolActor):
    name = "tokenizer"
    concurrency = 1

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.store = make_store(settings)

    async def stop(self) -> None:
        await super().stop()
        await self.store.aclose()

    async def handle(self, cmd: Base, ctx: Context) -> Outcome | None:
        match cmd:
            case TokenizerTrain():
                return await self.train(cmd, ctx)
            case _:
                return None

    async def train(self, cmd: TokenizerTrain, ctx: Context) -> Outcome:
        check_command(cmd)  # before any work (e.g. a vocabulary too small for the kind)
        s = self.settings
        corpus_dir = s.corpus_dir(cmd.corpus_id)
        tok_dir = s.tokenizer_dir(cmd.tokenizer_id)
        record = ctx.keys.tokenizer(cmd.tokenizer_id)
        async with hold(s, corpus_dir, tok_dir):
            stored = await read_pointer(ctx.redis, ctx.keys.corpus(cmd.corpus_id), "stored")
            if stored is not None:
                await fetch(self.store, s, stored, corpus_dir, f"corpus {cmd.corpus_id!r}")
            if not (corpus_dir / "corpus.json").is_file():
                raise UserError(f"corpus {cmd.corpus_id!r} has not been ingested")
            await ctx.redis.hset(
                record,
                mapping={
                    "status": "training",
                    "kind": cmd.tokenizer_kind,
                    "run_id": cmd.run_id,
                    "path": str(tok_dir),
                    "created_at": str(time.time()),
                },
            )
            try:
                stats = await self.pool.run(train, str(corpus_dir), str(tok_dir), cmd)
                key = f"tokenizers/{cmd.tokenizer_id}"
                pointer = await publish(self.store, s, tok_dir, key)
            except Exception as e:  # recorded, then handled by the runtime's error policy
                await ctx.redis.hset(record, mapping={"status": "failed", "message": str(e)})
                raise
        ctx.log.info("tokenizer stored", key=pointer.key, size=pointer.size)
        numbers = msgspec.convert(msgspec.to_builtins(stats), dict[str, float])
        ready = TokenizerReady(
            tokenizer_id=cmd.tokenizer_id, tokenizer_kind=cmd.tokenizer_kind, stats=numbers
        )
        # "ready" is recorded in the same commit as the ack and the event; a failure of an
        # earlier attempt leaves no message behind.
        stats_json = msgspec.json.encode(numbers)
        ready_fields = ("status", "ready", "kind", cmd.tokenizer_kind, "stats", stats_json)
        return Outcome(
            events=[ready],
            writes=[
                ("HSET", record, *ready_fields),
                ("HDEL", record, "message"),
                pointer_write(record, "stored", pointer),
            ],
        )
