"""trainer: `model.train` — runs trainer.train in a child process of its own, one per job,
started before its job (Spare: the imports are done when the run comes).

Progress comes back over a multiprocessing queue and leaves as rate-limited events; the
runtime renews the lease while the child lives. Cancellation reaches the child through a
flag file it checks between steps (it saves a checkpoint and returns). A redelivered or
taken-over command starts a new child on the same run dir, and trainer.train resumes from
the last checkpoint instead of starting over.

The child leaves signals to the service (actors.runtime.pool.detach): on Ctrl-C or SIGTERM
the service tells it to save a checkpoint and return, and the command stays pending for the
next start, which resumes it; no retry is used and the run does not fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import os
import queue as queue_mod
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from multiprocessing.queues import Queue
from pathlib import Path

import msgspec

from actors.runtime.config import Settings
from actors.runtime.outcome import Cancelled, Outcome
from actors.runtime.pool import CancelFlag, WorkerDied, detach, signals_held
from actors.runtime.streams import Actor, Context, Interrupted
from protocol.commands import Base, ModelTrain, check_command
from protocol.events import TrainCompleted, TrainProgress, TrainStarted
from trainer.config import TrainConfig
from trainer.errors import UserError
from trainer.report import Progress, StartInfo, TrainResult

PROGRESS_EVERY_S = 1.0  # events; the notifier rate-limits further for chat clients
CANCEL_CHECK_S = 0.5  # the child sees a cancel within this plus one training step


# Messages from the training child, msgpack-encoded on the queue (msgpack keeps NaN/inf; the
# events clamp them, see _finite).
class ChildStarted(msgspec.Struct, tag="started"):
    info: StartInfo


class ChildProgress(msgspec.Struct, tag="progress"):
    progress: Progress


class ChildResult(msgspec.Struct, tag="result"):
    result: TrainResult  # without the loss curves: they are in metrics.jsonl


class ChildUserError(msgspec.Struct, tag="user_error"):
    message: str


class ChildError(msgspec.Struct, tag="error"):
    message: str
    traceback: str


ChildMessage = ChildStarted | ChildProgress | ChildResult | ChildUserError | ChildError
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(ChildMessage)


def encode_message(msg: ChildMessage) -> bytes:
    return _encoder.encode(msg)


def decode_message(data: bytes) -> ChildMessage:
    return _decoder.decode(data)


@dataclass(frozen=True)
class TrainJob:
    """Everything the child needs, as plain picklable values."""

    config: TrainConfig
    corpus_dir: str
    tokenizer_dir: str
    run_dir: str
    cancel_path: str
    stop_path: str
    cache_dir: str  # what was measured on this machine (recipes, peak FLOP/s, compiled code)


# A child ended by one of these was stopped, not broken: its command is resumed, not retried.
_STOP_SIGNALS = {-signal.SIGINT, -signal.SIGTERM, -signal.SIGHUP}


def train_child(jobs: Queue[TrainJob | None], out: Queue[bytes], inductor_cache: str) -> None:
    """Entry point of the child process: started ahead of its job (see Spare), it imports
    the training code, then waits for one job (None: none will come) and runs it."""
    # Signals are the service's; and a child whose trainer died (SIGKILL) must not go on
    # writing the run dir that the next trainer resumes from: it exits at once.
    detach()
    # torch.compile's cache inside the data dir: a later run of the same shape compiles fast.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", inductor_cache)

    from trainer.evaluate import import_model_code
    from trainer.train import train

    import_model_code()  # seconds that the job no longer waits for
    job = jobs.get()
    if job is None:
        return
    cancel, stop = CancelFlag(Path(job.cancel_path)), CancelFlag(Path(job.stop_path))

    def send(msg: ChildMessage) -> None:
        out.put(encode_message(msg))

    try:
        result = train(
            job.config,
            Path(job.corpus_dir),
            Path(job.tokenizer_dir),
            Path(job.run_dir),
            on_progress=lambda p: send(ChildProgress(p)),
            on_start=lambda info: send(ChildStarted(info)),
            should_stop=lambda: cancel.is_set() or stop.is_set(),
            cache_dir=Path(job.cache_dir),
        )
        send(ChildResult(msgspec.structs.replace(result, losses=[], val_history=[])))
    except UserError as e:
        send(ChildUserError(str(e)))
    except BaseException as e:
        send(ChildError(f"{type(e).__name__}: {e}", traceback.format_exc()))


def _get(q: Queue[bytes], timeout: float) -> ChildMessage | None:
    try:
        return decode_message(q.get(timeout=timeout))
    except queue_mod.Empty:
        return None


def _memory_mb() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20)
    except (ValueError, OSError):
        return 0


def _finite(x: float) -> float:
    """JSON has no NaN/Infinity (msgspec writes null, which a float field refuses): an
    exploding grad norm must not make its event unreadable."""
    return (
        sys.float_info.max
        if math.isnan(x)
        else max(-sys.float_info.max, min(sys.float_info.max, x))
    )


def _opt_finite(x: float | None) -> float | None:
    return None if x is None else _finite(x)


def train_config(cmd: ModelTrain, pretrained: str | None = None) -> TrainConfig:
    """The training configuration of a command: its settings by field name (TrainConfig
    extends them), with the folder to fine-tune resolved."""
    config = msgspec.convert(cmd, TrainConfig, from_attributes=True)
    config.pretrained = pretrained
    return config


@dataclass(frozen=True)
class Spare:
    """A training child started before its job: importing torch and transformers takes
    seconds, which a queued run would otherwise wait for before its first step."""

    process: multiprocessing.process.BaseProcess
    jobs: Queue[TrainJob | None]
    out: Queue[bytes]

    @classmethod
    def spawn(cls, inductor_cache: str) -> Spare:
        mp = multiprocessing.get_context("spawn")
        jobs: Queue[TrainJob | None] = mp.Queue()
        out: Queue[bytes] = mp.Queue()
        child = mp.Process(target=train_child, args=(jobs, out, inductor_cache), name="train")
        with signals_held():
            child.start()
        return cls(child, jobs, out)

    def discard(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5.0)
        with contextlib.suppress(ValueError):
            self.process.close()


class TrainerActor(Actor):
    name = "trainer"
    concurrency = 1

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._spare: Spare | None = None

    def _inductor_cache(self) -> str:
        return str(self.settings.data_dir / "cache" / "inductor")  # as trainer.train sets it

    async def start(self) -> None:
        self._spare = Spare.spawn(self._inductor_cache())  # its imports run in the child

    async def stop(self) -> None:
        if self._spare is not None:
            await asyncio.to_thread(self._spare.discard)
            self._spare = None

    def spare_pid(self) -> int | None:
        """The pid of the child waiting for the next run (None while there is none)."""
        return self._spare.process.pid if self._spare is not None else None

    def _take_spare(self) -> Spare:
        """The waiting child, or a new one when there is none (or it died)."""
        spare, self._spare = self._spare, None
        if spare is not None and spare.process.is_alive():
            return spare
        if spare is not None:
            spare.discard()
        return Spare.spawn(self._inductor_cache())

    async def handle(self, cmd: Base, ctx: Context) -> Outcome | None:
        match cmd:
            case ModelTrain():
                return await self.train(cmd, ctx)
            case _:
                return None

    def job(self, cmd: ModelTrain) -> TrainJob:
        check_command(cmd)  # before any work (protocol.commands)
        s = self.settings
        corpus_dir = s.corpus_dir(cmd.corpus_id)
        if not (corpus_dir / "corpus.json").is_file():
            raise UserError(f"corpus {cmd.corpus_id!r} has not been ingested")
        tokenizer_dir = s.tokenizer_dir(cmd.tokenizer_id)
        if not (tokenizer_dir / "mt_tokenizer.json").is_file():
            raise UserError(f"unknown tokenizer {cmd.tokenizer_id!r}")
        pretrained: str | None = None
        if cmd.pretrained_run_id:
            src = s.run_dir(cmd.pretrained_run_id)
            if not (src / "config.json").is_file() and not (src / "mt_model.json").is_file():
                raise UserError(f"pretrained run {cmd.pretrained_run_id!r} has no model")
            pretrained = str(src)
        elif cmd.pretrained_path:
            from trainer.corpus import resolve_corpus_path

            # Local HF model dirs are read from under the data dir only.
            pretrained = str(resolve_corpus_path(s.data_dir, cmd.pretrained_path))
        config = train_config(cmd, pretrained)
        flags = s.cancel_dir()
        return TrainJob(
            config=config,
            corpus_dir=str(corpus_dir),
            tokenizer_dir=str(tokenizer_dir),
            run_dir=str(s.run_dir(cmd.run_id)),
            cancel_path=str(flags / f"{cmd.run_id}.cancel"),
            stop_path=str(flags / f"{cmd.run_id}.{os.getpid()}.stop"),
            cache_dir=str(s.data_dir / "cache"),
        )

    async def train(self, cmd: ModelTrain, ctx: Context) -> Outcome:
        job = self.job(cmd)
        cancel, stop = CancelFlag(Path(job.cancel_path)), CancelFlag(Path(job.stop_path))
        stop.clear()
        if await ctx.cancel_requested():
            raise Cancelled("cancelled before training started")
        cancel.clear()
        spare = self._take_spare()
        child, out = spare.process, spare.out
        spare.jobs.put(job)
        ctx.log.info("training child started", pid=child.pid)
        on_stop = asyncio.create_task(_checkpoint_on_stop(ctx, stop))
        try:
            result = await self.follow(cmd, ctx, child, out, cancel)
        finally:
            on_stop.cancel()
            stopped = stop.is_set()  # by the service's stop, before _stop_child sets it
            await _stop_child(child, stop)
            stop.clear()
            if self._spare is None and not ctx.runtime.stopping:
                self._spare = Spare.spawn(self._inductor_cache())  # for the next run
        if result.status == "cancelled":
            if stopped and not cancel.is_set():
                raise Interrupted(f"stopped at step {result.steps}; checkpoint kept")
            raise Cancelled(f"cancelled at step {result.steps}; checkpoint kept")
        cancel.clear()
        return Outcome(events=[completed_event(result)])

    async def follow(
        self,
        cmd: ModelTrain,
        ctx: Context,
        child: multiprocessing.process.BaseProcess,
        out: Queue[bytes],
        cancel: CancelFlag,
    ) -> TrainResult:
        """Forward progress until the child reports its result; watch the cancel flag."""
        last_emit = last_cancel_check = 0.0
        pending: Progress | None = None
        saved = 0  # the newest checkpoint this delivery is known to have written
        while True:
            msg = await asyncio.to_thread(_get, out, CANCEL_CHECK_S)
            # The flag is polled on a clock, not per message: progress arrives every step.
            if not cancel.is_set() and time.monotonic() - last_cancel_check >= CANCEL_CHECK_S:
                last_cancel_check = time.monotonic()
                if await ctx.cancel_requested():
                    ctx.log.info("cancel requested; telling the training child")
                    cancel.set()
            if msg is None:
                if pending is not None and time.monotonic() - last_emit >= PROGRESS_EVERY_S:
                    await ctx.emit(progress_event(pending))
                    last_emit, pending = time.monotonic(), None
                if not child.is_alive():
                    msg = _get(out, 0.1)
                    if msg is None and child.exitcode in _STOP_SIGNALS:
                        raise Interrupted(f"training process stopped by signal {-child.exitcode}")
                    if msg is None:
                        raise WorkerDied(f"training process exited with code {child.exitcode}")
                else:
                    continue
            match msg:
                case ChildStarted(info=info):
                    saved = info.resumed_from_step
                    await ctx.emit(started_event(cmd, info))
                    if info.resumed_from_step:
                        ctx.log.info("resumed from checkpoint", step=info.resumed_from_step)
                case ChildProgress(progress=p):
                    # A new checkpoint is progress a kill cannot undo: the runtime stops
                    # counting earlier deliveries toward the poison limit.
                    if (newest := checkpoint_on_disk(p.step, cmd.checkpoint_every)) > saved:
                        saved = newest
                        await ctx.progressed()
                    if p.val_loss is not None or time.monotonic() - last_emit >= PROGRESS_EVERY_S:
                        await ctx.emit(progress_event(p))
                        last_emit, pending = time.monotonic(), None
                    else:
                        pending = p
                case ChildResult(result=result):
                    if pending is not None:
                        await ctx.emit(progress_event(pending))
                    return result
                case ChildUserError(message=message):
                    raise UserError(message)
                case ChildError(message=message, traceback=tb):
                    ctx.log.error("training failed", error=message, traceback=tb[-2000:])
                    raise RuntimeError(message)


def checkpoint_on_disk(step: int, every: int) -> int:
    """The newest checkpoint written once step `step` is reported: the child saves step N's
    checkpoint right after reporting step N, so step N+1's report means it is on disk."""
    return (step - 1) // every * every


