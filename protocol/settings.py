"""The user-facing knobs, each written once: its type, bounds, default and doc.

One Struct per group: corpus, tokenizer, training, sampling. The commands (protocol.commands)
and the HTTP bodies (protocol.requests) are built from them, the command line's flags and TOML
keys (protocol.flags), /openapi.json and the dashboard's form defaults are derived from them,
and trainer/ extends them with its internal knobs, so that a run submitted over HTTP, from the
CLI, by a raw XADD or through `python -m trainer` resolves to the same configuration.

A Struct may have only one base with fields, so a command is `class X(Settings, Base)` with
`Base` field-less (see protocol.commands). Field names are the wire names; never rename one.
"""

from __future__ import annotations

from typing import Annotated, Literal, TypeVar

import msgspec
from msgspec import Meta

from protocol.errors import FieldError

Id = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")]
OptId = Annotated[str, Meta(pattern=r"^([A-Za-z0-9][A-Za-z0-9_.:-]{0,127})?$")]
PathText = Annotated[str, Meta(max_length=1024)]

TokenizerKind = Literal["bpe", "sentencepiece", "char"]
SpmModelType = Literal["unigram", "bpe"]
ModelFamily = Literal["gpt2", "llama", "qwen", "char_lstm"]
ModelSize = Literal["tiny", "small", "medium", "large"]
Optimizer = Literal["adamw", "adam", "sgd"]
Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Compile = Literal["auto", "on", "off"]
# How a corpus file is read (trainer/formats.py); auto = from its name (a folder: its files',
# or a Hugging Face `save_to_disk` folder by its state.json / dataset_info.json).
CorpusFormat = Literal["auto", "text", "jsonl", "json", "csv", "tsv", "parquet", "hf"]
FieldName = Annotated[str, Meta(min_length=1, max_length=256)]

# Knobs that more than one group has (the flat HTTP body feeds one value to each).
Seed = Annotated[int, Meta(ge=0, le=2**32 - 1, description="random seed")]
Threads = Annotated[int, Meta(ge=0, le=256, description="CPU threads; 0 = all cores")]
DEFAULT_SEED = 1337

Fraction = Annotated[float, Meta(ge=0.01, le=0.5)]
# The least a kind can have (char: the 4 specials + 1) and the most; bpe needs 260 or more
# (TokenizerSettings.check).
VocabSize = Annotated[int, Meta(ge=5, le=200_000, description="tokenizer vocabulary size")]
MinFrequency = Annotated[
    int, Meta(ge=1, le=1_000_000, description="a merge/piece needs this many occurrences")
]
SeqLen = Annotated[int, Meta(ge=8, le=8192, description="context length in tokens")]
Epochs = Annotated[int, Meta(ge=1, le=1000, description="passes over the train split")]
Steps = Annotated[int, Meta(ge=1, le=10_000_000, description="optimizer steps; overrides epochs")]
BatchSize = Annotated[int, Meta(ge=1, le=4096, description="sequences per micro-batch")]
Rate = Annotated[float, Meta(gt=0.0, le=1.0)]
Decay = Annotated[float, Meta(ge=0.0, le=1.0, description="AdamW weight decay (matrices only)")]
Warmup = Annotated[int, Meta(ge=0, le=1_000_000, description="linear warmup steps before cosine")]
Clip = Annotated[float, Meta(ge=0.0, le=1000.0, description="max gradient norm; 0 = off")]
Accum = Annotated[int, Meta(ge=1, le=1024, description="micro-batches per optimizer step")]
Dropout = Annotated[float, Meta(ge=0.0, le=0.9, description="dropout; 0 suits pre-training")]
Every = Annotated[int, Meta(ge=1, le=1_000_000)]
Procs = Annotated[
    int,
    Meta(
        ge=0,
        le=1024,
        description="training processes per machine (DDP); 0 = auto: one per GPU, else 1",
    ),
]
Nodes = Annotated[int, Meta(ge=1, le=1024, description="machines that train the run together")]
Restarts = Annotated[
    int, Meta(ge=0, le=100, description="restarts of a failed process group from its checkpoint")
]
Patience = Annotated[
    int, Meta(ge=1, le=1000, description="stop after this many validations without gain")
]
SampleCount = Annotated[
    int, Meta(ge=0, le=8, description="samples the model writes at each validation; 0 = off")
]
SampleTokens = Annotated[
    int, Meta(ge=1, le=256, description="tokens of each validation sample (sampling is seeded)")
]
NewTokens = Annotated[int, Meta(ge=1, le=2048, description="tokens to generate")]
Temperature = Annotated[float, Meta(ge=0.0, le=5.0, description="0 = greedy")]
TopK = Annotated[int, Meta(ge=0, le=100_000, description="sample from the k likeliest; 0 = off")]
TopP = Annotated[float, Meta(gt=0.0, le=1.0, description="nucleus sampling mass")]
Sequences = Annotated[int, Meta(ge=1, le=8, description="how many continuations")]
# A module's name, or the end of its dotted path (peft matches `c_proj` in `h.0.attn.c_proj`).
ModuleName = Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_.]{0,127}$")]
# The families LoRA can adapt (peft wraps the transformers models' linear layers).
LORA_FAMILIES: tuple[ModelFamily, ...] = ("gpt2", "llama", "qwen")
StopList = Annotated[
    list[Annotated[str, Meta(min_length=1, max_length=64)]],
    Meta(max_length=8, description="stop at any of these strings"),
]


