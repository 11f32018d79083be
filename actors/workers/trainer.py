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

Location-free: the corpus, the tokenizer and a pretrained run come by their pointers in
Redis (actors.runtime.artifacts.fetch). Each checkpoint the child completes goes to the
store in the background (CheckpointUploader: one upload at a time, the newest wins, a store
outage is retried, never stalls the progress loop), with the run's metrics.jsonl and best/
beside it under `_run/`, and the run's `checkpoint` pointer moves forward only (a Lua
compare-and-set on its step). A trainer on another machine whose run dir has no newer
checkpoint brings the stored one back first, so the run resumes there bit for bit. At the
end the run folder (without checkpoints) is published and its `stored` pointer written in
the fenced commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import math
import multiprocessing
import os
import queue as queue_mod
import secrets
import shutil
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.queues import Queue
from pathlib import Path

import msgspec
import structlog
from redis.exceptions import RedisError

from actors.runtime import artifacts
from actors.runtime.config import Settings
from actors.runtime.connection import Redis
from actors.runtime.outcome import Cancelled, Outcome
from actors.runtime.pool import CancelFlag, WorkerDied, detach, exit_with_parent, signals_held
from actors.runtime.store import NotInStore, Pointer, Store, StoreError, make_store
from actors.runtime.streams import Actor, Context, Interrupted
from protocol.commands import Base, ModelTrain, ModelTrainJoin, check_command
from protocol.events import TrainCompleted, TrainProgress, TrainStarted
from protocol.keys import Keys
from trainer.checkpoint_names import LATEST, checkpoint_name, latest_name, name_step
from trainer.config import TrainConfig
from trainer.errors import UserError
from trainer.report import Progress, StartInfo, TrainResult
from trainer.tracking import TB_DIR, TRACKING_NAME

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
    run_id: str = ""  # names the process group of a run on several processes
    # A run on several machines: node 0's c10d rendezvous (host:port), whether this machine
    # is node 0 (it hosts the rendezvous), and where the other machines reach this one.
    endpoint: str = ""
    host: bool = True
    advertise_host: str = "127.0.0.1"
    rendezvous_timeout_s: int = 120  # Settings.rendezvous_timeout_s


# A child ended by one of these was stopped, not broken: its command is resumed, not retried.
_STOP_SIGNALS = {-signal.SIGINT, -signal.SIGTERM, -signal.SIGHUP}


def train_child(jobs: Queue[TrainJob | None], out: Queue[bytes]) -> None:
    """Entry point of the child process: started ahead of its job (see Spare), it imports
    the training code, then waits for one job (None: none will come) and runs it."""
    # Signals are the service's; and a child whose trainer died (SIGKILL) must not go on
    # writing the run dir that the next trainer resumes from: it exits at once.
    detach()
    # torch.compile's cache (inside the data dir) is set by trainer.train from job.cache_dir.
    from trainer.distributed import check_world, procs_per_node
    from trainer.evaluate import import_model_code

    import_model_code()  # seconds that the job no longer waits for
    importlib.import_module("trainer.train")  # likewise: train_and_report imports it
    job = jobs.get()
    if job is None:
        return

    def send(msg: ChildMessage) -> None:
        out.put(encode_message(msg))

    try:
        nproc = procs_per_node(job.config)
        check_world(job.config, nproc * job.config.nnodes)
    except UserError as e:
        send(ChildUserError(str(e)))
        return
    if nproc * job.config.nnodes > 1:
        launch_group(job, out, nproc)
        return
    try:
        train_and_report(job, send)
    except UserError as e:
        send(ChildUserError(str(e)))
    except BaseException as e:
        send(ChildError(f"{type(e).__name__}: {e}", traceback.format_exc()))


def train_and_report(job: TrainJob, send: Callable[[ChildMessage], None]) -> None:
    """Train the job's run here (one process, or one rank of a group), reporting its start,
    progress and result through send; between steps it stops when the run's cancel or stop
    flag is set."""
    from trainer.train import train

    cancel, stop = CancelFlag(Path(job.cancel_path)), CancelFlag(Path(job.stop_path))
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