def started_event(cmd: ModelTrain, info: StartInfo) -> TrainStarted:
    """What was asked for, and what the child resolved (device, precision, compile and why,
    threads, sizes, FLOPs)."""
    return TrainStarted(
        model_family=cmd.model_family,
        model_size=cmd.model_size,
        total_epochs=info.total_epochs,
        total_steps=info.total_steps,
        batch_size=cmd.batch_size,
        learning_rate=cmd.learning_rate,
        threads=info.threads or cmd.threads or (os.cpu_count() or 1),
        cpu_cores=os.cpu_count() or 1,
        memory_mb=_memory_mb(),
        device=info.device,
        precision=info.precision,
        parameters=info.parameters,
        resumed_from_step=info.resumed_from_step,
        compile=info.compile,
        recipe=info.recipe,
        flops_per_token=_finite(info.flops_per_token),
        peak_flops=_finite(info.peak_flops),
    )


def progress_event(p: Progress) -> TrainProgress:
    return TrainProgress(
        step=p.step,
        epoch=p.epoch,
        total_epochs=p.total_epochs,
        total_steps=p.total_steps,
        loss=_finite(p.loss),
        lr=_finite(p.lr),
        grad_norm=_finite(p.grad_norm),
        tokens_per_s=_finite(p.tokens_per_s),
        samples_per_s=_finite(p.samples_per_s),
        val_loss=_opt_finite(p.val_loss),
        val_ppl=_opt_finite(p.val_ppl),
        mfu=_opt_finite(p.mfu),
    )


