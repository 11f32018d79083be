"""evaluator: `model.evaluate`, `model.score`, `model.generate`, `model.chat`.

The work runs in the actor's pools; each pool child keeps its two most recently used models
loaded (trainer.evaluate.MODEL_CACHE), so a chat does not reload the model every turn. Pool
children import torch and transformers as they start (warm_up), and the request pool's
child is started with the actor, in the background, so that the first request pays for
neither.
Request-style commands (with a request_id) have slots and a pool of their own, so that a
long chat never delays a run's evaluation step. They answer under `mt:result:<request_id>`;
chat sessions are Redis lists per run and session, appended in the fenced commit (no
concurrent turn is lost), capped and with a TTL (protocol.keys). A run whose model is not
on this machine is fetched from the store by its pointer (`Keys.run`, field `stored`, which
the trainer records) first, and so is the corpus a run's evaluation needs (`Keys.corpus`);
gc leaves both alone while a command uses them (`hold`). A run's evaluation step
records its metrics and samples under `mt:eval:<run_id>` in its commit: that record is what
`GET /runs/{id}/eval` shows, on any machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec

from actors.runtime import retention
from actors.runtime.artifacts import entry_path, fetch, hold, read_pointer
from actors.runtime.config import Settings
from actors.runtime.outcome import Outcome, answer, request_id_of
from actors.runtime.pool import Pool, PoolActor
from actors.runtime.store import make_store
from actors.runtime.streams import Context
from protocol.commands import (
    Base,
    ModelChat,
    ModelEvaluate,
    ModelGenerate,
    ModelScore,
    check_command,
)
from protocol.events import EvalCompleted
from protocol.keys import CHAT_MAX_TURNS, CHAT_TTL_S
from trainer.errors import UserError

# The service evaluates on the first lines of a split up to this many tokens: enough for a
# stable loss, and a big corpus does not hold the evaluator for minutes (the metrics say
# how many tokens were used).
EVAL_MAX_TOKENS = 50_000
MODEL_FILES = ("config.json", "mt_model.json")
# The run's evaluation record in Redis keeps this many samples, each text this long at most.
RECORD_SAMPLES = 50
RECORD_TEXT_CHARS = 2000


# torch's threads wait for work asleep, not spinning: the evaluator shares the machine with
# training (and with its other child), and on a busy 2-core machine spinning threads made a
# 32-token generation ~9x slower than one thread; asleep, ~1.3x. Set before torch is
# imported; a value from the environment wins.
TORCH_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
# When this process finished its warm-up (0.0: it did not run one); tests read it.
WARMED_AT = 0.0


def warm_up() -> None:
    """A pool child's start: the imports every job needs (torch, transformers' model code)."""
    global WARMED_AT
    for name, value in TORCH_ENV.items():
        os.environ.setdefault(name, value)
    from trainer.evaluate import import_model_code

    import_model_code()
    WARMED_AT = time.time()


def evaluate_job(
    run_dir: str, split: str, path: str | None, out_name: str, corpus_dir: str | None = None
) -> dict[str, object]:
    from trainer.evaluate import evaluate

    return evaluate(
        Path(run_dir),
        split="test" if split == "test" else "validation",
        path=Path(path) if path else None,
        corpus_dir=Path(corpus_dir) if corpus_dir else None,
        out_name=out_name,
        max_tokens=EVAL_MAX_TOKENS,
    )


def samples_job(run_dir: str, out_name: str) -> list[dict[str, object]]:
    """An evaluation's samples (what trainer.evaluate wrote), bounded for its Redis record."""
    from trainer.evaluate import eval_paths

    _, path = eval_paths(Path(run_dir), out_name)
    rows: list[dict[str, object]] = []
    with contextlib.suppress(FileNotFoundError), path.open("rb") as f:
        for line in f:
            if len(rows) >= RECORD_SAMPLES:
                break
            with contextlib.suppress(msgspec.DecodeError):
                row = msgspec.json.decode(line, type=dict[str, object])
                rows.append(
                    {k: v[:RECORD_TEXT_CHARS] if isinstance(v, str) else v for k, v in row.items()}
                )
    return rows


