"""Following a run: its recorded events (XRANGE), then live ones (XREAD BLOCK on a connection
of its own), rendered as rich progress bars on a terminal or as plain rate-limited lines.

Everything shown is derived from the events stream alone, so `watch` of a finished run
replays its history and `watch` of a running one joins it where it is.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TextIO

import msgspec
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn

from actors.runtime.streams import Redis, connect
from protocol.codec import FIELD, decode_event
from protocol.events import (
    TERMINAL_KINDS,
    AnyEvent,
    ArtifactStored,
    CancelRequested,
    CommandDuplicate,
    CorpusReady,
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
    event_kind,
)
from protocol.events import TERMINAL_STATUSES as TERMINAL_STATUSES  # the CLI reads it here
from protocol.keys import Keys
from protocol.state import RunState, apply

# The history of a run starts at its run.queued event; event ids are the server's clock and
# created_at the submitter's, so the scan starts this much earlier to allow for clock skew.
HISTORY_MARGIN_S = 3600.0


class UnknownRun(LookupError):
    """No run-state hash under this id (in this prefix)."""


@dataclass(frozen=True)
class Entry:
    """One event of a run as recorded: its stream id, its raw payload, and the decoded event
    (None for a kind this version does not know)."""

    id: str
    raw: bytes
    event: AnyEvent | None


class _Head(msgspec.Struct):
    """Just enough of any event to filter by run without decoding the whole union."""

    run_id: str = ""


_head = msgspec.json.Decoder(_Head)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def stream_entries(reply: object) -> list[tuple[str, dict[bytes, bytes]]]:
    """XRANGE / XREVRANGE replies (RESP2) → [(entry id, fields)]; deleted entries dropped."""
    out: list[tuple[str, dict[bytes, bytes]]] = []
    if not isinstance(reply, list):
        return out
    for entry_id, fields in reply:
        if isinstance(fields, dict):
            out.append((_text(entry_id), dict(fields)))
    return out


def read_entries(reply: object) -> list[tuple[str, dict[bytes, bytes]]]:
    """XREAD replies (RESP2): [[stream, entries], ...] → [(entry id, fields)]."""
    out: list[tuple[str, dict[bytes, bytes]]] = []
    if isinstance(reply, list):
        for _stream, entries in reply:
            out.extend(stream_entries(entries))
    return out


def _entry_of(run_id: str, entry_id: str, fields: dict[bytes, bytes]) -> Entry | None:
    raw = fields.get(FIELD.encode(), b"")
    try:
        if _head.decode(raw).run_id != run_id:
            return None
    except msgspec.DecodeError:
        return None
    try:
        event: AnyEvent | None = decode_event(raw)
    except msgspec.DecodeError:
        event = None
    return Entry(entry_id, raw, event)


async def run_state(redis: Redis, keys: Keys, run_id: str) -> RunState:
    raw = await redis.hgetall(keys.run(run_id))
    if not raw:
        raise UnknownRun(run_id)
    return RunState.from_hash(run_id, {_text(k): _text(v) for k, v in raw.items()})


def start_id(created_at: float | None) -> str:
    if not created_at:
        return "-"
    return f"{max(0, int((created_at - HISTORY_MARGIN_S) * 1000))}-0"


async def history(
    redis: Redis, keys: Keys, run_id: str, *, start: str = "-", chunk: int = 2000
) -> tuple[list[Entry], str]:
    """The run's recorded events in order, and the id of the last entry scanned (where a live
    XREAD continues without a gap)."""
    out: list[Entry] = []
    cursor = start
    last = "0-0" if start == "-" else start
    while True:
        batch = stream_entries(await redis.xrange(keys.events, min=cursor, max="+", count=chunk))
        for entry_id, fields in batch:
            last = entry_id
            if (entry := _entry_of(run_id, entry_id, fields)) is not None:
                out.append(entry)
        if len(batch) < chunk:
            return out, last
        cursor = f"({last}"


async def run_history(redis: Redis, keys: Keys, run_id: str) -> tuple[list[Entry], str]:
    """History of a known run (UnknownRun otherwise), scanning from just before its creation."""
    state = await run_state(redis, keys, run_id)
    return await history(redis, keys, run_id, start=start_id(state.created_at))


def is_terminal(entry: Entry) -> bool:
    return entry.event is not None and event_kind(entry.event) in TERMINAL_KINDS


async def follow(
    url: str,
    keys: Keys,
    run_id: str,
    on_entry: Callable[[Entry], None],
    *,
    after: str,
    block_ms: int = 1000,
) -> None:
    """Live events of the run after `after`, until its terminal event (or until its state says
    it ended, should that event have been trimmed away)."""
    blocking = connect(url, blocking=True, block_ms=block_ms)
    plain = connect(url)
    last = after
    try:
        while True:
            reply = read_entries(
                await blocking.xread({keys.events: last}, count=500, block=block_ms)
            )
            for entry_id, fields in reply:
                last = entry_id
                entry = _entry_of(run_id, entry_id, fields)
                if entry is None:
                    continue
                on_entry(entry)
                if is_terminal(entry):
                    return
            if not reply:
                status = await plain.hget(keys.run(run_id), "status")
                if status is not None and _text(status) in TERMINAL_STATUSES:
                    return
    finally:
        await blocking.aclose()
        await plain.aclose()


async def watch(url: str, redis: Redis, keys: Keys, run_id: str, renderer: Renderer) -> RunState:
    """Render the run's history, then follow it live until it ends; its final state."""

    def show(entry: Entry) -> None:
        if entry.event is not None:
            renderer.update(entry.event)

    entries, last = await run_history(redis, keys, run_id)
    for entry in entries:
        show(entry)
    if not any(is_terminal(e) for e in entries):
        await follow(url, keys, run_id, show, after=last)
    return await run_state(redis, keys, run_id)


