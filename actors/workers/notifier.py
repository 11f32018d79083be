"""notifier: fans the events stream out to the Discord bot's pub/sub channel and, with a bot
token, to one direct message per run that is edited in place as the run advances.

It reads `<prefix>:events` through its own consumer group "notifier" with a stable consumer
name: its own pending entries first after a restart (id 0), then new ones; each batch is
published, then acknowledged (at-least-once: a crash in between publishes a batch twice).
The group is created at "$" the first time, so a notifier that starts on an old stream does
not replay history to the bot; if Redis loses the group, it is recreated at the last entry
handled (or "$" when none was), so nothing after that point is skipped.

Messages on `Settings.events_channel` use the bot's existing shapes (the Structs below; ints
are ints). No NaN or Infinity ever leaves: a required float that is not finite is clamped
(NaN and +inf to the largest finite double, -inf to its negative: "diverged"), an optional
one (val_loss, val_ppl) is left out.

Progress is a percentage of the whole run: each step of the chain owns a share — ingest
0-5, tokenizer 5-15, trainer 15-90 (by step/total_steps), evaluator 90-97, uploader 97-100.
It is rate-limited per run by event time: at most one progress pair (job.progress +
metrics.progress) per `progress_interval_s`, plus every event that carries a validation.

What the bot hears: job.started on the first step.started of a run (queue = that step's
actor); job.progress on later step.started and on each step's result (corpus, tokenizer,
evaluation, artifact); metrics.config on train.started; the progress pair on train.progress;
metrics.completed on train.completed when it has a test loss; job.completed on
run.completed (result_id = the artifact's file id, else its uri, else the run id); job.failed
on run.failed, and on run.cancelled as a "user" error ("cancelled: ...").
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal

import aiohttp
import msgspec
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from actors.runtime import log
from actors.runtime.config import Settings
from actors.runtime.streams import GroupReader, Redis, connect, keep_alive
from protocol.codec import FIELD, decode_event
from protocol.events import (
    TERMINAL_STATUSES,
    AnyEvent,
    ArtifactPointer,
    ArtifactStored,
    CancelRequested,
    CommandDuplicate,
    CorpusReady,
    ErrorKind,
    EvalCompleted,
    ResultReady,
    RunCancelled,
    RunCompleted,
    RunFailed,
    RunQueued,
    StepCompleted,
    StepStarted,
    TokenizerReady,
    TrainCompleted,
    TrainProgress,
    TrainStarted,
)
from protocol.keys import Keys
from protocol.state import RunState, apply

GROUP = "notifier"
PROGRESS_SHARE: dict[str, tuple[int, int]] = {
    "ingest": (0, 5),
    "tokenizer": (5, 15),
    "trainer": (15, 90),
    "evaluator": (90, 97),
    "uploader": (97, 100),
}
MAX_RUNS = 10_000  # runs remembered at once; the oldest are forgotten first
_BIG = sys.float_info.max


# ------------------------------------------------------------------ the bot's contract
class _Job(msgspec.Struct, kw_only=True, tag_field="type"):
    domain: Literal["trainer"] = "trainer"
    job_id: str
    user_id: int


class JobStarted(_Job, kw_only=True, tag="trainer.job.started.v1"):
    queue: str  # the actor name of the step that started


class JobProgress(_Job, kw_only=True, tag="trainer.job.progress.v1"):
    progress: int  # 0-100 over the whole chain
    message: str


class JobCompleted(_Job, kw_only=True, tag="trainer.job.completed.v1"):
    result_id: str  # the artifact's Data Bank file id or local uri (the run id without one)
    result_bytes: int


class JobFailed(_Job, kw_only=True, tag="trainer.job.failed.v1"):
    error_kind: ErrorKind
    message: str


class _Metrics(msgspec.Struct, kw_only=True, tag_field="type"):
    job_id: str
    user_id: int


class MetricsConfig(_Metrics, kw_only=True, tag="trainer.metrics.config.v1"):
    model_family: str
    model_size: str
    total_epochs: int
    queue: str
    cpu_cores: int
    memory_mb: int
    optimal_threads: int
    optimal_workers: int  # one training process per job
    batch_size: int
    learning_rate: float


class MetricsProgress(
    _Metrics, kw_only=True, omit_defaults=True, tag="trainer.metrics.progress.v1"
):
    epoch: int
    total_epochs: int
    step: int
    train_loss: float
    train_ppl: float
    grad_norm: float
    samples_per_sec: float
    val_loss: float | None = None  # only when this step ran a validation
    val_ppl: float | None = None


class MetricsCompleted(_Metrics, kw_only=True, tag="trainer.metrics.completed.v1"):
    test_loss: float
    test_ppl: float
    artifact_path: str  # the run dir


BotMessage = (
    JobStarted
    | JobProgress
    | JobCompleted
    | JobFailed
    | MetricsConfig
    | MetricsProgress
    | MetricsCompleted
)


def clamp(x: float) -> float:
    """A required float made finite: NaN and +inf → the largest double, -inf → its negative."""
    if math.isnan(x) or x == math.inf:
        return _BIG
    return -_BIG if x == -math.inf else float(x)


def finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def ppl(loss: float) -> float:
    return clamp(math.exp(min(loss, 709.0))) if not math.isnan(loss) else _BIG


def percent(step: str, fraction: float) -> int:
    """The run's progress (0-100) when `step` is `fraction` done."""
    lo, hi = PROGRESS_SHARE.get(step, (0, 100))
    f = min(1.0, max(0.0, fraction)) if math.isfinite(fraction) else 0.0
    return int(lo + (hi - lo) * f)


