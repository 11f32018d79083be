"""Every event of every run, in order, on the events stream; tagged by `kind`."""

from __future__ import annotations

from typing import Literal

import msgspec

from protocol.keys import ActorName

ErrorKind = Literal["user", "system"]
RunStatus = Literal["queued", "running", "completed", "failed", "cancelled"]
RequestKind = Literal["score", "generate", "chat", "evaluate"]


class Event(msgspec.Struct, kw_only=True, tag_field="kind"):
    run_id: str = ""
    user_id: int = 0
    at: float = 0.0


class RunQueued(Event, kw_only=True, tag="run.queued"):
    steps: list[ActorName] = []
    model_family: str = ""
    model_size: str = ""
    corpus: str = ""
    tokenizer_id: str = ""


class StepStarted(Event, kw_only=True, tag="step.started"):
    step: ActorName
    command_id: str
    attempt: int = 1
    consumer: str = ""


class StepCompleted(Event, kw_only=True, tag="step.completed"):
    step: ActorName
    command_id: str
    duration_s: float = 0.0


class CommandDuplicate(Event, kw_only=True, tag="command.duplicate"):
    step: ActorName
    command_id: str


class CorpusReady(Event, kw_only=True, tag="corpus.ready"):
    corpus_id: str
    chars: dict[str, int] = {}
    lines: dict[str, int] = {}
    sha256: str = ""


class TokenizerReady(Event, kw_only=True, tag="tokenizer.ready"):
    tokenizer_id: str
    tokenizer_kind: str = ""
    stats: dict[str, float] = {}


class TrainStarted(Event, kw_only=True, tag="train.started"):
    model_family: str
    model_size: str
    total_epochs: int
    total_steps: int = 0
    batch_size: int = 0
    learning_rate: float = 0.0
    threads: int = 0  # of each training process
    world_size: int = 1  # training processes (DDP), all machines together
    backend: str = ""  # their torch.distributed backend: gloo (CPU), nccl (CUDA); "": one
    cpu_cores: int = 0
    memory_mb: int = 0
    device: str = ""
    precision: str = ""
    parameters: int = 0
    resumed_from_step: int = 0
    compile: bool = False
    recipe: str = ""  # why this precision and compile, with the measured figures
    flops_per_token: float = 0.0
    peak_flops: float = 0.0  # measured FLOP/s of the device in the chosen precision


class Sample(msgspec.Struct, kw_only=True):
    """What the model wrote from a fixed prompt at a validation (seeded: the same run writes
    the same samples)."""

    prompt: str
    text: str  # the continuation, without the prompt


class TrainProgress(Event, kw_only=True, tag="train.progress"):
    step: int
    epoch: int
    total_epochs: int
    total_steps: int = 0
    loss: float
    lr: float = 0.0
    grad_norm: float = 0.0
    tokens_per_s: float = 0.0
    samples_per_s: float = 0.0
    val_loss: float | None = None
    val_ppl: float | None = None
    mfu: float | None = None  # model FLOPs utilisation, 0..1
    samples: list[Sample] = []  # on the steps that ran a validation (when samples are on)


class TrainCompleted(Event, kw_only=True, tag="train.completed"):
    status: str = "completed"
    steps: int = 0
    tokens: int = 0
    train_loss: float | None = None
    val_loss: float | None = None
    test_loss: float | None = None
    test_ppl: float | None = None
    best_step: int = 0
    early_stopped: bool = False
    tokens_per_s: float = 0.0
    mfu: float | None = None


class EvalCompleted(Event, kw_only=True, tag="eval.completed"):
    request_id: str = ""
    split: str = ""
    loss: float | None = None
    ppl: float | None = None
    metrics: dict[str, float] = {}


class ResultReady(Event, kw_only=True, tag="result.ready"):
    """A score / generate / chat request finished; its body is under the result key."""

    request_id: str
    what: RequestKind
    ok: bool = True
    message: str = ""


# Where an archive went: "local" (the uploader's data dir) and "data-bank" without
# MT_STORE_URL, as before the artifact store; "store" with it (backend and key name it there).
ArtifactStorage = Literal["local", "data-bank", "store"]
StoreBackend = Literal["", "local", "s3", "databank"]


class ArtifactPointer(msgspec.Struct, kw_only=True):
    """Where an archive was stored: the run state's "artifact" field (JSON), the body of
    GET /runs/{id}/artifact and manifest.json's "artifact"."""

    storage: ArtifactStorage
    target: Literal["run", "tokenizer"] = "run"
    # file:// URI of a local archive, the Data Bank URL of a stored one, the store URL + key
    uri: str = ""
    file_id: str = ""  # the Data Bank's id ("" for local archives)
    size: int = 0
    sha256: str = ""
    backend: StoreBackend = ""  # the store's backend ("store" only)
    key: str = ""  # the store key, artifacts/<run|tokenizer>/<id>.tar.gz ("store" only)


class ArtifactStored(Event, kw_only=True, tag="artifact.stored"):
    storage: ArtifactStorage
    target: Literal["run", "tokenizer"] = "run"
    uri: str = ""
    file_id: str = ""
    size: int = 0
    sha256: str = ""
    backend: StoreBackend = ""
    key: str = ""

    def pointer(self) -> ArtifactPointer:
        return ArtifactPointer(
            storage=self.storage,
            target=self.target,
            uri=self.uri,
            file_id=self.file_id,
            size=self.size,
            sha256=self.sha256,
            backend=self.backend,
            key=self.key,
        )


class RunCompleted(Event, kw_only=True, tag="run.completed"):
    message: str = ""


class RunFailed(Event, kw_only=True, tag="run.failed"):
    step: ActorName
    error_kind: ErrorKind
    message: str


class RunCancelled(Event, kw_only=True, tag="run.cancelled"):
    step: ActorName | Literal[""] = ""
    message: str = ""


class CancelRequested(Event, kw_only=True, tag="run.cancel_requested"):
    pass


AnyEvent = (
    RunQueued
    | StepStarted
    | StepCompleted
    | CommandDuplicate
    | CorpusReady
    | TokenizerReady
    | TrainStarted
    | TrainProgress
    | TrainCompleted
    | EvalCompleted
    | ResultReady
    | ArtifactStored
    | RunCompleted
    | RunFailed
    | RunCancelled
    | CancelRequested
)


def event_kind(event: Event) -> str:
    return str(type(event).__struct_config__.tag)


# A run ends with exactly one of these events, and its state's status then never changes.
TERMINAL_STATUSES: frozenset[RunStatus] = frozenset({"completed", "failed", "cancelled"})
TERMINAL_KINDS: frozenset[str] = frozenset(
    str(t.__struct_config__.tag) for t in (RunCompleted, RunFailed, RunCancelled)
)