def launch_group(job: TrainJob, out: Queue[bytes], nproc: int) -> None:
    """A run on several processes: this child becomes the elastic agent of nproc ranks
    (train_rank), which restarts the group from the latest checkpoint when one fails, up to
    max_restarts times; past them, the launcher's account of the failure is the error."""
    from torch.distributed import DistStoreError
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError

    from trainer.distributed import launch, start_method

    try:
        launch(
            train_rank,
            (job, out),
            nproc=nproc,
            run_id=job.run_id or "run",
            method=start_method(job.config),
            nnodes=job.config.nnodes,
            max_restarts=job.config.max_restarts,
            endpoint=job.endpoint,
            host=job.host,
            local_addr=job.advertise_host,
            rendezvous_timeout_s=job.rendezvous_timeout_s,
        )
    except ChildFailedError as e:
        out.put(encode_message(ChildError(f"training processes failed: {e}", str(e))))
    except (RendezvousError, DistStoreError) as e:
        # A node died (the group's restart waits for it at the rendezvous) or never came:
        # say so, rather than the launcher's bare timeout.
        message = (
            f"the run's {job.config.nnodes} nodes did not all meet at the rendezvous "
            f"{job.endpoint} within {job.rendezvous_timeout_s} s (a node died, or no trainer "
            f"took its join command): {type(e).__name__}: {e}"
        )
        out.put(encode_message(ChildError(message, traceback.format_exc())))
    except BaseException as e:
        out.put(encode_message(ChildError(f"{type(e).__name__}: {e}", traceback.format_exc())))


def train_rank(job: TrainJob, out: Queue[bytes]) -> None:
    """One process of a DDP run, started by the elastic agent (launch_group). Rank 0 alone
    reports, on the queue of the agent's own child; every rank reads the cancel and stop
    flags (trainer.train agrees on them between steps). A user error is reported, not
    raised: the agent would restart the group for it; any other error fails this rank, and
    the agent restarts the group."""
    exit_with_parent()  # the agent is gone: nobody would stop this rank
    from trainer.distributed import close_rank, init_rank

    world = init_rank(job.config, job.host)

    def send(msg: ChildMessage) -> None:
        if world.leader:
            out.put(encode_message(msg))

    try:
        train_and_report(job, send)
    except UserError as e:
        send(ChildUserError(str(e)))
    finally:
        close_rank()


def _get(q: Queue[bytes], timeout: float) -> ChildMessage | None:
    try:
        return decode_message(q.get(timeout=timeout))
    except queue_mod.Empty:
        return None


def free_port(host: str) -> int:
    """A port nobody listens on now (node 0's rendezvous takes it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


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
    def spawn(cls) -> Spare:
        mp = multiprocessing.get_context("spawn")
        jobs: Queue[TrainJob | None] = mp.Queue()
        out: Queue[bytes] = mp.Queue()
        child = mp.Process(target=train_child, args=(jobs, out), name="train")
        with signals_held():
            child.start()
        return cls(child, jobs, out)

    def discard(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5.0)
        with contextlib.suppress(ValueError):
            self.process.close()


# ---------------------------------------------------------------- checkpoints in the store

CHECKPOINTS = "checkpoints"
# In a stored checkpoint: the run's metrics.jsonl, best/, TensorBoard events (tb/) and
# tracking.json (its MLflow run) of that moment.
RUN_EXTRA = "_run"
RETRY_FIRST_S = 1.0  # backoff of a failed checkpoint upload (a store outage), doubling
RETRY_MAX_S = 30.0
FINAL_UPLOAD_S = 300.0  # the final checkpoint: past this outage the command is retried
_MISSING = {
    "corpus": "corpus {name!r} has not been ingested",
    "tokenizer": "unknown tokenizer {name!r}",
    "pretrained run": "pretrained run {name!r} has no model",
}
# Not in the stored run folder: the checkpoints are stored one by one, and logs.jsonl grows
# while the folder is uploaded (the run's log lives in Redis).
RUN_EXCLUDE = (CHECKPOINTS, "logs.jsonl")

# Move the run's `checkpoint` pointer forward only: a stale trainer (fenced out, or slower)
# must never point the run back at an older checkpoint.
_RECORD_CHECKPOINT = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'checkpoint_step') or '-1') or -1
if cur >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'checkpoint', ARGV[2], 'checkpoint_step', ARGV[1])
return 1
"""