def score_job(run_dir: str, text: str, detail: bool, top_k: int) -> dict[str, object]:
    from trainer.evaluate import score

    return score(Path(run_dir), text, detail=detail, top_k=top_k)


def generate_job(run_dir: str, cmd: ModelGenerate) -> dict[str, object]:
    from trainer.evaluate import generation

    out = generation(Path(run_dir), cmd.prompt, cmd)
    return {"samples": out.texts, "steps": out.steps, "eos_terminated": out.eos_terminated}


def chat_job(run_dir: str, history: list[tuple[str, str]], cmd: ModelChat) -> str:
    from trainer.evaluate import chat

    return chat(Path(run_dir), history, cmd.message, cmd)


class Turn(msgspec.Struct):
    role: str
    content: str


_turn = msgspec.json.Decoder(Turn)


class _DataRef(msgspec.Struct):
    dir: str


class _RunCorpus(msgspec.Struct):
    """What the evaluator reads of a run's manifest.json: the corpus it was trained on."""

    data: _DataRef


_run_corpus = msgspec.json.Decoder(_RunCorpus)


def corpus_id_of(run_dir: Path) -> str | None:
    """The id of the corpus a run was trained on: the name of its manifest's corpus dir."""
    try:
        return Path(_run_corpus.decode((run_dir / "manifest.json").read_bytes()).data.dir).name
    except (OSError, msgspec.DecodeError):
        return None  # trainer.evaluate then says what is wrong with the manifest


class _Scores(msgspec.Struct):
    """The headline numbers of trainer.evaluate's metrics (the event carries these)."""

    loss: float | None = None
    perplexity: float | None = None