def completed_event(result: TrainResult) -> TrainCompleted:
    return TrainCompleted(
        status=result.status,
        steps=result.steps,
        tokens=result.tokens,
        train_loss=_opt_finite(result.train_loss),
        val_loss=_opt_finite(result.val_loss),
        test_loss=_opt_finite(result.test_loss),
        test_ppl=_opt_finite(result.test_ppl),
        best_step=result.best_step or 0,
        early_stopped=result.status == "early_stopped",
        tokens_per_s=_finite(result.tokens_per_s),
        mfu=_opt_finite(result.mfu),
    )


async def _checkpoint_on_stop(ctx: Context, stop: CancelFlag) -> None:
    """The service is stopping: the child saves a checkpoint and returns at its next step, so
    the run resumes from there at the next start, and the stop is quick."""
    await ctx.until_stopping()
    ctx.log.info("stopping: the training child saves a checkpoint and returns")
    stop.set()


async def _stop_child(child: multiprocessing.process.BaseProcess, stop: CancelFlag) -> None:
    """Ask the child to checkpoint and exit (it checks between steps); kill it if it won't."""
    if child.is_alive():
        stop.set()
        await asyncio.to_thread(child.join, 30.0)
    if child.is_alive():
        child.kill()
        await asyncio.to_thread(child.join, 5.0)
    with contextlib.suppress(ValueError):
        child.close()
