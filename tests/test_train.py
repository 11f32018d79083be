"""Token data and the training loop: learning, artifacts, best model, early stopping,
cancellation, fine-tuning, precision and config checks (tiny models, a few KB of text)."""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import replace
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from protocol.settings import ModelFamily
from tests.helpers_ml import char_tokenizer, lines, small_corpus, tiny_config, write_corpus
from trainer.checkpoint import latest_checkpoint, list_checkpoints
from trainer.config import TrainConfig, load_config
from trainer.data import IGNORE_INDEX, TokenWindows, encode_splits
from trainer.errors import UserError
from trainer.manifest import read_manifest
from trainer.model import load_model, logits, read_model_config
from trainer.report import Progress
from trainer.tokenizer import TokenizerConfig, load_tokenizer, train_tokenizer
from trainer.train import lr_factor, train

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("data")
    corpus = small_corpus(root / "corpus")
    return corpus, char_tokenizer(corpus, root / "tok")


@pytest.fixture(scope="module")
def bpe(data: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bpe")
    train_tokenizer(
        data[0], out, TokenizerConfig(tokenizer_kind="bpe", vocab_size=300, min_frequency=1)
    )
    return out


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


# ------------------------------------------------------------------------------ token data


def test_encode_splits_lines_with_eos_and_cache(data: tuple[Path, Path], tmp_path: Path) -> None:
    corpus, tok_dir = data
    tok = load_tokenizer(tok_dir)
    info = encode_splits(corpus, tok_dir, tmp_path / "tok", threads=2)
    assert info.meta.dtype == "uint16"
    val_lines = (corpus / "validation.txt").read_text().splitlines()
    expected = [i for line in val_lines for i in [*tok.encode(line), tok.eos_id]]
    got = np.fromfile(info.path("validation"), dtype=np.uint16).tolist()
    assert got == expected
    assert info.meta.tokens["train"] == len(np.fromfile(info.path("train"), dtype=np.uint16))

    mtime = info.path("train").stat().st_mtime_ns
    again = encode_splits(corpus, tok_dir, tmp_path / "tok")
    assert again == info and info.path("train").stat().st_mtime_ns == mtime  # cached

    other = write_corpus(tmp_path / "other", lines()[:5], lines()[5:6], lines()[6:7])
    (other / "validation.txt").write_text((corpus / "validation.txt").read_text())
    changed = encode_splits(other, tok_dir, tmp_path / "tok")
    assert changed.meta.tokens["train"] < info.meta.tokens["train"]  # re-encoded for the new corpus


def test_windows_order_and_padding(tmp_path: Path) -> None:
    path = tmp_path / "t.bin"
    np.arange(1, 24, dtype=np.uint16).tofile(path)  # 23 tokens -> windows of 5+1
    w = TokenWindows(path, "uint16", seq_len=5, batch_size=2, pad_id=0, seed=7)
    assert (w.num_windows, w.batches_per_epoch) == (5, 3)  # ceil(22 / 5)
    assert sorted(w.order(0).tolist()) == list(range(5))
    assert w.order(0).tolist() == TokenWindows(path, "uint16", 5, 2, 0, seed=7).order(0).tolist()
    assert w.order(0).tolist() != w.order(1).tolist() or w.order(1).tolist() != w.order(2).tolist()
    x, y = w.windows(np.array([0, 4]))
    assert x[0].tolist() == [1, 2, 3, 4, 5] and y[0].tolist() == [2, 3, 4, 5, 6]
    # Last window: tokens 21..23 -> 2 targets, then padding masked out of the loss.
    assert x[1].tolist() == [21, 22, 0, 0, 0]
    assert y[1].tolist() == [22, 23, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    seen = [i for b in range(w.batches_per_epoch) for i in w.batch(3, b)[0][:, 0].tolist()]
    assert sorted(seen) == [1, 6, 11, 16, 21]  # every window exactly once per epoch

    small = tmp_path / "s.bin"
    np.array([5, 6, 7], dtype=np.uint16).tofile(small)  # smaller than one window
    s = TokenWindows(small, "uint16", seq_len=8, batch_size=4, pad_id=0)
    assert s.num_windows == 1
    sx, sy = s.batch(0, 0)
    assert sx.tolist() == [[5, 6, 0, 0, 0, 0, 0, 0]]
    assert sy.tolist() == [[6, 7] + [IGNORE_INDEX] * 6]

    empty = tmp_path / "e.bin"
    empty.write_bytes(b"")
    e = TokenWindows(empty, "uint16", 8, 4, 0)
    assert (e.num_windows, e.eval_batches(3)) == (0, [])


def test_lr_schedule() -> None:
    f = [lr_factor(s, warmup=4, total=20, min_ratio=0.1) for s in range(20)]
    assert f[:4] == [0.2, 0.4, 0.6, 0.8] and f[4] == 1.0
    assert all(a >= b for a, b in itertools.pairwise(f[4:]))
    assert lr_factor(20, 4, 20, 0.1) == pytest.approx(0.1)


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen", "char_lstm"])
def test_family_learns_and_writes_loadable_artifacts(
    family: ModelFamily, data: tuple[Path, Path], bpe: Path, tmp_path: Path
) -> None:
    corpus, tok_dir = data
    if family == "qwen":  # transformers gives qwen2 folders its own byte-level BPE class
        tok_dir = bpe
    run = tmp_path / "run"
    seen: list[Progress] = []
    result = train(tiny_config(family, max_steps=60), corpus, tok_dir, run, on_progress=seen.append)
    assert result.status == "completed" and result.steps == 60
    assert [p.step for p in seen] == list(range(1, 61))
    # Starts near ln(vocab) and learns: the last steps are far better than the first.
    assert sum(result.losses[-5:]) / 5 < result.losses[0] - 0.6
    assert result.val_history[-1][1] < result.val_history[0][1]
    assert result.test_loss is not None and result.test_ppl is not None
    assert result.best_step == min(result.val_history, key=lambda sv: sv[1])[0]

    manifest = read_manifest(run)
    assert manifest.status == "completed" and manifest.version == 1
    assert manifest.best_step == result.best_step and manifest.steps == 60
    assert manifest.libraries["torch"]
    kinds = [json.loads(line)["kind"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert kinds.count("train") == 60 and kinds.count("val") == len(result.val_history)

    # The final model in run_dir is the best one, and reloads to identical logits.
    model, _ = load_model(run)
    best, _ = load_model(run / "best")
    x = torch.randint(0, load_tokenizer(tok_dir).vocab_size, (2, 16))
    assert torch.equal(logits(model.eval(), x), logits(best.eval(), x))
    if family == "char_lstm":
        return
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    hf = AutoModelForCausalLM.from_pretrained(str(run))  # in eval mode
    assert torch.equal(hf(input_ids=x).logits, logits(model, x))
    ours = load_tokenizer(tok_dir).encode("The river ran past the mill.")
    # transformers 5 forces its own Qwen2Tokenizer pipeline on model_type qwen2: with our
    # byte-level BPE (the only kind qwen accepts) it still gives our ids.
    for cls in (AutoTokenizer, PreTrainedTokenizerFast):
        assert cls.from_pretrained(str(run))("The river ran past the mill.")["input_ids"] == ours


def test_early_stopping_keeps_the_best_model(tmp_path: Path) -> None:
    # Validation text is the training text reversed: it improves while the model learns
    # letter frequencies, then gets worse as it learns the training text's letter order.
    ls = lines()
    corpus = write_corpus(tmp_path / "c", ls * 3, [line[::-1] for line in ls[:4]], ls[5:7])
    tok_dir = char_tokenizer(corpus, tmp_path / "tok")
    cfg = tiny_config(
        "gpt2",
        max_steps=200,
        eval_every=5,
        early_stopping_patience=2,
        checkpoint_every=5,
        keep_checkpoints=1,
    )
    result = train(cfg, corpus, tok_dir, tmp_path / "run")
    assert result.status == "early_stopped" and result.steps < 200
    vals = dict(result.val_history)
    assert result.best_step == min(vals, key=lambda s: vals[s])
    assert result.best_val_loss == vals[result.best_step] == result.val_loss
    after = [s for s in vals if s > result.best_step]
    assert len(after) == 2 and all(vals[s] >= vals[result.best_step] for s in after)
    manifest = read_manifest(tmp_path / "run")
    assert manifest.early_stopped is True and manifest.best_step == result.best_step
    # Final model = best model, not the last weights; best checkpoint kept by pruning.
    final, last = (
        weights(tmp_path / "run"),
        weights(tmp_path / "run/checkpoints" / f"step-{result.steps:08d}"),
    )
    best_ckpt = weights(tmp_path / "run/checkpoints" / f"step-{result.best_step:08d}")
    assert {p.name for p in list_checkpoints(tmp_path / "run/checkpoints")} == {
        f"step-{result.best_step:08d}",
        f"step-{result.steps:08d}",
    }
    name = "transformer.h.0.mlp.c_fc.weight"
    assert torch.equal(final[name], best_ckpt[name]) and not torch.equal(final[name], last[name])


def test_cancel_saves_a_checkpoint(data: tuple[Path, Path], tmp_path: Path) -> None:
    corpus, tok_dir = data
    calls = 0

    def stop() -> bool:
        nonlocal calls
        calls += 1
        return calls > 7

    result = train(tiny_config("char_lstm"), corpus, tok_dir, tmp_path, should_stop=stop)
    assert result.status == "cancelled" and result.steps == 7 and result.test_loss is None
    assert latest_checkpoint(tmp_path / "checkpoints") == tmp_path / "checkpoints/step-00000007"
    assert read_manifest(tmp_path).status == "cancelled"
    assert not (tmp_path / "model.safetensors").exists()  # no final artifacts


def test_finetune_from_a_run(data: tuple[Path, Path], tmp_path: Path) -> None:
    corpus, tok_dir = data
    base = tmp_path / "base"
    train(tiny_config("gpt2", max_steps=10), corpus, tok_dir, base)
    lrs: list[float] = []
    cfg = tiny_config(
        "gpt2",
        max_steps=10,
        pretrained=str(base),
        freeze_embed=True,
        learning_rate=3e-3,
        finetune_lr_cap=1e-4,
        warmup_steps=0,
    )
    result = train(cfg, corpus, tok_dir, tmp_path / "ft", on_progress=lambda p: lrs.append(p.lr))
    assert result.status == "completed" and max(lrs) == pytest.approx(1e-4)
    before, after = weights(base), weights(tmp_path / "ft")
    assert torch.equal(before["transformer.wte.weight"], after["transformer.wte.weight"])
    assert not torch.equal(
        before["transformer.h.0.mlp.c_fc.weight"], after["transformer.h.0.mlp.c_fc.weight"]
    )
    manifest = read_manifest(tmp_path / "ft")
    trainable, total = manifest.model["trainable_parameters"], manifest.model["parameters"]
    assert isinstance(trainable, int) and isinstance(total, int) and trainable < total
    assert manifest.model["pretrained"] == str(base)
    assert read_model_config(tmp_path / "ft") == replace(
        read_model_config(base), pretrained=str(base), freeze_embed=True
    )

    # A tokenizer with another vocabulary cannot fine-tune this model.
    other = write_corpus(tmp_path / "oc", ["abc abc", "cab"], ["abc"], ["cba"])
    other_tok = char_tokenizer(other, tmp_path / "otok")
    with pytest.raises(UserError, match="does not match the pretrained model's vocab size"):
        train(cfg, other, other_tok, tmp_path / "ft2")


def test_precision_on_cpu(data: tuple[Path, Path], tmp_path: Path) -> None:
    corpus, tok_dir = data
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        train(tiny_config("gpt2", precision="fp16"), corpus, tok_dir, tmp_path / "fp16")
    # bf16 when asked for, on any CPU (torch emulates it where it is not native).
    bf16 = tiny_config("llama", precision="bf16", max_steps=5)
    result = train(bf16, corpus, tok_dir, tmp_path / "bf16")
    assert result.status == "completed" and result.losses[-1] < result.losses[0]
    manifest = read_manifest(tmp_path / "bf16")
    assert manifest.precision == "bf16" and manifest.recipe is not None
    assert manifest.recipe.reason.startswith("bf16 (asked for)")


def test_divergence_is_a_user_error(data: tuple[Path, Path], tmp_path: Path) -> None:
    corpus, tok_dir = data
    # The largest learning rate the settings allow, held there, no clipping: SGD blows up.
    cfg = tiny_config(
        "gpt2",
        optimizer="sgd",
        learning_rate=1.0,
        gradient_clipping=0.0,
        warmup_steps=0,
        weight_decay=0.0,
        min_lr_ratio=1.0,
    )
    with pytest.raises(UserError, match="training diverged"):
        train(cfg, corpus, tok_dir, tmp_path)


def test_config_checks(data: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown field `learning_rat`"):
        load_config({"learning_rat": 1e-3})
    with pytest.raises(UserError, match=r"Expected `int`, got `str` - at `\$.batch_size`"):
        load_config({"batch_size": "8"})
    with pytest.raises(UserError, match=r"- at `\$.precision`"):
        load_config({"precision": "fp8"})
    with pytest.raises(UserError, match=r"Expected `int` >= 1 - at `\$.max_steps`"):
        load_config({"max_steps": 0})
    with pytest.raises(UserError, match=r"- at `\$.eval_batches`"):
        TrainConfig(eval_batches=0).validate()  # built in code: bounds checked by validate
    assert load_config({"learning_rate": 1, "max_steps": None}).learning_rate == 1.0
    assert isinstance(load_config({"learning_rate": 1}).learning_rate, float)
    cfg = TrainConfig(model_family="llama", model_size="small", threads=2)
    assert load_config(msgspec.to_builtins(cfg)) == cfg

    corpus, tok_dir = data
    train(tiny_config("char_lstm", max_steps=3), corpus, tok_dir, tmp_path)
    with pytest.raises(UserError, match=r"different training config .*learning_rate"):
        train(tiny_config("char_lstm", max_steps=3, learning_rate=1e-3), corpus, tok_dir, tmp_path)
    # threads may change between a run and its resume
    again = train(tiny_config("char_lstm", max_steps=3, threads=2), corpus, tok_dir, tmp_path)
    assert again.resumed_from_step == 3 and again.status == "completed"
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "metrics.jsonl").open()]
    assert kinds.count("train") == 3 and kinds.count("test") == 1
    torch.set_num_threads(1)
    assert os.path.exists(tmp_path / "model.safetensors")


def test_qwen_needs_a_bpe_tokenizer(data: tuple[Path, Path], tmp_path: Path) -> None:
    # transformers loads every qwen2 folder with its own byte-level tokenizer class.
    corpus, tok_dir = data  # a char tokenizer
    with pytest.raises(UserError, match="qwen models need a bpe tokenizer"):
        train(tiny_config("qwen"), corpus, tok_dir, tmp_path / "q")
