"""Bodies of the control endpoint's POST routes: they validate requests and generate the
OpenAPI schema. Field names follow the Model-Trainer API the Discord bot already speaks."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from protocol.commands import (
    Device,
    Fraction,
    ModelFamily,
    ModelSize,
    OptId,
    Optimizer,
    Precision,
    PromptText,
    Seed,
    TokenizerKind,
    UserId,
)

Path = Annotated[str, Meta(max_length=1024)]


class CorpusFields(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Where the text comes from: exactly one of corpus_path / corpus_name / corpus_file_id."""

    corpus_path: Path = ""
    corpus_name: Annotated[str, Meta(max_length=64)] = ""
    corpus_file_id: Annotated[str, Meta(max_length=128)] = ""
    lowercase: bool = False
    holdout_fraction: Fraction = 0.1
    test_split_ratio: Fraction = 0.1
    seed: Seed = 1337
    user_id: UserId = 0


class TokenizerFields(CorpusFields, kw_only=True, forbid_unknown_fields=True):
    tokenizer_kind: TokenizerKind = "bpe"
    vocab_size: Annotated[int, Meta(ge=16, le=200_000)] = 4096
    min_frequency: Annotated[int, Meta(ge=1, le=1_000_000)] = 2
    spm_model_type: Literal["unigram", "bpe"] = "unigram"


class TokenizerTrainRequest(TokenizerFields, kw_only=True, forbid_unknown_fields=True):
    pass


class TrainRequest(TokenizerFields, kw_only=True, forbid_unknown_fields=True):
    """POST /runs/train. An empty tokenizer_id trains a byte-level BPE tokenizer in the run."""

    tokenizer_id: OptId = ""
    model_family: ModelFamily = "gpt2"
    model_size: ModelSize = "tiny"
    max_seq_len: Annotated[int, Meta(ge=8, le=8192)] = 256
    num_epochs: Annotated[int, Meta(ge=1, le=1000)] = 1
    max_steps: Annotated[int, Meta(ge=1, le=10_000_000)] | None = None
    batch_size: Annotated[int, Meta(ge=1, le=4096)] = 8
    learning_rate: Annotated[float, Meta(gt=0.0, le=1.0)] = 3e-4
    optimizer: Optimizer = "adamw"
    weight_decay: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.1
    warmup_steps: Annotated[int, Meta(ge=0, le=1_000_000)] = 20
    gradient_clipping: Annotated[float, Meta(ge=0.0, le=1000.0)] = 1.0
    grad_accum_steps: Annotated[int, Meta(ge=1, le=1024)] = 1
    dropout: Annotated[float, Meta(ge=0.0, le=0.9)] = 0.0
    eval_every: Annotated[int, Meta(ge=1, le=1_000_000)] = 100
    checkpoint_every: Annotated[int, Meta(ge=1, le=1_000_000)] = 100
    early_stopping_patience: Annotated[int, Meta(ge=1, le=1000)] | None = None
    pretrained_run_id: OptId = ""
    freeze_embed: bool = False
    finetune_lr_cap: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    device: Device = "auto"
    precision: Precision = "auto"
    threads: Annotated[int, Meta(ge=0, le=256)] = 0
    upload: bool = True


class EvaluateRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    split: Literal["validation", "test"] = "test"
    path: Path = ""
    user_id: UserId = 0


class ScoreRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    text: Annotated[str, Meta(min_length=1, max_length=100_000)]
    detail: bool = False
    top_k: Annotated[int, Meta(ge=0, le=50)] = 5
    user_id: UserId = 0


class SamplingFields(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    max_new_tokens: Annotated[int, Meta(ge=1, le=2048)] = 64
    temperature: Annotated[float, Meta(ge=0.0, le=5.0)] = 0.8
    top_k: Annotated[int, Meta(ge=0, le=100_000)] = 50
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] = 1.0
    seed: Seed = 0
    user_id: UserId = 0


class GenerateRequest(SamplingFields, kw_only=True, forbid_unknown_fields=True):
    prompt: PromptText = ""
    stop: Annotated[
        list[Annotated[str, Meta(min_length=1, max_length=64)]], Meta(max_length=8)
    ] = []
    num_return_sequences: Annotated[int, Meta(ge=1, le=8)] = 1
    stop_on_eos: bool = True  # eos ends a line of the corpus: off, it becomes a newline


class ChatRequest(SamplingFields, kw_only=True, forbid_unknown_fields=True):
    message: Annotated[str, Meta(min_length=1, max_length=4000)]
    session_id: OptId = ""


class RunCreated(msgspec.Struct, kw_only=True):
    run_id: str
    job_id: str
    corpus_id: str
    tokenizer_id: str
    steps: list[str]