def local_checkpoint_step(ckpt_dir: Path) -> int:
    """The step of the checkpoint a run here would resume from (0: none)."""
    name = latest_name(ckpt_dir)
    return (name_step(name) or 0) if name is not None else 0


def checkpoint_key(run_id: str, step: int) -> str:
    return f"runs/{run_id}/{CHECKPOINTS}/{checkpoint_name(step)}"


def stage_checkpoint(run_dir: Path, step: int) -> Path | None:
    """A folder to upload for checkpoint `step`: its files, and under _run/ the run's
    metrics.jsonl and best/ (a run resumed elsewhere needs its curve and its best model so
    far), its TensorBoard events and tracking.json. None when the child pruned the
    checkpoint already (a newer one is on disk)."""
    ckpt_dir = run_dir / CHECKPOINTS
    dest = ckpt_dir / f".upload-{checkpoint_name(step)}-{secrets.token_hex(4)}"
    try:
        # Hard links: the child replaces whole checkpoint folders and never rewrites their
        # files, so the links keep this checkpoint's bytes even once it is pruned.
        shutil.copytree(ckpt_dir / checkpoint_name(step), dest, copy_function=os.link)
    except (FileNotFoundError, shutil.Error):
        shutil.rmtree(dest, ignore_errors=True)
        return None
    extra = dest / RUN_EXTRA
    extra.mkdir()
    metrics = run_dir / "metrics.jsonl"
    with contextlib.suppress(FileNotFoundError):
        # A copy: the child appends to it. A line cut short is dropped on resume.
        shutil.copyfile(metrics, extra / "metrics.jsonl")
    # Copies too (the writer appends): a record cut short ends TensorBoard's reading of
    # that file, and the resumed writer purges what came after the checkpoint anyway.
    with contextlib.suppress(FileNotFoundError, shutil.Error):
        shutil.copytree(run_dir / TB_DIR, extra / TB_DIR)
    with contextlib.suppress(FileNotFoundError):
        shutil.copyfile(run_dir / TRACKING_NAME, extra / TRACKING_NAME)
    best = run_dir / "best"
    for _ in range(20):  # best/ is swapped for a newer one now and then (rename, rename)
        try:
            if best.is_dir():
                shutil.copytree(best, extra / "best", copy_function=os.link)
            break
        except (FileNotFoundError, shutil.Error):
            shutil.rmtree(extra / "best", ignore_errors=True)
            time.sleep(0.05)
    return dest


def clear_staging(ckpt_dir: Path) -> None:
    """Remove what uploads cut short by a kill left (hard links: no bytes of their own)."""
    for p in ckpt_dir.glob(".upload-*") if ckpt_dir.is_dir() else []:
        shutil.rmtree(p, ignore_errors=True)


def place_checkpoint(run_dir: Path, name: str) -> None:
    """A fetched checkpoint into place: _run/ back into the run dir, `latest` at it."""
    ckpt_dir = run_dir / CHECKPOINTS
    extra = ckpt_dir / name / RUN_EXTRA
    if (extra / "metrics.jsonl").is_file():
        os.replace(extra / "metrics.jsonl", run_dir / "metrics.jsonl")
    for folder in ("best", TB_DIR):
        if (extra / folder).is_dir():
            shutil.rmtree(run_dir / folder, ignore_errors=True)
            os.replace(extra / folder, run_dir / folder)
    if (extra / TRACKING_NAME).is_file():
        os.replace(extra / TRACKING_NAME, run_dir / TRACKING_NAME)
    shutil.rmtree(extra, ignore_errors=True)
    tmp = ckpt_dir / f".latest.tmp-{secrets.token_hex(4)}"
    tmp.write_text(name + "\n")
    os.replace(tmp, ckpt_dir / LATEST)