# ------------------------------------------------------------------ per-run view
_pointer = msgspec.json.Decoder(ArtifactPointer)


def pointer_of(state: RunState) -> ArtifactPointer | None:
    """The run's artifact pointer (RunState.artifact holds it as JSON)."""
    if not state.artifact:
        return None
    try:
        return _pointer.decode(state.artifact)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


@dataclass
class RunView:
    """One run as the bot sees it: the run's shared view (protocol.state, reduced by the one
    rule) and what only the bot's contract adds: the percent done, the text of its progress
    messages and the rate limit of its progress pairs."""

    state: RunState
    progress: int = 0
    message: str = "queued"
    started: bool = False
    last_progress_at: float | None = None

    @property
    def run_id(self) -> str:
        return self.state.run_id

    @property
    def user_id(self) -> int:
        return self.state.user_id

    @property
    def final(self) -> bool:
        return self.state.status in TERMINAL_STATUSES


@dataclass(frozen=True)
class NotifierConfig:
    progress_interval_s: float = 5.0  # pub/sub progress pairs per run
    discord_interval_s: float = 5.0  # Discord message edits per run
    block_ms: int = 1000
    batch: int = 200
    grace_s: float = 10.0  # on stop: time for the last Discord edits
    heartbeat_s: float = 10.0
    discord_tries: int = 5


