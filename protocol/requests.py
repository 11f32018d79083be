"""Bodies of the control endpoint's POST routes: they validate requests and generate the
OpenAPI schema. Field names follow the Model-Trainer API the Discord bot already speaks."""

from __future__ import annotations

from typing import Literal

import msgspec

from protocol.commands import (
    Accum,
    BatchSize,
    ChatMessage,
    Clip,
    Decay,
    Device,
    Dropout,
    Epochs,
    Every,
    FileId,
    Fraction,
    MinFrequency,
    ModelFamily,
    ModelSize,
    Name,
    NewTokens,
    OptId,
    Optimizer,
    PathText,
    Patience,
    Precision,
    PromptText,
    Rate,
    ScoreText,
    ScoreTopK,
    Seed,
    SeqLen,
    Sequences,
    Steps,
    StopList,
    Temperature,
    Threads,
    TokenizerKind,
    TopK,
    TopP,
    UserId,
    VocabSize,
    Warmup,
)


class CorpusFields(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Where the text comes from: exactly one of corpus_path / corpus_name / corpus_file_id."""

    corpus_path: PathText = ""
    corpus_name: Name = ""
    corpus_file_id: FileId = ""
    lowercase: bool = False
    holdout_fraction: Fraction = 0.1
    test_split_ratio: Fraction = 0.1
    seed: Seed = 1337
    user_id: UserId = 0


class TokenizerFields(CorpusFields, kw_only=True, forbid_unknown_fields=True):
    tokenizer_kind: TokenizerKind = "bpe"
    vocab_size: VocabSize = 4096
    min_frequency: MinFrequency = 2
    spm_model_type: Literal["unigram", "bpe"] = "unigram"


class TokenizerTrainRequest(TokenizerFields, kw_only=True, forbid_unknown_fields=True):
    pass


class TrainRequest(TokenizerFields, kw_only=True, forbid_unknown_fields=True):
    """POST /runs/train. An empty tokenizer_id trains a byte-level BPE tokenizer in the run."""

    tokenizer_id: OptId = ""
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
    freeze_embed: bool = False
    finetune_lr_cap: Rate | None = None
    device: Device = "auto"
    precision: Precision = "auto"
    threads: Threads = 0
    upload: bool = True


class EvaluateRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    split: Literal["validation", "test"] = "test"
    path: PathText = ""
    user_id: UserId = 0


class ScoreRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    text: ScoreText
    detail: bool = False
    top_k: ScoreTopK = 5
    user_id: UserId = 0


class SamplingFields(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    max_new_tokens: NewTokens = 64
    temperature: Temperature = 0.8
    top_k: TopK = 50
    top_p: TopP = 1.0
    seed: Seed = 0
    user_id: UserId = 0


class GenerateRequest(SamplingFields, kw_only=True, forbid_unknown_fields=True):
    prompt: PromptText = ""
    stop: StopList = []
    num_return_sequences: Sequences = 1
    stop_on_eos: bool = True  # eos ends a line of the corpus: off, it becomes a newline


class ChatRequest(SamplingFields, kw_only=True, forbid_unknown_fields=True):
    message: ChatMessage
    session_id: OptId = ""


class RunCreated(msgspec.Struct, kw_only=True):
    run_id: str
    job_id: str
    corpus_id: str
    tokenizer_id: str
    steps: list[str]