class CorpusSettings(msgspec.Struct, kw_only=True):
    """How ingest normalizes and splits a corpus (deterministic by seed)."""

    lowercase: Annotated[bool, Meta(description="lowercase the text at ingest")] = False
    validation_fraction: Annotated[Fraction, Meta(description="share of lines held out")] = 0.1
    test_fraction: Annotated[Fraction, Meta(description="share of lines for the test split")] = 0.1
    seed: Seed = DEFAULT_SEED
    corpus_format: Annotated[
        CorpusFormat,
        Meta(description="how to read the corpus files; auto = from their names (.gz/.zst too)"),
    ] = "auto"
    text_field: Annotated[
        FieldName, Meta(description="the field (jsonl/json/hf) or column (csv/tsv/parquet) of text")
    ] = "text"

    def check(self) -> None:
        """The rules across fields (bounds are the types'); FieldError names the field."""
        if self.validation_fraction + self.test_fraction >= 1.0:
            raise FieldError(
                "test_fraction",
                f"validation_fraction + test_fraction must be below 1 so that some text is "
                f"left to train on, got {self.validation_fraction} + {self.test_fraction}",
            )


# The 4 special tokens every kind has (<pad>, <unk>, <bos>, <eos>).
SPECIAL_TOKEN_COUNT = 4
# The least vocabulary of each kind: bpe's 256 byte symbols and the specials must fit; a char
# vocabulary needs one character; sentencepiece room for a few pieces.
MIN_VOCAB: dict[TokenizerKind, int] = {
    "bpe": 256 + SPECIAL_TOKEN_COUNT,
    "sentencepiece": 16,
    "char": SPECIAL_TOKEN_COUNT + 1,
}


class TokenizerSettings(msgspec.Struct, kw_only=True):
    tokenizer_kind: Annotated[TokenizerKind, Meta(description="byte-level BPE, SP or chars")] = (
        "bpe"
    )
    vocab_size: VocabSize = 4096
    min_frequency: MinFrequency = 2
    spm_model_type: Annotated[SpmModelType, Meta(description="sentencepiece's model type")] = (
        "unigram"
    )
    threads: Threads = 0

    def check(self) -> None:
        """The rules across fields (bounds are the types'); FieldError names the field."""
        least = MIN_VOCAB[self.tokenizer_kind]
        if self.vocab_size < least:
            raise FieldError(
                "vocab_size",
                f"a {self.tokenizer_kind} tokenizer needs vocab_size {least} or more, "
                f"got {self.vocab_size}",
            )


