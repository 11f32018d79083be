"""ingest: `corpus.ingest` — a path under the corpus root, a named corpus or a Data Bank file,
normalized and split by trainer.corpus in the actor's process pool, then stored
(`corpora/<corpus_id>`: the splits and corpus.json) with its pointer recorded in the corpus's
record (`Keys.corpus`, field `stored`) in the step's fenced commit, so that a tokenizer,
trainer or evaluator on any machine can fetch it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from actors.runtime.artifacts import hold, pointer_write, publish
from actors.runtime.config import Settings
from actors.runtime.outcome import Outcome
from actors.runtime.pool import PoolActor
from actors.runtime.store import make_store
from actors.runtime.streams import Context
from protocol.commands import Base, CorpusIngest, check_command
from protocol.events import CorpusReady
from protocol.settings import CorpusSettings
from trainer.errors import UserError

if TYPE_CHECKING:
    from trainer.corpus import CorpusManifest


def prepare(
    source: str,
    named: bool,
    out_dir: str,
    root: str | None,
    settings: CorpusSettings,
) -> CorpusManifest:
    """Runs in a pool child: the corpus work never blocks the event loop."""
    from trainer.corpus import CorpusConfig, prepare_corpus

    config = msgspec.convert(settings, CorpusConfig, from_attributes=True)
    src: Path | str = source if named else Path(source)
    return prepare_corpus(src, Path(out_dir), config, root=Path(root) if root else None)


class IngestActor(PoolActor):
    name = "ingest"
    concurrency = 2

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.store = make_store(settings)

    async def stop(self) -> None:
        await super().stop()
        await self.store.aclose()

    async def handle(self, cmd: Base, ctx: Context) -> Outcome | None:
        match cmd:
            case CorpusIngest():
                return await self.ingest(cmd, ctx)
            case _:
                return None

    async def ingest(self, cmd: CorpusIngest, ctx: Context) -> Outcome:
        # Before any work: the command and the rest of its chain (a tokenizer too small for
        # its kind fails the run now, not after the corpus is split).
        check_command(cmd)
        s = self.settings
        out_dir = s.corpus_dir(cmd.corpus_id)
        root: str | None = None
        if cmd.file_id:
            source = str(await self.download(cmd.file_id, ctx))
        elif cmd.named:
            from trainer.corpus import NAMED_CORPORA

            if cmd.named not in NAMED_CORPORA:
                known = ", ".join(sorted(NAMED_CORPORA))
                raise UserError(f"unknown named corpus {cmd.named!r} (known: {known})")
            source = cmd.named
        else:
            from trainer.corpus import resolve_corpus_path

            resolve_corpus_path(s.corpus_root, cmd.path)  # outside the root, missing: now
            source, root = cmd.path, str(s.corpus_root)
        ctx.log.info("preparing corpus", source=source, corpus_id=cmd.corpus_id)
        async with hold(s, out_dir):  # gc leaves it alone until it is stored
            manifest = await self.pool.run(
                prepare,
                source,
                bool(cmd.named),
                str(out_dir),
                root,
                cmd,
            )
            pointer = await publish(self.store, s, out_dir, f"corpora/{cmd.corpus_id}")
        ctx.log.info("corpus stored", key=pointer.key, size=pointer.size)
        chars = {name: split.chars for name, split in manifest.splits.items()}
        lines = {name: split.lines for name, split in manifest.splits.items()}
        return Outcome(
            events=[
                CorpusReady(
                    corpus_id=cmd.corpus_id, chars=chars, lines=lines, sha256=manifest.source_sha256
                )
            ],
            writes=[pointer_write(ctx.keys.corpus(cmd.corpus_id), "stored", pointer)],
        )

    async def download(self, file_id: str, ctx: Context) -> Path:
        from actors.workers.databank import fetch

        ctx.log.info("downloading corpus from the Data Bank", file_id=file_id)
        sha = file_id if len(file_id) == 64 else None  # Data Bank ids are the sha256
        return await fetch(self.settings, file_id, ".txt", sha, "corpus_file_id")
