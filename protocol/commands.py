"""Every command an actor accepts. msgspec JSON in the stream field `data`, tagged by `kind`.

New fields always get defaults; a breaking change gets a new tag. Bounds live here (Meta) so
the contract, the validation and the OpenAPI schema are one thing.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from protocol.keys import ActorName

Id = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")]
OptId = Annotated[str, Meta(pattern=r"^([A-Za-z0-9][A-Za-z0-9_.:-]{0,127})?$")]
UserId = Annotated[int, Meta(ge=0, le=2**63 - 1)]
Seed = Annotated[int, Meta(ge=0, le=2**32 - 1)]
Fraction = Annotated[float, Meta(ge=0.01, le=0.5)]
PromptText = Annotated[str, Meta(max_length=20_000)]
TokenizerKind = Literal["bpe", "sentencepiece", "char"]
ModelFamily = Literal["gpt2", "llama", "qwen", "char_lstm"]
ModelSize = Literal["tiny", "small", "medium", "large"]
Optimizer = Literal["adamw", "adam", "sgd"]
Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]

# Bounds shared by the commands and the HTTP bodies (protocol.requests).
VocabSize = Annotated[int, Meta(ge=16, le=200_000)]
MinFrequency = Annotated[int, Meta(ge=1, le=1_000_000)]
SeqLen = Annotated[int, Meta(ge=8, le=8192)]
Epochs = Annotated[int, Meta(ge=1, le=1000)]
Steps = Annotated[int, Meta(ge=1, le=10_000_000)]
BatchSize = Annotated[int, Meta(ge=1, le=4096)]
Rate = Annotated[float, Meta(gt=0.0, le=1.0)]
Decay = Annotated[float, Meta(ge=0.0, le=1.0)]
Warmup = Annotated[int, Meta(ge=0, le=1_000_000)]
Clip = Annotated[float, Meta(ge=0.0, le=1000.0)]
Accum = Annotated[int, Meta(ge=1, le=1024)]
Dropout = Annotated[float, Meta(ge=0.0, le=0.9)]
Every = Annotated[int, Meta(ge=1, le=1_000_000)]
Patience = Annotated[int, Meta(ge=1, le=1000)]
Threads = Annotated[int, Meta(ge=0, le=256)]
PathText = Annotated[str, Meta(max_length=1024)]
Name = Annotated[str, Meta(max_length=64)]
FileId = Annotated[str, Meta(max_length=128)]
ScoreText = Annotated[str, Meta(min_length=1, max_length=100_000)]
ScoreTopK = Annotated[int, Meta(ge=0, le=50)]
NewTokens = Annotated[int, Meta(ge=1, le=2048)]
Temperature = Annotated[float, Meta(ge=0.0, le=5.0)]
TopK = Annotated[int, Meta(ge=0, le=100_000)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
StopList = Annotated[list[Annotated[str, Meta(min_length=1, max_length=64)]], Meta(max_length=8)]
Sequences = Annotated[int, Meta(ge=1, le=8)]
ChatMessage = Annotated[str, Meta(min_length=1, max_length=4000)]


class Base(msgspec.Struct, kw_only=True, tag_field="kind", forbid_unknown_fields=False):
    command_id: Id
    user_id: UserId = 0
    requested_at: float = 0.0


class CorpusIngest(Base, kw_only=True, tag="corpus.ingest"):
    """Normalize and split a corpus: exactly one of path / named / file_id."""

    run_id: Id
    corpus_id: Id
    path: PathText = ""
    named: Name = ""
    file_id: FileId = ""
    lowercase: bool = False
    validation_fraction: Fraction = 0.1
    test_fraction: Fraction = 0.1
    seed: Seed = 1337
    rest: list[ChainCommand] = []


class TokenizerTrain(Base, kw_only=True, tag="tokenizer.train"):
    run_id: Id
    tokenizer_id: Id
    corpus_id: Id
    tokenizer_kind: TokenizerKind = "bpe"
    vocab_size: VocabSize = 4096
    min_frequency: MinFrequency = 2
    spm_model_type: Literal["unigram", "bpe"] = "unigram"
    threads: Threads = 0
    rest: list[ChainCommand] = []


class ModelTrain(Base, kw_only=True, tag="model.train"):
    run_id: Id
    corpus_id: Id
    tokenizer_id: Id
    model_family: ModelFamily = "gpt2"
    model_size: ModelSize = "tiny"
    max_seq_len: SeqLen = 256
    num_epochs: Epochs = 1
    max_steps: Steps | None = None
    batch_size: BatchSize = 8
    learning_rate: Rate = 3e-4
    optimizer: Optimizer = "adamw"
    weight_decay: Decay = 0.1
    warmup_steps: Warmup = 20
    gradient_clipping: Clip = 1.0
    grad_accum_steps: Accum = 1
    dropout: Dropout = 0.0
    eval_every: Every = 100
    checkpoint_every: Every = 100
    early_stopping_patience: Patience | None = None
    pretrained_run_id: OptId = ""
    pretrained_path: PathText = ""
    freeze_embed: bool = False
    finetune_lr_cap: Rate | None = None
    device: Device = "auto"
    precision: Precision = "auto"
    threads: Threads = 0
    seed: Seed = 1337
    rest: list[ChainCommand] = []


class ModelEvaluate(Base, kw_only=True, tag="model.evaluate"):
    """Evaluate a run on its validation or test split, or on a file under the corpus root."""

    run_id: Id
    request_id: OptId = ""
    split: Literal["validation", "test"] = "test"
    path: PathText = ""
    rest: list[ChainCommand] = []


class ModelScore(Base, kw_only=True, tag="model.score"):
    run_id: Id
    request_id: Id
    text: ScoreText
    detail: bool = False
    top_k: ScoreTopK = 5


class SamplingBase(Base, kw_only=True):
    """Sampling settings shared by generate and chat."""

    max_new_tokens: NewTokens = 64
    temperature: Temperature = 0.8
    top_k: TopK = 50
    top_p: TopP = 1.0
    seed: Seed = 0


class ModelGenerate(SamplingBase, kw_only=True, tag="model.generate"):
    run_id: Id
    request_id: Id
    prompt: PromptText = ""
    stop: StopList = []
    num_return_sequences: Sequences = 1
    stop_on_eos: bool = True  # eos ends a line of the corpus: off, it becomes a newline


class ModelChat(SamplingBase, kw_only=True, tag="model.chat"):
    run_id: Id
    request_id: Id
    session_id: Id
    message: ChatMessage


class ArtifactUpload(Base, kw_only=True, tag="artifact.upload"):
    """Archive a run dir (or a tokenizer dir) and store it locally or in the Data Bank."""

    run_id: Id
    target: Literal["run", "tokenizer"] = "run"
    tokenizer_id: OptId = ""
    rest: list[ChainCommand] = []


class RunCancel(Base, kw_only=True, tag="run.cancel"):
    """Accepted on every command stream: sets the run's cancel flag."""

    run_id: Id


# Steps of a run's chain: each carries the rest of the chain and starts the next one itself.
ChainCommand = CorpusIngest | TokenizerTrain | ModelTrain | ModelEvaluate | ArtifactUpload
Command = ChainCommand | ModelScore | ModelGenerate | ModelChat | RunCancel
# Commands that answer under a request id (model.evaluate does when it has one).
RequestCommand = ModelEvaluate | ModelScore | ModelGenerate | ModelChat

# Which actor's stream each command goes to.
ACTOR_OF: dict[type[Base], ActorName] = {
    CorpusIngest: "ingest",
    TokenizerTrain: "tokenizer",
    ModelTrain: "trainer",
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
    "trainer": (ModelTrain, RunCancel),
    "evaluator": (ModelEvaluate, ModelScore, ModelGenerate, ModelChat, RunCancel),
    "uploader": (ArtifactUpload, RunCancel),
    "notifier": (),
}


def actor_of(cmd: Base) -> ActorName:
    return ACTOR_OF[type(cmd)]


def kind_of(cmd: Base) -> str:
    tag = type(cmd).__struct_config__.tag
    return str(tag)
