"""Every command an actor accepts. msgspec JSON in the stream field `data`, tagged by `kind`.

New fields always get defaults; a breaking change gets a new tag. A command is its settings
(protocol.settings: the knobs, bounds and defaults, written once) plus who asked and where it
belongs. A Struct can inherit fields from one base only, so `Base` is field-less and each
command declares its header (command_id, user_id, requested_at) itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

import msgspec
from msgspec import Meta

from protocol.errors import FieldError
from protocol.keys import ActorName
from protocol.requests import (
    ChatMessage,
    FileId,
    Name,
    PromptText,
    ScoreText,
    ScoreTopK,
    Split,
    UserId,
)
from protocol.settings import (
    CorpusSettings,
    GenerateSettings,
    Id,
    OptId,
    PathText,
    SamplingSettings,
    TokenizerSettings,
    TrainSettings,
    check,
)

Endpoint = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.:\[\]-]{1,250}:[0-9]{1,5}$")]  # host:port


class Base(msgspec.Struct, kw_only=True, tag_field="kind", forbid_unknown_fields=False):
    """The root of every command. It has no fields of its own (see the module docstring); the
    type checker is told of the header that every command declares, and a test checks that
    each one does."""

    if TYPE_CHECKING:
        command_id: str
        user_id: int
        requested_at: float


class CorpusIngest(CorpusSettings, Base, kw_only=True, tag="corpus.ingest"):
    """Normalize and split a corpus: exactly one of path / named / file_id."""

    command_id: Id
    user_id: UserId = 0
    requested_at: float = 0.0
    run_id: Id
    corpus_id: Id
    path: PathText = ""
    named: Name = ""
    file_id: FileId = ""
    rest: list[ChainCommand] = []


class TokenizerTrain(TokenizerSettings, Base, kw_only=True, tag="tokenizer.train"):
    command_id: Id
    user_id: UserId = 0
    requested_at: float = 0.0
    run_id: Id
    tokenizer_id: Id
    corpus_id: Id
    rest: list[ChainCommand] = []


class ModelTrain(TrainSettings, Base, kw_only=True, tag="model.train"):
    command_id: Id
    user_id: UserId = 0
    requested_at: float = 0.0
    run_id: Id
    corpus_id: Id
    tokenizer_id: Id
    rest: list[ChainCommand] = []


class ModelEvaluate(Base, kw_only=True, tag="model.evaluate"):
    """Evaluate a run on its validation or test split, or on a file under the corpus root."""

    command_id: Id
    user_id: UserId = 0
    requested_at: float = 0.0
    run_id: Id
    request_id: OptId = ""
    split: Split = "test"
    path: PathText = ""
    rest: list[ChainCommand] = []


class ModelScore(Base, kw_only=True, tag="model.score"):
    command_id: Id
    user_id: UserId = 0
    requested_at: float = 0.0
    run_id: Id
    request_id: Id
    text: ScoreText
    detail: bool = False
    top_k: ScoreTopK = 5


class ModelGenerate(GenerateSettings, Base, kw_only=True, tag="model.generate"):
    command_id: Id
    user_id: UserId = 0
    requested_at: float = 0.0
    run_id: Id
    request_id: Id
    prompt: PromptText = ""


class ModelChat(SamplingSettings, Base, kw_only=True, tag="model.chat"):
    command_id: Id
    user_id: UserId = 0
    requested_at: float = 0.0
    run_id: Id
    request_id: Id
    session_id: Id
    message: ChatMessage


class ArtifactUpload(Base, kw_only=True, tag="artifact.upload"):
    """Archive a run dir (or a tokenizer dir) and store it locally or in the Data Bank."""

    command_id: Id
    user_id: UserId = 0
    requested_at: float = 0.0
    run_id: Id
    target: Literal["run", "tokenizer"] = "run"
    tokenizer_id: OptId = ""
    rest: list[ChainCommand] = []


class ModelTrainJoin(Base, kw_only=True, tag="model.train.join"):
    """Train a run on several machines (nnodes > 1) as one more of them: queued by the
    trainer that took the run's model.train (it is node 0 and hosts the rendezvous), one per
    other node; another trainer takes it, fetches the run's inputs and starts its processes
    against the rendezvous. Node 0 alone reports the run."""

    command_id: Id
    user_id: UserId = 0
    requested_at: float = 0.0
    run_id: Id
    train: ModelTrain  # the run's training command (without the rest of its chain)
    endpoint: Endpoint  # node 0's c10d rendezvous


class RunCancel(Base, kw_only=True, tag="run.cancel"):
    """Accepted on every command stream: sets the run's cancel flag."""

    command_id: Id
    user_id: UserId = 0
    requested_at: float = 0.0
    run_id: Id


# Steps of a run's chain: each carries the rest of the chain and starts the next one itself.
ChainCommand = CorpusIngest | TokenizerTrain | ModelTrain | ModelEvaluate | ArtifactUpload
Command = ChainCommand | ModelScore | ModelGenerate | ModelChat | ModelTrainJoin | RunCancel
# Commands that answer under a request id (model.evaluate does when it has one).
RequestCommand = ModelEvaluate | ModelScore | ModelGenerate | ModelChat

# Which actor's stream each command goes to.
ACTOR_OF: dict[type[Base], ActorName] = {
    CorpusIngest: "ingest",
    TokenizerTrain: "tokenizer",
    ModelTrain: "trainer",
    ModelTrainJoin: "trainer",
    ModelEvaluate: "evaluator",
    ModelScore: "evaluator",
    ModelGenerate: "evaluator",
    ModelChat: "evaluator",
    ArtifactUpload: "uploader",
    RunCancel: "ingest",
}

# The union each actor's decoder accepts (run.cancel is accepted everywhere).
ACCEPTS: dict[ActorName, tuple[type[Base], ...]] = {
    "ingest": (CorpusIngest, RunCancel),
    "tokenizer": (TokenizerTrain, RunCancel),
    "trainer": (ModelTrain, ModelTrainJoin, RunCancel),
    "evaluator": (ModelEvaluate, ModelScore, ModelGenerate, ModelChat, RunCancel),
    "uploader": (ArtifactUpload, RunCancel),
    "notifier": (),
}


def actor_of(cmd: Base) -> ActorName:
    return ACTOR_OF[type(cmd)]


def kind_of(cmd: Base) -> str:
    tag = type(cmd).__struct_config__.tag
    return str(tag)


def check_command(cmd: Base) -> None:
    """What the types cannot say, of the command and of every step of the chain it carries:
    the settings' rules (protocol.settings) and the command's own. Raises FieldError naming
    the field; an actor calls it before any work, the client before submitting."""
    check(cmd)
    match cmd:
        case CorpusIngest():
            sources = {"path": cmd.path, "named": cmd.named, "file_id": cmd.file_id}
            given = [name for name, value in sources.items() if value]
            if len(given) != 1:
                got = " and ".join(given) or "none"
                raise FieldError(
                    given[-1] if given else "path",
                    f"give exactly one of path, named, file_id (got {got})",
                )
        case ArtifactUpload(target="tokenizer", tokenizer_id=""):
            raise FieldError("tokenizer_id", "artifact.upload of a tokenizer needs its id")
        case _:
            pass
    if isinstance(cmd, ChainCommand):
        for step in cmd.rest:
            check_command(step)