class Translator:
    """Protocol events → the bot's messages, with the per-run state and rate limit."""

    def __init__(self, settings: Settings, config: NotifierConfig) -> None:
        self.settings = settings
        self.config = config
        self.views: OrderedDict[str, RunView] = OrderedDict()
        # Runs that ended: a stray late event (a redelivered duplicate) must not revive them.
        self.finished: OrderedDict[str, None] = OrderedDict()

    def relevant(self, event: AnyEvent) -> bool:
        if not event.run_id or isinstance(event, CommandDuplicate | ResultReady | StepCompleted):
            return False
        if isinstance(event, EvalCompleted) and event.request_id:
            return False  # an evaluate request, not a step of the run
        if isinstance(event, RunQueued):
            self.finished.pop(event.run_id, None)  # the same run id submitted again
        return event.run_id not in self.finished

    def finish(self, run_id: str) -> None:
        self.views.pop(run_id, None)
        self.finished[run_id] = None
        while len(self.finished) > MAX_RUNS:
            self.finished.popitem(last=False)

    def view(self, run_id: str) -> RunView:
        view = self.views.get(run_id)
        if view is None:
            view = self.views[run_id] = RunView(RunState(run_id=run_id))
            while len(self.views) > MAX_RUNS:
                self.views.popitem(last=False)
        else:
            self.views.move_to_end(run_id)
        return view

    def messages(self, event: AnyEvent, view: RunView) -> list[BotMessage]:
        """Update the view with the event and say what the bot should hear of it."""
        view.state = apply(view.state, event)
        state = view.state
        rid, uid = view.run_id, view.user_id
        match event:
            case RunQueued():
                view.message = "queued"
                return []
            case StepStarted(step=step):
                view.progress = max(view.progress, percent(step, 0.0))
                suffix = f" (attempt {event.attempt})" if event.attempt > 1 else ""
                view.message = f"{step} started{suffix}"
                if not view.started:
                    view.started = True
                    return [JobStarted(job_id=rid, user_id=uid, queue=step)]
                return [self._progress(view)]
            case CorpusReady():
                view.message = f"corpus ready: {sum(event.chars.values()):,} characters"
                return [self._progress(view, done="ingest")]
            case TokenizerReady():
                view.message = f"tokenizer ready ({event.tokenizer_kind})"
                return [self._progress(view, done="tokenizer")]
            case TrainStarted():
                view.message = f"training {event.model_family} {event.model_size}"
                return [
                    MetricsConfig(
                        job_id=rid,
                        user_id=uid,
                        model_family=event.model_family,
                        model_size=event.model_size,
                        total_epochs=event.total_epochs,
                        queue="trainer",
                        cpu_cores=event.cpu_cores,
                        memory_mb=event.memory_mb,
                        optimal_threads=event.threads,
                        optimal_workers=1,
                        batch_size=event.batch_size,
                        learning_rate=clamp(event.learning_rate),
                    )
                ]
            case TrainProgress():
                return self._train_progress(event, view)
            case TrainCompleted():
                view.message = f"training {event.status} after {event.steps} steps"
                if event.test_loss is None:
                    return []  # the bot's completed metrics need a test loss
                test_ppl = event.test_ppl if event.test_ppl is not None else ppl(event.test_loss)
                return [
                    MetricsCompleted(
                        job_id=rid,
                        user_id=uid,
                        test_loss=clamp(event.test_loss),
                        test_ppl=clamp(test_ppl),
                        artifact_path=str(self.settings.run_dir(view.run_id)),
                    )
                ]
            case EvalCompleted():
                loss = "" if event.loss is None else f": loss {event.loss:.4f}"
                view.message = f"evaluated on {event.split or 'test'}{loss}"
                return [self._progress(view, done="evaluator")]
            case ArtifactStored():
                view.message = f"artifact stored ({event.storage}, {event.size:,} bytes)"
                return [self._progress(view, done="uploader")]
            case RunCompleted():
                view.progress, view.message = 100, state.message
                art = pointer_of(state)
                result = (art.file_id or art.uri if art else "") or view.run_id
                size = art.size if art else 0
                return [JobCompleted(job_id=rid, user_id=uid, result_id=result, result_bytes=size)]
            case RunFailed():
                view.message = state.message
                return [
                    JobFailed(
                        job_id=rid, user_id=uid, error_kind=event.error_kind, message=view.message
                    )
                ]
            case RunCancelled():
                # The bot has no "cancelled": a cancellation is the user's own doing.
                view.message = state.message
                message = f"cancelled: {view.message}"
                return [JobFailed(job_id=rid, user_id=uid, error_kind="user", message=message)]
            case CancelRequested():
                view.message = "cancel requested"
                return []
            case _:
                return []

    def _progress(self, view: RunView, done: str | None = None) -> JobProgress:
        if done is not None:
            view.progress = max(view.progress, percent(done, 1.0))
        return JobProgress(
            job_id=view.run_id,
            user_id=view.user_id,
            progress=view.progress,
            message=view.message,
        )

    def _train_progress(self, event: TrainProgress, view: RunView) -> list[BotMessage]:
        state = view.state
        if state.total_steps:
            fraction = event.step / state.total_steps
        elif state.total_epochs:
            fraction = (event.epoch - 1) / state.total_epochs
        else:
            fraction = 0.0
        view.progress = max(view.progress, percent("trainer", fraction))
        total = f"/{state.total_steps}" if state.total_steps else ""
        view.message = f"epoch {event.epoch}/{state.total_epochs} step {event.step}{total}"
        view.message += f" loss {event.loss:.4f}"
        if event.val_loss is not None:
            view.message += f" val {event.val_loss:.4f}"
        now = event.at or time.time()
        validated = event.val_loss is not None
        last = view.last_progress_at
        if not validated and last is not None and now - last < self.config.progress_interval_s:
            return []
        view.last_progress_at = now
        val_loss = finite_or_none(event.val_loss)
        val_ppl = finite_or_none(event.val_ppl)
        if val_ppl is None and val_loss is not None:
            val_ppl = finite_or_none(ppl(val_loss))
        return [
            self._progress(view),
            MetricsProgress(
                job_id=view.run_id,
                user_id=view.user_id,
                epoch=event.epoch,
                total_epochs=state.total_epochs,
                step=event.step,
                train_loss=clamp(event.loss),
                train_ppl=ppl(event.loss),
                grad_norm=clamp(event.grad_norm),
                samples_per_sec=clamp(event.samples_per_s),
                val_loss=val_loss,
                val_ppl=val_ppl,
            ),
        ]