class TrainSettings(msgspec.Struct, kw_only=True):
    model_family: ModelFamily = "gpt2"
    model_size: ModelSize = "tiny"
    max_seq_len: SeqLen = 256
    num_epochs: Epochs = 1
    max_steps: Steps | None = None
    batch_size: BatchSize = 8
    learning_rate: Annotated[Rate, Meta(description="peak learning rate")] = 3e-4
    optimizer: Optimizer = "adamw"
    weight_decay: Decay = 0.1
    warmup_steps: Warmup = 20
    gradient_clipping: Clip = 1.0
    grad_accum_steps: Accum = 1
    dropout: Dropout = 0.0
    eval_every: Annotated[Every, Meta(description="validate every N steps (and each epoch)")] = 100
    checkpoint_every: Annotated[Every, Meta(description="checkpoint every N steps")] = 100
    early_stopping_patience: Patience | None = None
    sample_count: SampleCount = 2
    sample_tokens: SampleTokens = 32
    pretrained_run_id: Annotated[OptId, Meta(description="fine-tune this run's model")] = ""
    pretrained_path: Annotated[
        PathText, Meta(description="fine-tune a local HF model folder under the data dir")
    ] = ""
    freeze_embed: Annotated[bool, Meta(description="keep the embeddings fixed")] = False
    finetune_lr_cap: Annotated[Rate, Meta(description="lr cap when fine-tuning")] | None = None
    lora_r: Annotated[
        int, Meta(ge=0, le=1024, description="LoRA rank when fine-tuning; 0 = train every weight")
    ] = 0
    lora_alpha: Annotated[
        int, Meta(ge=1, le=4096, description="LoRA scale: updates are scaled by alpha / r")
    ] = 16
    lora_dropout: Annotated[Dropout, Meta(description="dropout on the LoRA path")] = 0.0
    lora_target_modules: Annotated[
        list[ModuleName],
        Meta(max_length=32, description="modules given adapters; empty = the family's default"),
    ] = []
    device: Device = "auto"
    precision: Annotated[
        Precision, Meta(description="auto = the faster of fp32/bf16, measured on this machine")
    ] = "auto"
    compile: Annotated[
        Compile, Meta(description="torch.compile; auto = when measured to pay back in this run")
    ] = "auto"
    threads: Threads = 0
    # One run on several processes or machines: DDP through torch.distributed's elastic
    # launcher; threads are shared out among the processes of a machine.
    nproc_per_node: Procs = 0
    nnodes: Nodes = 1
    max_restarts: Restarts = 2
    seed: Seed = DEFAULT_SEED

    def check(self) -> None:
        """The rules across fields (bounds are the types'); FieldError names the field."""
        if self.pretrained_run_id and self.pretrained_path:
            raise FieldError(
                "pretrained_path", "give pretrained_run_id or pretrained_path, not both"
            )
        if self.precision == "fp16" and self.device == "cpu":
            raise FieldError(
                "precision", "fp16 needs a CUDA GPU; on CPU use fp32 (or bf16 where supported)"
            )
        if self.lora_r:
            if self.model_family not in LORA_FAMILIES:
                raise FieldError(
                    "lora_r",
                    f"LoRA adapts {', '.join(LORA_FAMILIES)} models, not {self.model_family}; "
                    "set lora_r to 0",
                )
            if not self.fine_tunes():
                raise FieldError(
                    "lora_r",
                    "LoRA fine-tunes a trained model: give pretrained_run_id or pretrained_path "
                    "(or set lora_r to 0)",
                )
        elif self.lora_target_modules:
            raise FieldError("lora_target_modules", "target modules need LoRA on (lora_r > 0)")

    def fine_tunes(self) -> bool:
        """Whether the run starts from a trained model rather than from scratch."""
        return bool(self.pretrained_run_id or self.pretrained_path)


class SamplingSettings(msgspec.Struct, kw_only=True):
    """How generate and chat sample from a model."""

    max_new_tokens: NewTokens = 64
    temperature: Temperature = 0.8
    top_k: TopK = 50
    top_p: TopP = 1.0
    seed: Seed = 0


class GenerateSettings(SamplingSettings, kw_only=True):
    stop: StopList = []
    num_return_sequences: Sequences = 1
    # eos ends a line of the corpus: off, generation runs on past it as a newline.
    stop_on_eos: Annotated[bool, Meta(description="stop at the end of a line")] = True


S = TypeVar("S", bound=msgspec.Struct)
Checked = CorpusSettings | TokenizerSettings | TrainSettings


def check(settings: msgspec.Struct) -> None:
    """The cross-field rules of settings (or of a command that carries them), if they have
    any; raises FieldError naming the field."""
    if isinstance(settings, Checked):
        settings.check()


def checked(settings: S) -> S:
    """Settings built in code skip validation: check them against their bounds here.

    Raises msgspec.ValidationError naming the field."""
    return msgspec.convert(msgspec.to_builtins(settings), type(settings))


def with_fields(typ: type[S], settings: msgspec.Struct, **fields: object) -> S:
    """A Struct of type typ holding these settings and fields, validated as decoded ones are
    (a command that carries settings, or settings extended by more)."""
    return msgspec.convert({**msgspec.structs.asdict(settings), **fields}, typ)
