"""Model families: gpt2, llama, qwen (transformers configs) and char_lstm (our own module).

Every family is built from ONE size table (SIZES) plus optional per-dimension overrides,
trained from scratch or fine-tuned from an earlier run dir / a local HF model dir, and
saved so that it loads back bit for bit: HF families with save_pretrained (safetensors,
so `AutoModelForCausalLM.from_pretrained(dir)` works), char_lstm in a small versioned
safetensors format of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

import msgspec
import torch
from torch import nn

from protocol.settings import ModelFamily, ModelSize
from trainer.errors import UserError
from trainer.jsonfile import dumps, from_json, load_json, read_json

if TYPE_CHECKING:  # transformers costs seconds to import: only where a model is built
    from transformers import PretrainedConfig, PreTrainedModel

FAMILIES: tuple[ModelFamily, ...] = get_args(ModelFamily)
SIZE_NAMES: tuple[ModelSize, ...] = get_args(ModelSize)

# n_layer / n_embd / n_head everywhere; llama and qwen add grouped-query kv heads and the
# MLP width (~2.7x, rounded to a multiple of 16); char_lstm has an embedding and a hidden width.
SIZES: dict[ModelFamily, dict[ModelSize, dict[str, int]]] = {
    "gpt2": {
        "tiny": {"n_layer": 4, "n_embd": 256, "n_head": 4},
        "small": {"n_layer": 12, "n_embd": 768, "n_head": 12},  # the real GPT-2 small
        "medium": {"n_layer": 24, "n_embd": 1024, "n_head": 16},
        "large": {"n_layer": 36, "n_embd": 1280, "n_head": 20},
    },
    "llama": {
        "tiny": {"n_layer": 4, "n_embd": 256, "n_head": 4, "n_kv_head": 2, "intermediate": 688},
        "small": {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_kv_head": 4, "intermediate": 2048},
        "medium": {
            "n_layer": 24,
            "n_embd": 1024,
            "n_head": 16,
            "n_kv_head": 8,
            "intermediate": 2816,
        },
    },
    "qwen": {
        "tiny": {"n_layer": 4, "n_embd": 256, "n_head": 4, "n_kv_head": 2, "intermediate": 688},
        "small": {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_kv_head": 4, "intermediate": 2048},
        "medium": {
            "n_layer": 24,
            "n_embd": 1024,
            "n_head": 16,
            "n_kv_head": 8,
            "intermediate": 2816,
        },
    },
    "char_lstm": {
        "tiny": {"n_layer": 2, "n_embd": 128, "hidden": 256},
        "small": {"n_layer": 3, "n_embd": 256, "hidden": 512},
        "medium": {"n_layer": 3, "n_embd": 512, "hidden": 1024},
    },
}

CHAR_LSTM_FORMAT = "mt-char-lstm"
CHAR_LSTM_VERSION = 1
MT_MODEL_FILE = "mt_model.json"  # our ModelConfig next to an HF model's own config.json
MT_MODEL_VERSION = 1
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", MT_MODEL_FILE)
_HF_MODEL_TYPES: dict[str, ModelFamily] = {"gpt2": "gpt2", "llama": "llama", "qwen2": "qwen"}


@dataclass
class ModelConfig:
    family: ModelFamily
    size: ModelSize = "tiny"
    vocab_size: int = 4096
    max_seq_len: int = 256
    dropout: float = 0.0  # 0 for from-scratch pre-training of small models (faster, usual)
    pad_id: int = 0
    bos_id: int = 2
    eos_id: int = 3
    pretrained: str | None = None  # earlier run dir or local HF model dir; size is then ignored
    freeze_embed: bool = False
    # Replace entries of the size table (e.g. {"n_layer": 2}); a label-free custom size.
    overrides: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class CharLSTMDims(msgspec.Struct):
    n_layer: int
    n_embd: int
    hidden: int


class CharLSTMFile(msgspec.Struct, kw_only=True):
    """config.json of a char_lstm model dir."""

    version: int = CHAR_LSTM_VERSION
    format: Literal["mt-char-lstm"] = "mt-char-lstm"
    vocab_size: int
    dims: CharLSTMDims
    config: ModelConfig


class MtModelFile(msgspec.Struct, kw_only=True):
    """mt_model.json: our ModelConfig beside an HF model's own config.json."""

    version: int = MT_MODEL_VERSION
    format: Literal["mt-model"] = "mt-model"
    config: ModelConfig