# ------------------------------------------------------------------ Discord
class DiscordError(RuntimeError):
    """Discord refused a request (or kept failing); the card of that run stops updating."""


_COLORS = {
    "queued": 0x95A5A6,
    "running": 0x3498DB,
    "completed": 0x2ECC71,
    "failed": 0xE74C3C,
    "cancelled": 0x7F8C8D,
}


def embed(view: RunView) -> dict[str, object]:
    """One embed per run: the run's card in the user's direct messages."""
    state = view.state
    fields = [
        ("Status", state.status),
        ("Step", state.step or "-"),
        ("Progress", f"{view.progress}%"),
    ]
    if state.total_epochs:
        fields.append(("Epoch", f"{state.epoch}/{state.total_epochs}"))
    if state.train_step:
        total = f"/{state.total_steps}" if state.total_steps else ""
        fields.append(("Train step", f"{state.train_step}{total}"))
    for name, value in (
        ("Loss", state.loss),
        ("Val loss", state.val_loss),
        ("Test loss", state.test_loss),
        ("Test ppl", state.test_ppl),
    ):
        if value is not None:
            fields.append((name, f"{value:.4f}"))
    if (art := pointer_of(state)) is not None:
        fields.append(("Artifact", art.file_id or art.uri))
    return {
        "title": f"Run {view.run_id}"[:256],
        "description": view.message[:4000],
        "color": _COLORS.get(state.status, _COLORS["running"]),
        "fields": [{"name": n, "value": v[:1024] or "-", "inline": True} for n, v in fields],
    }


class Discord:
    """Just enough of Discord's REST API for direct messages, honouring rate limits."""

    def __init__(
        self, session: aiohttp.ClientSession, api: str, token: str, tries: int = 5
    ) -> None:
        self.session = session
        self.api = api.rstrip("/")
        self.headers = {"Authorization": f"Bot {token}", "Content-Type": "application/json"}
        self.tries = tries
        self.log = log.get("discord")
        self._channels: dict[int, str] = {}
        self._locks: dict[int, asyncio.Lock] = {}

    async def request(self, method: str, path: str, body: object) -> dict[str, object]:
        data = msgspec.json.encode(body)
        for attempt in range(1, self.tries + 1):
            try:
                async with self.session.request(
                    method, f"{self.api}{path}", data=data, headers=self.headers
                ) as resp:
                    raw = await resp.read()
                    if resp.status == 429:
                        wait = _retry_after(raw, resp.headers.get("Retry-After"))
                        self.log.info("rate limited by Discord", path=path, retry_after_s=wait)
                        await asyncio.sleep(wait)
                        continue
                    if resp.status < 500:
                        if resp.status >= 400:
                            text = raw[:300].decode("utf-8", "replace")
                            raise DiscordError(f"{method} {path}: HTTP {resp.status} {text}")
                        decoded = msgspec.json.decode(raw) if raw else {}
                        return decoded if isinstance(decoded, dict) else {}
                    problem = f"HTTP {resp.status}"
            except aiohttp.ClientError as e:
                problem = f"{type(e).__name__}: {e}"
            await asyncio.sleep(min(10.0, 0.5 * 2 ** (attempt - 1)))
            self.log.warning("Discord request failed, retrying", path=path, error=problem)
        raise DiscordError(f"{method} {path}: gave up after {self.tries} tries")

    async def dm_channel(self, user_id: int) -> str:
        """The DM channel with a user, opened once and cached."""
        lock = self._locks.setdefault(user_id, asyncio.Lock())
        async with lock:
            if user_id not in self._channels:
                reply = await self.request(
                    "POST", "/users/@me/channels", {"recipient_id": str(user_id)}
                )
                self._channels[user_id] = str(reply["id"])
            return self._channels[user_id]

    async def post(self, channel_id: str, card: dict[str, object]) -> str:
        reply = await self.request("POST", f"/channels/{channel_id}/messages", {"embeds": [card]})
        return str(reply["id"])

    async def edit(self, channel_id: str, message_id: str, card: dict[str, object]) -> None:
        await self.request(
            "PATCH", f"/channels/{channel_id}/messages/{message_id}", {"embeds": [card]}
        )