# ------------------------------------------------------------------- what a terminal shows
def duration(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


@dataclass
class RunView:
    """The run's shared view (protocol.state) and what only the watcher adds: an ETA."""

    state: RunState = field(default_factory=lambda: RunState(run_id=""))
    eta_s: float | None = None
    # (event time, step) where the current training rate is measured from
    origin: tuple[float, int] | None = None

    @property
    def chain_label(self) -> str:
        step, steps = self.state.step, self.state.steps
        if not step:
            return "waiting"
        if step in steps:
            return f"{step} ({steps.index(step) + 1}/{len(steps)})"
        return step

    def progress_line(self) -> str:
        s = self.state
        parts = [f"step {s.train_step}/{s.total_steps or '?'}"]
        if s.total_epochs:
            parts.append(f"epoch {s.epoch}/{s.total_epochs}")
        if s.loss is not None:
            parts.append(f"loss {s.loss:.4f}")
        if s.val_loss is not None:
            parts.append(f"val {s.val_loss:.4f}")
        if s.tokens_per_s:
            parts.append(f"{s.tokens_per_s:,.0f} tok/s")
        if self.eta_s is not None:
            parts.append(f"ETA {duration(self.eta_s)}")
        return " | ".join(parts)

    def apply(self, event: AnyEvent) -> str | None:
        """Update from one event; a line worth showing on its own, or None (plain progress)."""
        if not self.state.run_id:
            self.state = RunState(run_id=event.run_id)
        self.state = apply(self.state, event)
        match event:
            case TrainStarted():
                self.origin, self.eta_s = None, None  # measured from the first step on
            case TrainProgress():
                self._eta(event)
            case TrainCompleted():
                self.eta_s = 0.0
            case _:
                pass
        return self.line(event)

    def line(self, event: AnyEvent) -> str | None:
        match event:
            case RunQueued():
                return "queued: " + " → ".join(event.steps)
            case StepStarted():
                again = f" (attempt {event.attempt})" if event.attempt > 1 else ""
                return f"{self.chain_label} started{again}"
            case StepCompleted():
                return f"{self.chain_label} done in {event.duration_s:.1f}s"
            case CommandDuplicate():
                return f"{event.step}: duplicate delivery of {event.command_id} acknowledged"
            case CorpusReady():
                split = ", ".join(f"{k} {v:,}" for k, v in event.chars.items())
                return f"corpus ready: {sum(event.chars.values()):,} chars ({split})"
            case TokenizerReady():
                stats = ", ".join(f"{k} {v:g}" for k, v in sorted(event.stats.items())[:6])
                return f"tokenizer ready: {event.tokenizer_kind} {event.tokenizer_id} {stats}"
            case TrainStarted():
                facts = [
                    f"{event.parameters:,} parameters" if event.parameters else "",
                    f"{event.total_epochs} epochs",
                    f"{event.total_steps} steps" if event.total_steps else "",
                    f"batch {event.batch_size}" if event.batch_size else "",
                    " ".join(v for v in (event.device, event.precision) if v and v != "auto"),
                    f"{event.threads} threads" if event.threads else "",
                    f"resumed at step {event.resumed_from_step}" if event.resumed_from_step else "",
                ]
                return f"training {event.model_family}/{event.model_size}: " + ", ".join(
                    f for f in facts if f
                )
            case TrainProgress():
                if event.val_loss is not None:
                    ppl = f" (ppl {event.val_ppl:.2f})" if event.val_ppl is not None else ""
                    return f"validation at step {event.step}: val_loss {event.val_loss:.4f}{ppl}"
                return None
            case TrainCompleted():
                done = f"training {event.status}: {event.steps} steps"
                for name in ("train_loss", "val_loss", "test_loss", "test_ppl"):
                    value = getattr(event, name)
                    if value is not None:
                        done += f", {name} {value:.4f}"
                if event.early_stopped:
                    done += " (early stop)"
                return done
            case EvalCompleted():
                loss = f"loss {event.loss:.4f}" if event.loss is not None else "no loss"
                ppl = f", ppl {event.ppl:.2f}" if event.ppl is not None else ""
                return f"evaluation on {event.split or 'test'}: {loss}{ppl}"
            case ResultReady():
                return f"{event.what} result {event.request_id}: {'ok' if event.ok else 'failed'}"
            case ArtifactStored():
                return f"artifact stored ({event.storage}): {event.uri or event.file_id}"
            case CancelRequested():
                return "cancel requested"
            case RunCompleted():
                return f"run completed{': ' + event.message if event.message else ''}"
            case RunFailed():
                return f"run failed in {event.step} ({event.error_kind} error): {event.message}"
            case RunCancelled():
                return f"run cancelled{': ' + event.message if event.message else ''}"

    def _eta(self, event: TrainProgress) -> None:
        if self.origin is None:
            self.origin = (event.at, event.step)
            return
        t0, s0 = self.origin
        total = self.state.total_steps
        if event.at > t0 and event.step > s0 and total:
            rate = (event.step - s0) / (event.at - t0)
            self.eta_s = max(0.0, (total - event.step) / rate)


# ---------------------------------------------------------------------------- renderers
class Renderer(Protocol):
    def update(self, event: AnyEvent) -> None: ...

    def close(self) -> None: ...


class PlainRenderer:
    """One line per notable event; training progress at most once per `interval_s` of event
    time (deterministic for history), plus every validation and every epoch change."""

    def __init__(self, out: TextIO, interval_s: float = 1.0) -> None:
        self.out = out
        self.interval_s = interval_s
        self.view = RunView()
        self._last_at: float | None = None
        self._last_epoch = -1

    def update(self, event: AnyEvent) -> None:
        line = self.view.apply(event)
        if isinstance(event, TrainProgress):
            due = self._last_at is None or event.at - self._last_at >= self.interval_s
            if line is not None or due or event.epoch != self._last_epoch:
                self._print(self.view.progress_line() if line is None else line, event)
                self._last_at, self._last_epoch = event.at, event.epoch
        elif line is not None:
            self._print(line, event)

    def _print(self, line: str, event: AnyEvent) -> None:
        print(f"[{event.run_id or self.view.state.run_id}] {line}", file=self.out, flush=True)

    def close(self) -> None:
        return None


class RichRenderer:
    """Live bars: the chain, the training steps (with epoch, loss, tokens/s and ETA);
    notable events are printed above them."""

    def __init__(self, console: Console) -> None:
        self.view = RunView()
        self.progress = Progress(
            TextColumn("{task.description}", style="bold"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
        )
        self.chain: TaskID = self.progress.add_task("chain", total=None, info="")
        self.train: TaskID | None = None
        self.progress.start()

    def update(self, event: AnyEvent) -> None:
        view = self.view
        line = view.apply(event)
        state = view.state
        if line is not None:
            self.progress.console.print(line, markup=False, highlight=False)
        self.progress.update(
            self.chain,
            total=len(state.steps) or None,
            completed=state.steps_done,
            info=f"{state.status}: {view.chain_label}",
        )
        if isinstance(event, TrainStarted) and self.train is None:
            self.train = self.progress.add_task("train", total=state.total_steps or None, info="")
        if self.train is not None:
            self.progress.update(
                self.train,
                total=state.total_steps or None,
                completed=state.train_step,
                info=view.progress_line(),
            )

    def close(self) -> None:
        self.progress.stop()


def renderer_for(out: TextIO | None = None) -> Renderer:
    """Bars on a terminal, plain lines elsewhere (tests, CI logs, pipes)."""
    stream = out or sys.stdout
    if stream.isatty():
        return RichRenderer(Console(file=stream))
    return PlainRenderer(stream)