class _ConfigHead(msgspec.Struct):
    """Enough of any config.json to tell ours (char_lstm) from a transformers one."""

    format: str | None = None


class HFConfig(msgspec.Struct):
    """What we read of a transformers config.json (gpt2 and llama/qwen2 keys)."""

    model_type: str | None = None
    vocab_size: int = 0
    n_positions: int = 1024
    resid_pdrop: float = 0.0
    n_layer: int = 0
    n_embd: int = 0
    n_head: int = 0
    max_position_embeddings: int = 2048
    attention_dropout: float = 0.0
    num_hidden_layers: int = 0
    hidden_size: int = 0
    num_attention_heads: int = 0
    num_key_value_heads: int | None = None
    intermediate_size: int = 0
    # Some models list several eos ids or none; ours are plain ints with our defaults.
    pad_token_id: int | list[int] | None = None
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None


def model_dims(cfg: ModelConfig) -> dict[str, int]:
    """The size-table entry for (family, size) with cfg.overrides applied."""
    table = SIZES.get(cfg.family)
    if table is None:
        raise UserError(f"unknown model family {cfg.family!r}; choose one of {FAMILIES}")
    if cfg.size not in table:
        raise UserError(
            f"size {cfg.size!r} does not exist for {cfg.family}; choose one of {tuple(table)}"
        )
    dims = dict(table[cfg.size])
    unknown = set(cfg.overrides) - set(dims)
    if unknown:
        raise UserError(f"unknown {cfg.family} dimensions in overrides: {sorted(unknown)}")
    dims.update(cfg.overrides)
    if any(v < 1 for v in dims.values()):
        raise UserError(f"model dimensions must be positive: {dims}")
    if "n_head" in dims and dims["n_embd"] % dims["n_head"]:
        raise UserError(f"n_embd {dims['n_embd']} is not divisible by n_head {dims['n_head']}")
    if "n_kv_head" in dims and dims["n_head"] % dims["n_kv_head"]:
        raise UserError(
            f"n_head {dims['n_head']} is not divisible by n_kv_head {dims['n_kv_head']}"
        )
    return dims


class CharLSTM(nn.Module):
    """Embedding -> multi-layer LSTM -> linear: a next-character model."""

    def __init__(
        self, vocab_size: int, n_embd: int, hidden: int, n_layer: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.dims = {"n_layer": n_layer, "n_embd": n_embd, "hidden": hidden}
        self.embed = nn.Embedding(vocab_size, n_embd)
        self.drop = nn.Dropout(dropout)
        # nn.LSTM applies its dropout between layers only, hence the extra Dropout around it.
        self.lstm = nn.LSTM(
            n_embd,
            hidden,
            num_layers=n_layer,
            batch_first=True,
            dropout=dropout if n_layer > 1 else 0.0,
        )
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.drop(self.embed(input_ids)))
        out: torch.Tensor = self.head(self.drop(h))
        return out

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed


def _hf() -> None:
    # Saving/loading prints per-shard progress bars: noise in a worker's logs.
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # untyped in transformers


def _as_hf(model: nn.Module) -> PreTrainedModel:
    from transformers import PreTrainedModel

    assert isinstance(model, PreTrainedModel), f"not a transformers model: {type(model)}"
    return model


def _dropout_kwargs(family: ModelFamily, p: float) -> dict[str, float]:
    if family == "gpt2":
        return {"resid_pdrop": p, "embd_pdrop": p, "attn_pdrop": p}
    return {"attention_dropout": p}  # llama/qwen have dropout in attention only