class _RateLimited(msgspec.Struct):
    """Discord's 429 body (the part we read)."""

    retry_after: float | None = None


def _retry_after(body: bytes, header: str | None) -> float:
    """Seconds to wait after a 429: the body's `retry_after`, else the Retry-After header."""
    with contextlib.suppress(msgspec.DecodeError):
        value = msgspec.json.decode(body, type=_RateLimited).retry_after
        if value is not None and math.isfinite(value):
            return max(0.0, value)
    if header:
        with contextlib.suppress(ValueError):
            return max(0.0, float(header))
    return 1.0


@dataclass
class Card:
    """The DM of one run: its worker sends the newest state, at most once per interval."""

    view: RunView
    version: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class Mailer:
    """Per-run Discord workers, fed by the reading loop without ever blocking it."""

    def __init__(self, discord: Discord, config: NotifierConfig) -> None:
        self.discord = discord
        self.config = config
        self.cards: dict[str, Card] = {}
        self.flushing = asyncio.Event()
        self.log = log.get("discord")

    def update(self, view: RunView) -> None:
        if view.user_id <= 0:
            return
        card = self.cards.get(view.run_id)
        if card is None:
            if self.flushing.is_set():
                return
            card = self.cards[view.run_id] = Card(view)
            card.task = asyncio.create_task(self._work(card))
        card.view = view
        card.version += 1
        card.wake.set()

    async def _work(self, card: Card) -> None:
        run_id = card.view.run_id
        sent, last = 0, -math.inf
        channel = message_id = ""
        try:
            while True:
                await card.wake.wait()
                card.wake.clear()
                wait = self.config.discord_interval_s - (time.monotonic() - last)
                if wait > 0 and not self.flushing.is_set():
                    # Updates arriving meanwhile are folded into the next edit.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.flushing.wait(), wait)
                if card.version != sent:
                    version, body = card.version, embed(card.view)
                    if not channel:
                        channel = await self.discord.dm_channel(card.view.user_id)
                    if not message_id:
                        message_id = await self.discord.post(channel, body)
                    else:
                        await self.discord.edit(channel, message_id, body)
                    sent, last = version, time.monotonic()
                if card.version == sent and (card.view.final or self.flushing.is_set()):
                    return
                if card.version != sent:
                    card.wake.set()
        except DiscordError as e:
            self.log.warning("Discord DM abandoned for this run", run_id=run_id, error=str(e))
        finally:
            self.cards.pop(run_id, None)

    async def close(self) -> None:
        """Send each card's last state (within the grace period), then stop the workers."""
        self.flushing.set()
        tasks = [c.task for c in self.cards.values() if c.task is not None]
        for card in self.cards.values():
            card.wake.set()
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=self.config.grace_s)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await task


