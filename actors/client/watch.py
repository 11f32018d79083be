"""Watching a run: its recorded events, then live ones (both read through the ServiceClient),
rendered as rich progress bars on a terminal or as plain rate-limited lines.

Everything shown is derived from the events stream alone, so `watch` of a finished run
replays its history and `watch` of a running one joins it where it is.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Protocol, TextIO

import msgspec
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn

from actors.client.client import Entry, ServiceClient
from protocol.events import (
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
    Sample,
    StepCompleted,
    StepStarted,
    TokenizerReady,
    TrainCompleted,
    TrainProgress,
    TrainStarted,
)
from protocol.state import RunState, apply


async def watch(client: ServiceClient, run_id: str, renderer: Renderer) -> RunState:
    """Render the run's history, then follow it live until it ends; its final state."""

    def show(entries: list[Entry]) -> None:
        for entry in entries:
            if entry.event is not None:
                renderer.update(entry.event)

    entries, last = await client.history(run_id)
    show(entries)
    if not any(e.terminal for e in entries):
        async for batch in client.follow(run_id, after=last):
            show(batch)
    return await client.run_state(run_id)


# ------------------------------------------------------------------- what a terminal shows
def sample_line(sample: Sample) -> str:
    """A validation sample on one line: the prompt, then what the model wrote, both quoted
    (JSON's escapes: a newline shows as \\n)."""
    quote = msgspec.json.encode
    return f"sample: {quote(sample.prompt).decode()} → {quote(sample.text).decode()}"


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
        if s.mfu is not None:
            parts.append(f"MFU {s.mfu:.1%}")
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
                threads = f"{event.threads} threads" if event.threads else ""
                if event.world_size > 1:  # DDP: the threads are each process's
                    threads = f"{event.world_size} processes ({event.backend}) x {threads}"
                facts = [
                    f"{event.parameters:,} parameters" if event.parameters else "",
                    f"{event.total_epochs} epochs",
                    f"{event.total_steps} steps" if event.total_steps else "",
                    f"batch {event.batch_size}" if event.batch_size else "",
                    " ".join(v for v in (event.device, event.precision) if v and v != "auto"),
                    f"compile {'on' if event.compile else 'off'}",
                    threads,
                    f"resumed at step {event.resumed_from_step}" if event.resumed_from_step else "",
                ]
                started = f"training {event.model_family}/{event.model_size}: " + ", ".join(
                    f for f in facts if f
                )
                return f"{started} ({event.recipe})" if event.recipe else started
            case TrainProgress():
                if event.val_loss is not None:
                    ppl = f" (ppl {event.val_ppl:.2f})" if event.val_ppl is not None else ""
                    line = f"validation at step {event.step}: val_loss {event.val_loss:.4f}{ppl}"
                    return "\n  ".join([line, *(sample_line(s) for s in event.samples)])
                return None
            case TrainCompleted():
                done = f"training {event.status}: {event.steps} steps"
                for name in ("train_loss", "val_loss", "test_loss", "test_ppl"):
                    value = getattr(event, name)
                    if value is not None:
                        done += f", {name} {value:.4f}"
                if event.mfu is not None:
                    done += f", MFU {event.mfu:.1%}"
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
    """Live bars: the chain, the training steps (with epoch, loss, tokens/s, MFU and ETA);
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
