"""Model families: size table, build, save/load round trips, pretrained checks, precision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from protocol.settings import ModelFamily
from tests.helpers_ml import TINY_DIMS
from trainer.errors import UserError
from trainer.model import (
    FAMILIES,
    SIZES,
    CharLSTM,
    ModelConfig,
    build_model,
    count_parameters,
    input_embedding,
    load_model,
    logits,
    model_dims,
    save_model,
)
from trainer.train import cpu_supports_bf16, precision_candidates, resolve_device

torch.set_num_threads(1)
VOCAB = 50


def tiny(family: ModelFamily, **changes: object) -> ModelConfig:
    cfg = ModelConfig(
        family=family,
        size="tiny",
        vocab_size=VOCAB,
        max_seq_len=16,
        overrides=dict(TINY_DIMS[family]),
    )
    for k, v in changes.items():
        setattr(cfg, k, v)
    return cfg


def test_size_table() -> None:
    assert SIZES["gpt2"]["small"] == {"n_layer": 12, "n_embd": 768, "n_head": 12}
    assert SIZES["gpt2"]["medium"] == {"n_layer": 24, "n_embd": 1024, "n_head": 16}
    assert SIZES["gpt2"]["large"] == {"n_layer": 36, "n_embd": 1280, "n_head": 20}
    assert SIZES["gpt2"]["tiny"] == {"n_layer": 4, "n_embd": 256, "n_head": 4}
    for family in FAMILIES:
        assert {"tiny", "small", "medium"} <= set(SIZES[family])
        assert ("large" in SIZES[family]) == (family == "gpt2")
    for family in ("llama", "qwen"):
        t = SIZES[family]["tiny"]
        assert 2.5 <= t["intermediate"] / t["n_embd"] <= 2.8
        assert t["n_head"] % t["n_kv_head"] == 0 and t["n_kv_head"] < t["n_head"]
    with pytest.raises(UserError, match="size 'large' does not exist for llama"):
        model_dims(ModelConfig(family="llama", size="large"))
    with pytest.raises(UserError, match="unknown gpt2 dimensions"):
        model_dims(ModelConfig(family="gpt2", overrides={"n_kv_head": 1}))
    with pytest.raises(UserError, match="not divisible"):
        model_dims(ModelConfig(family="gpt2", overrides={"n_embd": 30, "n_head": 4}))


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen"])
def test_real_tiny_size_builds(family: ModelFamily) -> None:
    from transformers import PreTrainedModel

    model = build_model(ModelConfig(family=family, size="tiny", vocab_size=512, max_seq_len=64))
    assert isinstance(model, PreTrainedModel)
    c = model.config
    layers = c.n_layer if family == "gpt2" else c.num_hidden_layers
    width = c.n_embd if family == "gpt2" else c.hidden_size
    assert (layers, width) == (4, 256)
    # GPT2Config would default bos/eos to 50256: ours come from the tokenizer.
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (2, 3, 0)
    assert c.vocab_size == 512
    assert 2_000_000 < count_parameters(model) < 6_000_000
    # torch's fused scaled-dot-product attention, not transformers' eager matmuls.
    assert c._attn_implementation == "sdpa"


def test_char_lstm_tiny_is_a_real_lstm() -> None:
    model = build_model(ModelConfig(family="char_lstm", size="tiny", vocab_size=80))
    assert isinstance(model, CharLSTM)
    assert (model.lstm.num_layers, model.lstm.hidden_size) == (2, 256)
    out = logits(model, torch.randint(0, 80, (2, 7)))
    assert out.shape == (2, 7, 80)
    # Causal: changing a later token does not change earlier logits.
    x = torch.randint(0, 80, (1, 7))
    y = x.clone()
    y[0, 5] = (y[0, 5] + 1) % 80
    model.eval()
    assert torch.equal(logits(model, x)[0, :5], logits(model, y)[0, :5])


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen", "char_lstm"])
def test_save_load_round_trip(family: ModelFamily, tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = tiny(family)
    model = build_model(cfg).eval()
    x = torch.randint(0, VOCAB, (2, 12))
    before = logits(model, x)
    assert before.shape == (2, 12, VOCAB)
    save_model(model, cfg, tmp_path / "m")
    loaded, loaded_cfg = load_model(tmp_path / "m")
    assert loaded_cfg == cfg
    assert torch.equal(logits(loaded.eval(), x), before)
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    if family == "char_lstm":
        assert (meta["format"], meta["version"]) == ("mt-char-lstm", 1)
    else:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"))
        assert not hf.training  # from_pretrained returns the model in eval mode
        assert torch.equal(hf(input_ids=x).logits, before)
        assert (meta["bos_token_id"], meta["eos_token_id"]) == (2, 3)


def test_char_lstm_format_version_checked(tmp_path: Path) -> None:
    cfg = tiny("char_lstm")
    save_model(build_model(cfg), cfg, tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["version"] = 2
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="format version 2"):
        load_model(tmp_path)


def test_pretrained_checks(tmp_path: Path) -> None:
    cfg = tiny("gpt2")
    save_model(build_model(cfg), cfg, tmp_path / "base")
    with pytest.raises(UserError, match=r"vocab size 60 does not match .* vocab size 50"):
        build_model(tiny("gpt2", vocab_size=60, pretrained=str(tmp_path / "base")))
    with pytest.raises(UserError, match="is a gpt2 model, but family llama"):
        build_model(tiny("llama", pretrained=str(tmp_path / "base")))
    with pytest.raises(UserError, match="exceeds the pretrained model's 16"):
        build_model(tiny("gpt2", max_seq_len=64, pretrained=str(tmp_path / "base")))
    with pytest.raises(UserError, match="not found"):
        build_model(tiny("gpt2", pretrained=str(tmp_path / "nowhere")))
    # A foreign HF dir (no mt_model.json): described from its own config.json.
    (tmp_path / "base" / "mt_model.json").unlink()
    _, described = load_model(tmp_path / "base")
    assert described.family == "gpt2" and model_dims(described) == TINY_DIMS["gpt2"]
    assert (described.vocab_size, described.max_seq_len) == (VOCAB, 16)


def test_freeze_embed_freezes_the_tied_tensor() -> None:
    from transformers import GPT2LMHeadModel

    model = build_model(tiny("gpt2", freeze_embed=True))
    assert isinstance(model, GPT2LMHeadModel)
    emb = input_embedding(model)
    assert not emb.weight.requires_grad
    assert model.lm_head.weight is emb.weight  # tied: the LM head is the same tensor
    assert any(p.requires_grad for p in model.parameters())


def test_bf16_detection() -> None:
    assert cpu_supports_bf16("AVX512", {"avx512f", "avx512_bf16"})
    assert cpu_supports_bf16("AMX", {"amx_bf16"})
    assert not cpu_supports_bf16("AVX2", {"avx2", "avx512_bf16"})
    assert not cpu_supports_bf16("AVX512", {"avx512f"})
    assert not cpu_supports_bf16("DEFAULT", set())


def test_precision_rules() -> None:
    cpu = torch.device("cpu")
    # auto is measured (trainer.recipe) between these, the safe default first.
    assert precision_candidates("auto", cpu) == ["fp32", "bf16"]
    assert precision_candidates("fp32", cpu) == ["fp32"]
    # Asked for, bf16 is allowed whatever the CPU flags say: only a measurement tells.
    assert precision_candidates("bf16", cpu) == ["bf16"]
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        precision_candidates("fp16", cpu)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            resolve_device("cuda")
        assert resolve_device("auto").type == "cpu"
