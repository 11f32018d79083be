"""The Discord bot's view of a run: our events translated into the bot's existing event
shapes (the contract its decoder reads), over the shared run state (protocol.state).

Messages on `Settings.events_channel` use the bot's existing shapes (the Structs below; ints
are ints). No NaN or Infinity ever leaves: a required float that is not finite is clamped
(NaN and +inf to the largest finite double, -inf to its negative: "diverged"), an optional
one (val_loss, val_ppl) is left out.

The contract's shapes are kept as they are (the bot's decoder knows their keys): what it
has no field for — the recipe, MFU, the model's latest validation sample — is said in the
progress message's text.

Progress is a percentage of the whole run: each step of the chain owns a share — ingest
0-5, tokenizer 5-15, trainer 15-90 (by step/total_steps), evaluator 90-97, uploader 97-100.
It is rate-limited per run by event time: at most one progress pair (job.progress +
metrics.progress) per `progress_interval_s`, plus every event that carries a validation.

What the bot hears: job.started on the first step.started of a run (queue = that step's
actor); job.progress on later step.started and on each step's result (corpus, tokenizer,
evaluation, artifact); metrics.config on train.started; the progress pair on train.progress;
on run.completed, metrics.completed (when a test loss is known: training's, else the run's
evaluation on the test split) then job.completed (result_id = the artifact's file id, else
its uri, else the run id) — only then, so the bot never shows "completed" for a run whose
evaluation or upload then fails; job.failed on run.failed, and on run.cancelled as a "user"
error (the contract has no cancel) whose message says it was a cancellation on request, at
which step, and what is kept.
"""

from __future__ import annotations

import math
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import msgspec

from actors.runtime.config import Settings
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
from protocol.state import RunState, apply

PROGRESS_SHARE: dict[str, tuple[int, int]] = {
    "ingest": (0, 5),
    "tokenizer": (5, 15),
    "trainer": (15, 90),
    "evaluator": (90, 97),
    "uploader": (97, 100),
}
MAX_RUNS = 10_000  # runs remembered at once; the oldest are forgotten first
SAMPLE_CHARS = 160  # of the sample quoted in a progress message
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


def mfu_text(mfu: float | None) -> str:
    """The suffix ' MFU 12.3%' of a message when the MFU (a fraction) is known, else ''."""
    value = finite_or_none(mfu)
    return "" if value is None else f" MFU {value:.1%}"


def sample_text(state: RunState) -> str:
    """The suffix ' | sample (step N): prompt → text' of a progress message: the first sample
    of the run's latest validation on one line (a newline shows as ⏎), or ''."""
    if not state.samples:
        return ""
    first = state.samples[0]
    text = f"{first.prompt} → {first.text}".replace("\n", "⏎")
    if len(text) > SAMPLE_CHARS:
        text = text[: SAMPLE_CHARS - 1] + "…"
    return f" | sample (step {state.samples_step}): {text}"


def recipe_label(state: RunState) -> str:
    """What the run trains with, in a few words: "cpu bf16, compile on"."""
    where = " ".join(v for v in (state.device, state.precision) if v)
    return f"{where}, compile {'on' if state.compile else 'off'}"


def percent(step: str, fraction: float) -> int:
    """The run's progress (0-100) when `step` is `fraction` done."""
    lo, hi = PROGRESS_SHARE.get(step, (0, 100))
    f = min(1.0, max(0.0, fraction)) if math.isfinite(fraction) else 0.0
    return int(lo + (hi - lo) * f)


def cancel_message(state: RunState, step: str) -> str:
    """What the bot shows for a cancelled run (under its "user" failure heading)."""
    if not step:
        return "Cancelled on request before any step started; nothing failed."
    where = f"Cancelled on request at the {step} step"
    if state.train_completed is not None or step in ("evaluator", "uploader"):
        return f"{where}, after training; nothing failed. The trained model is kept."
    if step == "trainer" and state.train_step:
        total = f" of {state.total_steps}" if state.total_steps else ""
        return (
            f"{where}, after training step {state.train_step}{total}; nothing failed. "
            "Its checkpoint is kept."
        )
    return f"{where}, before training; nothing failed. There is no checkpoint yet."


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
    eval_test_loss: float | None = None  # the run's evaluation step on the test split
    eval_test_ppl: float | None = None

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
                if event.precision:
                    view.message += f" ({recipe_label(state)})"
                if event.recipe:
                    view.message += f": {event.recipe}"
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
                view.message += mfu_text(event.mfu)
                return []  # metrics.completed waits for the run to complete
            case EvalCompleted():
                if event.split == "test" and event.loss is not None:
                    view.eval_test_loss, view.eval_test_ppl = event.loss, event.ppl
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
                done = JobCompleted(job_id=rid, user_id=uid, result_id=result, result_bytes=size)
                return [*self._metrics_completed(view), done]
            case RunFailed():
                view.message = state.message
                return [
                    JobFailed(
                        job_id=rid, user_id=uid, error_kind=event.error_kind, message=view.message
                    )
                ]
            case RunCancelled():
                # The bot has no "cancelled": it reads a "user" failure, so the message must
                # say plainly that nothing went wrong.
                view.message = state.message
                message = cancel_message(state, event.step)
                return [JobFailed(job_id=rid, user_id=uid, error_kind="user", message=message)]
            case CancelRequested():
                view.message = "cancel requested"
                return []
            case _:
                return []

    def _metrics_completed(self, view: RunView) -> list[BotMessage]:
        """The bot's completed metrics need a test loss: training's, else the evaluation's."""
        state = view.state
        if state.test_loss is not None:
            loss, test_ppl = state.test_loss, state.test_ppl
        elif view.eval_test_loss is not None:
            loss, test_ppl = view.eval_test_loss, view.eval_test_ppl
        else:
            return []
        return [
            MetricsCompleted(
                job_id=view.run_id,
                user_id=view.user_id,
                test_loss=clamp(loss),
                test_ppl=clamp(test_ppl if test_ppl is not None else ppl(loss)),
                artifact_path=str(self.settings.run_dir(view.run_id)),
            )
        ]

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
        view.message += mfu_text(event.mfu)
        view.message += sample_text(state)
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
