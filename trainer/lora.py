"""LoRA fine-tuning through peft: low-rank adapters on a pretrained gpt2/llama/qwen model.

With `lora_r > 0` the loaded model is wrapped by peft (get_peft_model): its own weights are
frozen and only the adapters' A/B matrices train. The wrapped model is what the loop trains
and checkpoints (its whole state dict, so resume stays exact). Saving a model folder writes
the merged model (W + alpha/r * B @ A, in plain transformers layers, so
`AutoModelForCausalLM.from_pretrained(dir)` loads the fine-tuned model as it does any run's)
and the adapter alone in dir/adapter/ (peft's adapter_config.json + adapter_model.safetensors,
for `PeftModel.from_pretrained(base, dir/adapter)`).

The merge is done on a deep copy: peft merges in place, and merging then unmerging the
training model changes its floats, which would break bitwise exact resume.
"""

from __future__ import annotations

import copy
import shutil
import sys
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from protocol.settings import ModelFamily
from trainer.config import TrainConfig
from trainer.errors import FieldError
from trainer.model import ModelConfig, save_model

if TYPE_CHECKING:  # peft imports transformers: only where a LoRA model is built
    from peft import LoraConfig, PeftModel

ADAPTER_DIR = "adapter"
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
# Every linear layer of the blocks (attention and MLP), as the QLoRA paper found best; the
# embeddings and the (tied) LM head stay as they were.
DEFAULT_TARGETS: dict[ModelFamily, tuple[str, ...]] = {
    "gpt2": ("c_attn", "c_proj", "c_fc"),  # c_proj: the attention's and the MLP's
    "llama": _ATTENTION + _MLP,
    "qwen": _ATTENTION + _MLP,
}


def target_modules(cfg: TrainConfig) -> list[str]:
    """The modules that get adapters: the ones asked for, else the family's default."""
    if cfg.lora_target_modules:
        return list(cfg.lora_target_modules)
    return list(DEFAULT_TARGETS[cfg.model_family])


def describe(cfg: TrainConfig) -> dict[str, object]:
    """What the manifest records of a LoRA run (nothing for a full one)."""
    if not cfg.lora_r:
        return {}
    return {
        "lora": {
            "r": cfg.lora_r,
            "alpha": cfg.lora_alpha,
            "dropout": cfg.lora_dropout,
            "target_modules": target_modules(cfg),
        }
    }


def _lora_config(cfg: TrainConfig) -> LoraConfig:
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=target_modules(cfg),
        # gpt2's layers are transformers' Conv1D, which stores its weight as (in, out).
        fan_in_fan_out=cfg.model_family == "gpt2",
        bias="none",
        task_type="CAUSAL_LM",
    )


def wrap(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """The model with LoRA adapters; only they train. The A matrices are drawn from torch's
    global RNG (B starts at zero, so the wrapped model starts equal to the base)."""
    from peft import get_peft_model

    linear = [name for name, m in model.named_modules() if _is_linear(m)]
    # peft's rule for a plain name: the module's name, or the end of its dotted path.
    missing = [
        t for t in target_modules(cfg) if not any(n == t or n.endswith("." + t) for n in linear)
    ]
    if missing:
        known = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise FieldError(
            "lora_target_modules",
            f"no linear layer of this {cfg.model_family} model is named {', '.join(missing)}; "
            f"its linear layers are {', '.join(known)}",
        )
    with warnings.catch_warnings():
        # peft reads transformers 5's deprecated is_gradient_checkpointing: noise in the logs.
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated")
        peft_model: nn.Module = get_peft_model(model, _lora_config(cfg))
    return peft_model


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"  # transformers' Conv1D


def is_lora(model: nn.Module) -> bool:
    # A model can only be peft's if peft was imported: a full run never imports it.
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def save(model: nn.Module, cfg: ModelConfig, out: Path) -> None:
    """save_model of what model computes into out; for a LoRA model, the merged model and
    its adapter in out/adapter/."""
    if not is_lora(model):
        save_model(model, cfg, out)
        return
    peft_model = _as_peft(model)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    save_model(merged, cfg, out)
    # save_embedding_layers off: "auto" may look the base model up on the hub.
    peft_model.save_pretrained(str(out / ADAPTER_DIR), save_embedding_layers=False)


def _as_peft(model: nn.Module) -> PeftModel:
    from peft import PeftModel

    assert isinstance(model, PeftModel)
    return model


def copy_adapter(src_dir: Path, dst_dir: Path) -> None:
    """dst_dir/adapter/ made a copy of src_dir/adapter/ (removed where src_dir has none)."""
    src, dst = src_dir / ADAPTER_DIR, dst_dir / ADAPTER_DIR
    tmp = dst_dir / f".{ADAPTER_DIR}.tmp-{uuid.uuid4().hex[:8]}"
    if src.is_dir():
        shutil.copytree(src, tmp)
    shutil.rmtree(dst, ignore_errors=True)
    if src.is_dir():
        tmp.rename(dst)