def hf_config(cfg: ModelConfig) -> PretrainedConfig:
    """The transformers config for an HF family (vocab and special ids from our tokenizer)."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    d = model_dims(cfg)
    p = cfg.dropout
    if cfg.family == "gpt2":
        # GPT2Config defaults bos/eos to 50256: always set them from our tokenizer.
        return GPT2Config(
            vocab_size=cfg.vocab_size,
            n_positions=cfg.max_seq_len,
            n_embd=d["n_embd"],
            n_layer=d["n_layer"],
            n_head=d["n_head"],
            resid_pdrop=p,
            embd_pdrop=p,
            attn_pdrop=p,
            bos_token_id=cfg.bos_id,
            eos_token_id=cfg.eos_id,
            pad_token_id=cfg.pad_id,
        )
    if cfg.family in ("llama", "qwen"):
        klass = LlamaConfig if cfg.family == "llama" else Qwen2Config
        # Tied input/output embeddings: at these sizes the embedding is a large share of
        # the parameters (Llama 3.2 1B and Qwen2 0.5B tie theirs too).
        return klass(
            vocab_size=cfg.vocab_size,
            hidden_size=d["n_embd"],
            intermediate_size=d["intermediate"],
            num_hidden_layers=d["n_layer"],
            num_attention_heads=d["n_head"],
            num_key_value_heads=d["n_kv_head"],
            max_position_embeddings=cfg.max_seq_len,
            attention_dropout=p,
            tie_word_embeddings=True,
            bos_token_id=cfg.bos_id,
            eos_token_id=cfg.eos_id,
            pad_token_id=cfg.pad_id,
        )
    raise UserError(f"{cfg.family} is not a transformers family")


def build_model(cfg: ModelConfig) -> nn.Module:
    """A fresh model from the size table, or cfg.pretrained loaded for fine-tuning.

    Weights are initialised from torch's global RNG: seed before calling.
    """
    if cfg.vocab_size < 1:
        raise UserError(f"vocab_size must be positive, got {cfg.vocab_size}")
    if cfg.max_seq_len < 1:
        raise UserError(f"max_seq_len must be positive, got {cfg.max_seq_len}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise UserError(f"dropout must be in [0, 1), got {cfg.dropout}")
    model = _load_pretrained(cfg) if cfg.pretrained is not None else BUILDERS[cfg.family](cfg)
    if cfg.freeze_embed:
        freeze_input_embeddings(model)
    return model


def _build_hf(cfg: ModelConfig) -> nn.Module:
    _hf()
    from transformers import AutoModelForCausalLM

    # sdpa: torch's fused attention kernels (flash/memory-efficient where the device has them).
    model: nn.Module = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]  # untyped in transformers
        hf_config(cfg), dtype=torch.float32, attn_implementation="sdpa"
    )
    return model


def _build_char_lstm(cfg: ModelConfig) -> nn.Module:
    d = model_dims(cfg)
    return CharLSTM(cfg.vocab_size, d["n_embd"], d["hidden"], d["n_layer"], cfg.dropout)


BUILDERS: dict[ModelFamily, Callable[[ModelConfig], nn.Module]] = {
    "gpt2": _build_hf,
    "llama": _build_hf,
    "qwen": _build_hf,
    "char_lstm": _build_char_lstm,
}


def _load_pretrained(cfg: ModelConfig) -> nn.Module:
    assert cfg.pretrained is not None
    src = Path(cfg.pretrained)
    if not (src / "config.json").is_file():
        raise UserError(f"pretrained model {src} not found (no config.json there)")
    model, pcfg = load_model(src, dropout=cfg.dropout)
    if pcfg.family != cfg.family:
        raise UserError(
            f"pretrained model {src} is a {pcfg.family} model, but family {cfg.family} was asked"
        )
    n_vocab = input_embedding(model).num_embeddings
    if n_vocab != cfg.vocab_size:
        raise UserError(
            f"tokenizer vocab size {cfg.vocab_size} does not match the pretrained model's "
            f"vocab size {n_vocab}; fine-tune with the tokenizer the model was trained with"
        )
    if cfg.family != "char_lstm" and cfg.max_seq_len > pcfg.max_seq_len:
        raise UserError(
            f"max_seq_len {cfg.max_seq_len} exceeds the pretrained model's {pcfg.max_seq_len}"
        )
    return model.float()


def input_embedding(model: nn.Module) -> nn.Embedding:
    emb = model.embed if isinstance(model, CharLSTM) else _as_hf(model).get_input_embeddings()
    assert isinstance(emb, nn.Embedding)
    return emb


def freeze_input_embeddings(model: nn.Module) -> None:
    """Stop training the token embedding.

    gpt2 (and our llama/qwen configs) tie the input embedding to the output projection:
    it is one tensor, so freezing it freezes the LM head too. We accept that rather than
    untie, because untying would silently turn the pretrained model into a different one
    (and double its embedding parameters).
    """
    input_embedding(model).weight.requires_grad_(False)


def logits(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """[B, T] token ids -> [B, T, V] next-token logits, for every family.

    attention_mask (1 = real token) only matters for padded batches of HF models; the
    LSTM reads left to right, so padding at the end cannot change the real positions.
    """
    base = getattr(model, "_orig_mod", model)  # torch.compile wraps the module
    base = getattr(base, "module", base)  # and DDP (trainer.distributed) too
    out: torch.Tensor
    if isinstance(base, CharLSTM):
        out = model(input_ids)
    else:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return out


def save_model(model: nn.Module, cfg: ModelConfig, out_dir: Path) -> None:
    """Write the model into out_dir (created): config.json + model.safetensors."""
    from safetensors.torch import save_model as save_safetensors

    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(model, CharLSTM):
        meta = CharLSTMFile(
            vocab_size=model.embed.num_embeddings,
            dims=msgspec.convert(model.dims, CharLSTMDims),
            config=cfg,
        )
        save_safetensors(model, str(out_dir / "model.safetensors"))
        (out_dir / "config.json").write_text(dumps(meta))
        return
    _hf()
    _as_hf(model).save_pretrained(str(out_dir))
    (out_dir / MT_MODEL_FILE).write_text(dumps(MtModelFile(config=cfg)))


def _read_config_json(src: Path) -> CharLSTMFile | HFConfig:
    path = src / "config.json"
    try:
        raw = load_json(path)
    except OSError as e:
        raise UserError(f"no readable model config in {src}: {e}") from e
    if from_json(raw, _ConfigHead, path).format == CHAR_LSTM_FORMAT:
        return from_json(raw, CharLSTMFile, path, CHAR_LSTM_VERSION)
    return from_json(raw, HFConfig, path)


def _hf_family(src: Path, meta: HFConfig) -> ModelFamily:
    family = _HF_MODEL_TYPES.get(str(meta.model_type))
    if family is None:
        raise UserError(
            f"{src} holds a {meta.model_type!r} model; supported: {sorted(_HF_MODEL_TYPES)}"
        )
    return family


def read_model_config(src: Path) -> ModelConfig:
    """The ModelConfig of a saved model dir, from its config files only (no weights)."""
    meta = _read_config_json(src)
    if isinstance(meta, CharLSTMFile):
        return meta.config
    family = _hf_family(src, meta)
    mt = src / MT_MODEL_FILE
    if mt.is_file():
        return read_json(mt, MtModelFile, MT_MODEL_VERSION).config
    return _config_from_hf(family, meta)


def load_model(src: Path, dropout: float | None = None) -> tuple[nn.Module, ModelConfig]:
    """Load a model saved by save_model, or any local gpt2/llama/qwen2 HF model dir.

    dropout replaces the saved dropout probability (e.g. to fine-tune with another one).
    """
    cfg = read_model_config(src)
    if dropout is not None:
        cfg.dropout = dropout
    meta = _read_config_json(src)
    if isinstance(meta, CharLSTMFile):
        return _load_char_lstm(src, meta, cfg), cfg
    _hf()
    from transformers import AutoModelForCausalLM

    family = _hf_family(src, meta)
    kwargs: dict[str, float] = {} if dropout is None else _dropout_kwargs(family, dropout)
    model = AutoModelForCausalLM.from_pretrained(
        str(src), local_files_only=True, attn_implementation="sdpa", **kwargs
    )
    return model, cfg


def _config_from_hf(family: ModelFamily, c: HFConfig) -> ModelConfig:
    """A ModelConfig describing a foreign HF model (its config.json): exact dims in overrides."""
    if family == "gpt2":
        dims = {"n_layer": c.n_layer, "n_embd": c.n_embd, "n_head": c.n_head}
        seq, dropout = c.n_positions, c.resid_pdrop
    else:
        dims = {
            "n_layer": c.num_hidden_layers,
            "n_embd": c.hidden_size,
            "n_head": c.num_attention_heads,
            "n_kv_head": c.num_attention_heads
            if c.num_key_value_heads is None
            else c.num_key_value_heads,
            "intermediate": c.intermediate_size,
        }
        seq, dropout = c.max_position_embeddings, c.attention_dropout
    # With every dimension in overrides the size name is only a label.
    return ModelConfig(
        family=family,
        size="small",
        vocab_size=c.vocab_size,
        max_seq_len=seq,
        dropout=dropout,
        pad_id=_token_id(c.pad_token_id, 0),
        bos_id=_token_id(c.bos_token_id, 2),
        eos_id=_token_id(c.eos_token_id, 3),
        overrides=dims,
    )


def _token_id(value: int | list[int] | None, default: int) -> int:
    return value if isinstance(value, int) else default


def _load_char_lstm(src: Path, meta: CharLSTMFile, cfg: ModelConfig) -> nn.Module:
    from safetensors.torch import load_model as load_safetensors

    d = meta.dims
    model = CharLSTM(meta.vocab_size, d.n_embd, d.hidden, d.n_layer, cfg.dropout)
    load_safetensors(model, str(src / "model.safetensors"))
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