# ------------------------------------------------------------------ the reader
class Notifier:
    """Reads the events stream as consumer `consumer` of group "notifier"."""

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        *,
        consumer: str,
        keys: Keys | None = None,
        config: NotifierConfig | None = None,
        blocking_redis: Redis | None = None,
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = keys or Keys(settings.prefix)
        self.consumer = consumer
        self.config = config or NotifierConfig()
        self.translator = Translator(settings, self.config)
        self.log = log.get("notifier").bind(consumer=consumer)
        self._stopping = asyncio.Event()
        self._last_id: str | None = None
        self._mailer: Mailer | None = None
        self.reader = GroupReader(
            redis,
            blocking_redis or redis,
            self.keys.events,
            GROUP,
            consumer,
            lambda: self._last_id or "$",
        )

    async def ensure_group(self, start: str | None = None) -> None:
        """Create the group: at `start`, else after the last entry handled, else at "$"."""
        await self.reader.ensure(start)

    def stop(self) -> None:
        self._stopping.set()

    async def run(self, *, until_idle: bool = False) -> None:
        """Read and notify until stopped; with until_idle, handle what is there and return."""
        await self.ensure_group()
        session: aiohttp.ClientSession | None = None
        if self.settings.discord_token:
            session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
            discord = Discord(
                session,
                self.settings.discord_api,
                self.settings.discord_token,
                self.config.discord_tries,
            )
            self._mailer = Mailer(discord, self.config)
        else:
            self.log.info("Discord DMs are off (no MT_DISCORD_TOKEN)")
        alive_key = self.keys.heartbeat("notifier", self.consumer)
        heartbeat = asyncio.create_task(keep_alive(self.redis, alive_key, self.config.heartbeat_s))
        try:
            await self._loop(until_idle)
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            if self._mailer is not None:
                await self._mailer.close()
                self._mailer = None
            if session is not None:
                await session.close()

    async def _loop(self, until_idle: bool) -> None:
        backlog = True  # our own pending entries first (a restart with the same name)
        outages = 0
        while not self._stopping.is_set():
            try:
                if backlog:
                    entries = await self._read("0", None)
                    backlog = bool(entries)
                else:
                    entries = await self._read(">", 50 if until_idle else self.config.block_ms)
                    if until_idle and not entries:
                        return
                if entries:
                    await self._handle(entries)
                outages = 0
            except (RedisConnectionError, RedisTimeoutError) as e:
                outages += 1
                delay = min(5.0, 0.05 * 2**outages)
                self.log.warning("redis unavailable, retrying", error=str(e), delay_s=delay)
                backlog = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)

    async def _read(self, entry_id: str, block: int | None) -> list[tuple[str, bytes]]:
        entries = await self.reader.read(entry_id, self.config.batch, block)
        return [(eid, fields.get(FIELD.encode(), b"")) for eid, fields in entries]

    async def _handle(self, entries: list[tuple[str, bytes]]) -> None:
        """Translate a batch, then publish it and acknowledge it in one round trip."""
        outgoing: list[bytes] = []
        for entry_id, raw in entries:
            try:
                event = decode_event(raw)
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                self.log.warning("undecodable event skipped", entry_id=entry_id, error=str(e))
                continue
            if not self.translator.relevant(event):
                continue
            view = self.translator.view(event.run_id)
            if isinstance(event, RunCompleted) and not view.state.artifact:
                stored = await self.redis.hget(self.keys.run(event.run_id), "artifact")
                if stored:  # the artifact event came before this notifier's time
                    artifact = stored.decode() if isinstance(stored, bytes) else stored
                    view.state = msgspec.structs.replace(view.state, artifact=artifact)
            outgoing.extend(msgspec.json.encode(m) for m in self.translator.messages(event, view))
            if self._mailer is not None:
                self._mailer.update(view)
            if view.final:
                self.translator.finish(event.run_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            for message in outgoing:
                pipe.publish(self.settings.events_channel, message)
            self.reader.ack(pipe, *[i for i, _ in entries])
            await pipe.execute()
        self._last_id = entries[-1][0]


async def run_notifier(
    settings: Settings,
    url: str,
    *,
    stop: asyncio.Event | None = None,
    until_idle: bool = False,
    config: NotifierConfig | None = None,
) -> None:
    """Run one notifier on its own connections until `stop` is set (or until idle)."""
    cfg = config or NotifierConfig()
    redis = connect(url)
    blocking = connect(url, blocking=True, block_ms=cfg.block_ms)
    notifier = Notifier(
        redis,
        settings,
        consumer=settings.consumer_name("notifier"),
        config=cfg,
        blocking_redis=blocking,
    )

    async def stop_on(event: asyncio.Event) -> None:
        await event.wait()
        notifier.stop()

    watcher = asyncio.create_task(stop_on(stop)) if stop is not None else None
    try:
        await notifier.run(until_idle=until_idle)
    finally:
        if watcher is not None:
            watcher.cancel()
        for client in (blocking, redis):
            await client.aclose()