class EvaluatorActor(PoolActor):
    name = "evaluator"
    concurrency = 2  # chain steps (a run's evaluation)
    request_slots = 2  # score, generate, chat, requested evaluations: beside the chain steps
    chat_max_turns = CHAT_MAX_TURNS

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, warm_up=warm_up)
        # Its own child: a 2,048-token chat must not hold the one a run's evaluation needs.
        self.requests = Pool(1, warm_up=warm_up)
        self.store = make_store(settings)

    def pool_for(self, cmd: Base) -> Pool:
        return self.requests if request_id_of(cmd) else self.pool

    async def start(self) -> None:
        # Only the interactive one: a run's evaluation step comes after its training, when
        # its child's start matters little, and at the service's start each warm-up is
        # seconds of CPU that a queued run's first training step would wait behind (on a
        # busy 2-core machine, warming both children delayed it by ~4 s).
        self.start_pools(self.requests)

    async def stop(self) -> None:
        await super().stop()
        self.requests.shutdown(wait=False)
        await self.store.aclose()

    async def handle(self, cmd: Base, ctx: Context) -> Outcome | None:
        check_command(cmd)  # before any work: a bad command fails at once, as a user error
        match cmd:
            case ModelEvaluate():
                return await self.evaluate(cmd, ctx)
            case ModelScore():
                async with self.run_dir(cmd.run_id, ctx) as run_dir:
                    result = await self.requests.run(
                        score_job, str(run_dir), cmd.text, cmd.detail, cmd.top_k
                    )
                return answer(ctx.keys, cmd, {"result": result})
            case ModelGenerate():
                async with self.run_dir(cmd.run_id, ctx) as run_dir:
                    generated = await self.requests.run(generate_job, str(run_dir), cmd)
                return answer(ctx.keys, cmd, {"result": {"prompt": cmd.prompt, **generated}})
            case ModelChat():
                async with self.run_dir(cmd.run_id, ctx) as run_dir:
                    return await self.chat(cmd, run_dir, ctx)
            case _:
                return None

    async def evaluate(self, cmd: ModelEvaluate, ctx: Context) -> Outcome:
        path: str | None = None
        if cmd.path:  # checked before the run's model is looked for (or fetched)
            from trainer.corpus import resolve_corpus_file

            path = str(resolve_corpus_file(self.settings.corpus_root, cmd.path, "path"))
        async with self.run_dir(cmd.run_id, ctx) as run_dir:
            return await self.evaluate_in(cmd, ctx, run_dir, path)

    async def evaluate_in(
        self, cmd: ModelEvaluate, ctx: Context, run_dir: Path, path: str | None
    ) -> Outcome:
        out_name = "metrics" if not cmd.request_id else f"eval-{cmd.request_id}"
        corpus_id = None if path else corpus_id_of(run_dir)
        async with contextlib.AsyncExitStack() as stack:
            corpus_dir: str | None = None
            if corpus_id:
                local = self.settings.corpus_dir(corpus_id)
                await stack.enter_async_context(hold(self.settings, local))
                stored = await read_pointer(ctx.redis, ctx.keys.corpus(corpus_id), "stored")
                if stored is not None:
                    await fetch(self.store, self.settings, stored, local, f"corpus {corpus_id!r}")
                if stored is not None or (local / "corpus.json").is_file():
                    corpus_dir = str(local)
            metrics = await self.pool_for(cmd).run(
                evaluate_job, str(run_dir), cmd.split, path, out_name, corpus_dir
            )
        if cmd.path:  # the path as the user gave it: a result never shows a server path
            metrics = {**metrics, "source": cmd.path}
        scores = msgspec.convert(metrics, _Scores)
        # The event keeps the numeric metrics; the rest (source, samples) is in the result.
        numbers = {k: v for k, v in metrics.items() if type(v) in (int, float)}
        event = EvalCompleted(
            request_id=cmd.request_id,
            split=cmd.path or cmd.split,
            loss=scores.loss,
            ppl=scores.perplexity,
            metrics=msgspec.convert(numbers, dict[str, float]),
        )
        if cmd.request_id:
            outcome = answer(ctx.keys, cmd, {"result": {**metrics, "split": event.split}})
            outcome.events.insert(0, event)
            return outcome
        # The run's evaluation, readable wherever the run's folder is not: with the ack.
        samples = await self.pool_for(cmd).run(samples_job, str(run_dir), out_name)
        record = msgspec.json.encode({"metrics": metrics, "samples": samples})
        ttl = str(retention.retention_s())
        return Outcome(
            events=[event], writes=[("SET", ctx.keys.eval(cmd.run_id), record, "EX", ttl)]
        )

    async def chat(self, cmd: ModelChat, run_dir: Path, ctx: Context) -> Outcome:
        key = ctx.keys.chat(cmd.run_id, cmd.session_id)
        # Every turn committed before this one started is in what it is generated from.
        turns = [_turn.decode(raw) for raw in await ctx.redis.lrange(key, 0, -1)]
        reply = await self.requests.run(
            chat_job, str(run_dir), [(t.role, t.content) for t in turns], cmd
        )
        new = [Turn("user", cmd.message), Turn("assistant", reply)]
        kept = 2 * self.chat_max_turns
        history = [{"role": t.role, "content": t.content} for t in [*turns, *new][-kept:]]
        result = {"reply": reply, "session_id": cmd.session_id, "history": history}
        outcome = answer(ctx.keys, cmd, {"result": result})
        # With the ack, fenced: a worker whose command was taken over must not add its turn.
        # Appended, not rewritten, so that concurrent turns of a session are all kept.
        outcome.writes += [
            ("RPUSH", key, *(msgspec.json.encode(t) for t in new)),
            ("LTRIM", key, str(-kept), "-1"),
            ("EXPIRE", key, str(CHAT_TTL_S)),
        ]
        return outcome

    @contextlib.asynccontextmanager
    async def run_dir(self, run_id: str, ctx: Context) -> AsyncIterator[Path]:
        """The run's model dir on this machine, fetched from the store by the run's `stored`
        pointer unless this version is here; gc leaves it alone until the block ends."""
        run_dir = self.settings.run_dir(run_id)
        async with hold(self.settings, run_dir):
            pointer = await read_pointer(ctx.redis, ctx.keys.run(run_id), "stored")
            if not any((run_dir / f).is_file() for f in MODEL_FILES):
                if pointer is None:
                    raise UserError(
                        f"run {run_id!r} has no model on this machine and none in the store "
                        "(not trained yet, or trained before models were stored)"
                    )
                # Its folder may be here without the model (removed, or only the run's
                # log written since): not the stored version, whatever the entry says.
                await asyncio.to_thread(entry_path(self.settings, run_dir).unlink, True)
            await fetch(self.store, self.settings, pointer, run_dir, f"run {run_id!r}'s model")
            yield run_dir