class CheckpointUploader:
    """Stores the run's checkpoints as the child completes them, in a background task: one
    upload at a time, the newest wins when several wait, a store outage is retried with
    backoff (logged, never failing the run), and nothing here waits on the progress loop
    but `offer`, which returns at once."""

    def __init__(
        self,
        store: Store,
        redis: Redis,
        keys: Keys,
        run_id: str,
        run_dir: Path,
        keep: int,
        logger: structlog.stdlib.BoundLogger,
        recorded: int,
    ) -> None:
        self.store, self.redis, self.keys = store, redis, keys
        self.run_id, self.run_dir, self.keep, self.log = run_id, run_dir, keep, logger
        self.uploaded = recorded  # the newest step stored (by us, or recorded before)
        self.failures = 0  # uploads that failed and were retried
        self.stored = 0  # uploads done (the newest wins: some checkpoints are skipped)
        self._wanted = self._settled = recorded
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._record = redis.register_script(_RECORD_CHECKPOINT)

    def offer(self, step: int) -> None:
        """Checkpoint `step` is complete on disk: store it when the uploader is free."""
        if step <= self._wanted:
            return
        self._wanted = step
        self._wake.set()
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=f"checkpoints-{self.run_id}")

    async def _loop(self) -> None:
        delay = RETRY_FIRST_S
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._wanted > self._settled:
                step = self._wanted
                try:
                    await self._upload(step)
                    delay = RETRY_FIRST_S
                except (StoreError, RedisError) as e:
                    self.failures += 1
                    self.log.warning(
                        "checkpoint upload failed; retrying",
                        step=step,
                        error=f"{type(e).__name__}: {e}",
                        retry_in_s=delay,
                    )
                    await asyncio.sleep(delay)
                    delay = min(RETRY_MAX_S, delay * 2)
                except Exception as e:  # a user error (the store's configuration): no retry
                    self.log.error(
                        "checkpoint upload failed", step=step, error=f"{type(e).__name__}: {e}"
                    )
                    self._settled = step

    async def _upload(self, step: int) -> None:
        started = time.monotonic()
        staged = await asyncio.to_thread(stage_checkpoint, self.run_dir, step)
        if staged is None:
            self.log.info("checkpoint pruned before its upload; a newer one follows", step=step)
            self._settled = max(self._settled, step)
            return
        try:
            pointer = await self.store.put_folder(staged, checkpoint_key(self.run_id, step))
        finally:
            await asyncio.to_thread(shutil.rmtree, staged, True)
        moved = await self._record(
            keys=[self.keys.run(self.run_id)], args=[step, msgspec.json.encode(pointer)]
        )
        self.uploaded = max(self.uploaded, step)
        self._settled = max(self._settled, step)
        self.stored += 1
        self.log.info(
            "checkpoint stored",
            step=step,
            key=pointer.key,
            size=pointer.size,
            seconds=round(time.monotonic() - started, 3),
            recorded=bool(moved),
        )
        if self.store.can_list:
            try:
                await self._prune()
            except StoreError as e:
                self.log.warning("stored checkpoints not pruned", error=str(e))

    async def _prune(self) -> None:
        """Delete stored checkpoints older than the newest `keep` complete ones (and the
        leftovers of uploads cut short), never the one the run's pointer names."""
        prefix = f"runs/{self.run_id}/{CHECKPOINTS}"
        found = await self.store.list(prefix)
        names = {k[len(prefix) + 1 :].split("/")[0] for k in found}
        complete = sorted(
            step for k in found if (step := name_step(k[len(prefix) + 1 :])) is not None
        )
        if len(complete) <= self.keep:
            return
        oldest_kept = complete[-self.keep]
        raw = await self.redis.hget(self.keys.run(self.run_id), "checkpoint_step")
        recorded = int(raw) if raw else -1
        for name in sorted(names):
            step = name_step(name)
            if step is not None and step < oldest_kept and step != recorded:
                await self.store.delete(f"{prefix}/{name}")

    async def close(self) -> None:
        """Stop the background task; an upload in flight is abandoned (its partial objects
        are pruned later)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def finish(self, step: int, timeout_s: float = FINAL_UPLOAD_S) -> None:
        """The run's last checkpoint, stored before the command's outcome; an outage longer
        than timeout_s is a StoreError (the runtime retries the command)."""
        await self.close()
        deadline = time.monotonic() + timeout_s
        delay = RETRY_FIRST_S
        while step > self.uploaded:
            try:
                await self._upload(step)
                if step > self.uploaded:  # pruned: only if the child kept no such step
                    return
            except (StoreError, RedisError) as e:
                self.failures += 1
                if time.monotonic() + delay > deadline:
                    raise StoreError(f"the final checkpoint could not be stored: {e}") from e
                self.log.warning(
                    "final checkpoint upload failed; retrying", step=step, error=str(e)
                )
                await asyncio.sleep(delay)
                delay = min(RETRY_MAX_S, delay * 2)


async def restore_checkpoint(store: Store, pointer: Pointer, run_dir: Path) -> int:
    """Bring a stored checkpoint into the run dir as its latest; returns its step."""
    name = pointer.key.rsplit("/", 1)[-1]
    step = name_step(name)
    if step is None:
        raise UserError(f"the run's checkpoint pointer names {pointer.key}, not a checkpoint")
    await store.get(pointer, run_dir / CHECKPOINTS / name)
    await asyncio.to_thread(place_checkpoint, run_dir, name)
    return step


class TrainerActor(Actor):
    name = "trainer"
    concurrency = 1

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._spare: Spare | None = None
        self._store: Store | None = None

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = make_store(self.settings)
        return self._store

    async def start(self) -> None:
        self._store = make_store(self.settings)
        self._spare = Spare.spawn()  # its imports run in the child

    async def stop(self) -> None:
        if self._spare is not None:
            await asyncio.to_thread(self._spare.discard)
            self._spare = None
        if self._store is not None:
            await self._store.aclose()
            self._store = None

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
        return Spare.spawn()

    async def handle(self, cmd: Base, ctx: Context) -> Outcome | None:
        match cmd:
            case ModelTrain():
                return await self.train(cmd, ctx)
            case ModelTrainJoin():
                return await self.join(cmd, ctx)
            case _:
                return None

    def job(self, cmd: ModelTrain) -> TrainJob:
        check_command(cmd)
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
            run_id=cmd.run_id,
            advertise_host=s.advertise_host,
            rendezvous_timeout_s=s.rendezvous_timeout_s,
        )

    async def fetch_inputs(self, cmd: ModelTrain, ctx: Context) -> None:
        """The corpus, the tokenizer and a pretrained run, by their pointers in Redis (a
        StoreError: the runtime retries the command; nowhere at all: a UserError)."""
        s, redis, keys = self.settings, ctx.redis, ctx.keys
        inputs = [
            (keys.corpus(cmd.corpus_id), s.corpus_dir(cmd.corpus_id), "corpus", cmd.corpus_id),
            (
                keys.tokenizer(cmd.tokenizer_id),
                s.tokenizer_dir(cmd.tokenizer_id),
                "tokenizer",
                cmd.tokenizer_id,
            ),
        ]
        if cmd.pretrained_run_id:
            run = cmd.pretrained_run_id
            inputs.append((keys.run(run), s.run_dir(run), "pretrained run", run))
        for redis_key, local, what, name in inputs:
            pointer = await artifacts.read_pointer(redis, redis_key, "stored")
            if pointer is None and not await asyncio.to_thread(local.is_dir):
                raise UserError(_MISSING[what].format(name=name))
            await artifacts.fetch(self.store, s, pointer, local, f"{what} {name!r}")

    async def resume_point(self, cmd: ModelTrain, ctx: Context) -> int:
        """Bring the run's stored checkpoint here when it is newer than any in the local run
        dir (the run started on another machine); returns the step recorded in Redis."""
        run_dir = self.settings.run_dir(cmd.run_id)
        await asyncio.to_thread(clear_staging, run_dir / CHECKPOINTS)
        pointer = await artifacts.read_pointer(ctx.redis, ctx.keys.run(cmd.run_id), "checkpoint")
        if pointer is None:
            return 0
        stored = name_step(pointer.key.rsplit("/", 1)[-1]) or 0
        local = await asyncio.to_thread(local_checkpoint_step, run_dir / CHECKPOINTS)
        if stored > local:
            started = time.monotonic()
            try:
                await restore_checkpoint(self.store, pointer, run_dir)
            except NotInStore as e:  # deleted from the store: the run goes on from here
                ctx.log.warning("the stored checkpoint is gone", key=pointer.key, error=str(e))
                return 0
            ctx.log.info(
                "fetched the stored checkpoint",
                step=stored,
                local_step=local,
                size=pointer.size,
                seconds=round(time.monotonic() - started, 3),
            )
        return stored

    async def train(self, cmd: ModelTrain, ctx: Context) -> Outcome:
        check_command(cmd)  # before any work (protocol.commands)
        s = self.settings
        held = [s.corpus_dir(cmd.corpus_id), s.tokenizer_dir(cmd.tokenizer_id)]
        held.append(s.run_dir(cmd.run_id))
        if cmd.pretrained_run_id:
            held.append(s.run_dir(cmd.pretrained_run_id))
        async with artifacts.hold(s, *held):
            await self.fetch_inputs(cmd, ctx)
            recorded = await self.resume_point(cmd, ctx)
            return await self.run_training(cmd, ctx, recorded)

    async def open_rendezvous(self, cmd: ModelTrain, ctx: Context) -> str:
        """A run on several machines: this trainer is node 0. The rendezvous goes on a free
        port of the advertised host (node 0's agent hosts it), and one join command per
        other node goes on the trainer stream for the other trainers to take."""
        host = self.settings.advertise_host
        port = await asyncio.to_thread(free_port, host)
        endpoint = f"{host}:{port}"
        single = msgspec.structs.replace(cmd, rest=[])
        joins: list[Base] = [
            ModelTrainJoin(
                # The port names this opening: a retry of the command (same attempt) opens
                # another rendezvous, whose joins must not be dropped as duplicates.
                command_id=f"{cmd.command_id}.join-{port}-{node}",
                user_id=cmd.user_id,
                requested_at=time.time(),
                run_id=cmd.run_id,
                train=single,
                endpoint=endpoint,
            )
            for node in range(1, cmd.nnodes)
        ]
        await ctx.emit(send=joins)
        ctx.log.info("rendezvous opened; join commands queued", endpoint=endpoint, nodes=cmd.nnodes)
        return endpoint

    async def join(self, cmd: ModelTrainJoin, ctx: Context) -> Outcome:
        """One more machine of a run on several: fetch the run's inputs here, start this
        machine's processes against node 0's rendezvous and wait for them. Node 0 reports
        the run, so whatever happens here is logged, not made the run's outcome: a node
        that cannot join or dies makes node 0's group restart or fail with its reason."""
        train, s = cmd.train, self.settings
        held = [s.corpus_dir(train.corpus_id), s.tokenizer_dir(train.tokenizer_id)]
        try:
            async with artifacts.hold(s, *held):
                await self.fetch_inputs(train, ctx)
                job = dataclasses.replace(self.job(train), endpoint=cmd.endpoint, host=False)
                await self._run_joined(ctx, job)
        except Exception as e:
            ctx.log.warning("could not train as a joined node", error=f"{type(e).__name__}: {e}")
        return Outcome()

    async def _run_joined(self, ctx: Context, job: TrainJob) -> None:
        spare = self._take_spare()
        child = spare.process
        spare.jobs.put(job)
        ctx.log.info("training child started", pid=child.pid, endpoint=job.endpoint, node="joined")
        try:
            while child.is_alive() and not ctx.runtime.stopping:
                msg = await asyncio.to_thread(_get, spare.out, CANCEL_CHECK_S)
                if isinstance(msg, ChildError | ChildUserError):
                    ctx.log.warning("this node's training processes failed", error=msg.message)
            ctx.log.info("this node's training processes ended", exitcode=child.exitcode)
        finally:
            if child.is_alive():  # the service stops: its ranks go with it (node 0 restarts)
                child.kill()
            await asyncio.to_thread(child.join, 5.0)
            with contextlib.suppress(ValueError):
                child.close()
            if self._spare is None and not ctx.runtime.stopping:
                self._spare = Spare.spawn()

    async def run_training(self, cmd: ModelTrain, ctx: Context, recorded: int) -> Outcome:
        job = self.job(cmd)
        if cmd.nnodes > 1:
            job = dataclasses.replace(job, endpoint=await self.open_rendezvous(cmd, ctx))
        uploader = CheckpointUploader(
            self.store,
            ctx.redis,
            ctx.keys,
            cmd.run_id,
            Path(job.run_dir),
            job.config.keep_checkpoints,
            ctx.log,
            recorded,
        )
        try:
            return await self._run_training(cmd, ctx, job, uploader)
        finally:
            await uploader.close()

    async def _run_training(
        self, cmd: ModelTrain, ctx: Context, job: TrainJob, uploader: CheckpointUploader
    ) -> Outcome:
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
            result = await self.follow(cmd, ctx, child, out, cancel, uploader)
        finally:
            on_stop.cancel()
            stopped = stop.is_set()  # by the service's stop, before _stop_child sets it
            await _stop_child(child, stop)
            stop.clear()
            if self._spare is None and not ctx.runtime.stopping:
                self._spare = Spare.spawn()  # for the next run
        if result.status == "cancelled" and stopped and not cancel.is_set():
            raise Interrupted(f"stopped at step {result.steps}; checkpoint kept")
        await uploader.finish(result.steps)  # the last checkpoint, before the outcome
        if result.status == "cancelled":
            raise Cancelled(f"cancelled at step {result.steps}; checkpoint kept")
        cancel.clear()
        stored = await artifacts.publish(
            self.store, self.settings, Path(job.run_dir), f"runs/{cmd.run_id}/model", RUN_EXCLUDE
        )
        ctx.log.info(
            "run stored",
            key=stored.key,
            size=stored.size,
            checkpoints_stored=uploader.stored,
            checkpoint_retries=uploader.failures,
        )
        return Outcome(
            events=[completed_event(result)],
            writes=[artifacts.pointer_write(ctx.keys.run(cmd.run_id), "stored", stored)],
        )

    async def follow(
        self,
        cmd: ModelTrain,
        ctx: Context,
        child: multiprocessing.process.BaseProcess,
        out: Queue[bytes],
        cancel: CancelFlag,
        uploader: CheckpointUploader | None = None,
    ) -> TrainResult:
        """Forward progress until the child reports its result; watch the cancel flag.

        A run on several processes whose group the elastic agent restarted starts again from
        its checkpoint: its second start and the steps it redoes are logged, not emitted
        again (the run's events go on from where they were)."""
        last_emit = last_cancel_check = 0.0
        pending: Progress | None = None
        saved = 0  # the newest checkpoint this delivery is known to have written
        started = False
        reported = 0  # the newest step reported
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
                case ChildStarted(info=info) if started:
                    ctx.log.warning(
                        "training processes restarted from the checkpoint",
                        step=info.resumed_from_step,
                        reported_step=reported,
                    )
                case ChildStarted(info=info):
                    started = True
                    saved = info.resumed_from_step
                    if uploader is not None:  # a local checkpoint the store may lack
                        uploader.offer(saved)
                    await ctx.emit(started_event(cmd, info))
                    if info.resumed_from_step:
                        ctx.log.info("resumed from checkpoint", step=info.resumed_from_step)
                case ChildProgress(progress=p) if p.step <= reported:
                    pass  # redone after a restart of the group: reported already
                case ChildProgress(progress=p):
                    reported = p.step
                    # A new checkpoint is progress a kill cannot undo: the runtime stops
                    # counting earlier deliveries toward the poison limit.
                    if (newest := checkpoint_on_disk(p.step, cmd.checkpoint_every)) > saved:
                        saved = newest
                        if uploader is not None:
                            uploader.offer(newest)
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
        world_size=info.world_size,
        backend=info.backend,
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
        samples=p.samples,
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
