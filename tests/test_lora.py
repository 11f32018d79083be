"""LoRA fine-tuning (trainer.lora): only the adapters train, the base weights stay bit for bit,
the run saves the merged model (loaded by AutoModelForCausalLM as any run's) and the adapter
(loaded by peft onto the base, the same model), a LoRA run resumes exactly, and LoRA asked
for where it cannot work is a FieldError naming the field (tiny models, a few KB of text)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
import torch
from safetensors.torch import load_file

import trainer.train
from protocol.errors import FieldError
from protocol.requests import TrainRequest, decode_flat
from protocol.settings import ModelFamily, TrainSettings
from tests.helpers_ml import char_tokenizer, lines, small_corpus, tiny_config, write_corpus
from trainer.__main__ import _parser as trainer_parser
from trainer.__main__ import train_config as trainer_train_config
from trainer.checkpoint_names import checkpoint_name
from trainer.config import TrainConfig
from trainer.lora import ADAPTER_DIR
from trainer.manifest import read_manifest
from trainer.model import logits
from trainer.train import train

torch.set_num_threads(1)
LORA: dict[str, object] = {"lora_r": 8, "lora_alpha": 16, "learning_rate": 1e-2}


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


class Data(msgspec.Struct, frozen=True):
    corpus: Path  # the text the base models learn
    new: Path  # new text for the fine-tunes: the same lines written backwards
    tok: Path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Data:
    root = tmp_path_factory.mktemp("data")
    corpus = small_corpus(root / "corpus")
    backwards = [line[::-1] for line in lines()]
    new = write_corpus(root / "new", backwards * 3, backwards[3:5], backwards[9:11])
    return Data(corpus=corpus, new=new, tok=char_tokenizer(corpus, root / "tok"))


@pytest.fixture(scope="module")
def base_of(data: Data, tmp_path_factory: pytest.TempPathFactory) -> Callable[[ModelFamily], Path]:
    """A small model of the family trained on the corpus (once per family)."""
    made: dict[ModelFamily, Path] = {}

    def get(family: ModelFamily) -> Path:
        if family not in made:
            run = tmp_path_factory.mktemp(f"base-{family}")
            train(tiny_config(family, max_steps=60), data.corpus, data.tok, run)
            made[family] = run
        return made[family]

    return get


def _unwrapped(name: str) -> str:
    """A peft-wrapped model's weight name as the base model calls it."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
# peft's PeftModel reads transformers 5's deprecated is_gradient_checkpointing.
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_lora_trains_the_adapter_only_and_saves_it_merged(
    family: ModelFamily, data: Data, base_of: Callable[[ModelFamily], Path], tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = base_of(family)
    run = tmp_path / "run"
    cfg = tiny_config(family, max_steps=30, pretrained=str(base), **LORA)
    result = train(cfg, data.new, data.tok, run)
    assert result.status == "completed"
    # The first step's loss is the base model's on the new text (B starts at zero).
    assert sum(result.losses[-5:]) / 5 < result.losses[0] - 0.2
    assert result.val_history[-1][1] < result.val_history[0][1]

    # Only the adapters trained: every base weight is bitwise the base model's.
    base_w, ckpt = weights(base), weights(run / "checkpoints" / checkpoint_name(30))
    embed = "transformer.wte.weight" if family == "gpt2" else "model.embed_tokens.weight"
    # The tied embedding and LM head are one tensor, which safetensors saves under one name.
    tied = {"lm_head.weight": embed}
    frozen = {
        tied.get(n, n): v for k, v in ckpt.items() if "lora_" not in k for n in [_unwrapped(k)]
    }
    assert frozen.keys() == base_w.keys()
    assert all(torch.equal(v, base_w[k]) for k, v in frozen.items())
    adapter = load_file(str(run / ADAPTER_DIR / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert all(v.any() for k, v in adapter.items() if "lora_B" in k)  # B left zero: untrained
    manifest = read_manifest(run)
    n_adapter = sum(v.numel() for v in adapter.values())
    assert manifest.model["trainable_parameters"] == n_adapter
    assert manifest.model["lora"] == {
        "r": 8,
        "alpha": 16,
        "dropout": 0.0,
        "target_modules": ["c_attn", "c_proj", "c_fc"]
        if family == "gpt2"
        else ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    }
    assert manifest.config["lora_r"] == 8
    assert (run / "best" / ADAPTER_DIR / "adapter_config.json").is_file()

    # The run folder holds the merged model: transformers loads it as any run's, and it
    # computes what the base with the saved adapter computes.
    merged = AutoModelForCausalLM.from_pretrained(str(run))
    with_adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(base)), str(run / ADAPTER_DIR)
    ).eval()
    x = torch.randint(0, 30, (2, 16))
    with torch.no_grad():
        got, expected = logits(merged, x), logits(with_adapter, x)
        before = logits(AutoModelForCausalLM.from_pretrained(str(base)), x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert (got - before).abs().max() > 1e-2  # and not what the base computes
    merged_w = weights(run)
    assert torch.equal(merged_w[embed], base_w[embed])  # no adapter there

    if family == "gpt2":  # a module the model lacks is named, with those it has
        bad = tiny_config(
            family, max_steps=1, pretrained=str(base), lora_r=2, lora_target_modules=["q_proj"]
        )
        with pytest.raises(FieldError, match=r"lora_target_modules: .*q_proj.*c_attn"):
            train(bad, data.new, data.tok, tmp_path / "bad")


def test_a_lora_run_resumes_exactly_with_its_probed_recipe(
    data: Data,
    base_of: Callable[[ModelFamily], Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Dropout on both paths, accumulation, warmup: the resumed LoRA run must restore the
    RNG, the data position, the schedule and the adapters' optimizer state. The recipe probe
    measures the LoRA model (a shape of its own) and the resumed run keeps its choice."""
    monkeypatch.setattr(trainer.train, "PROBE_MIN_STEPS", 1)
    cfg = tiny_config(
        "gpt2",
        pretrained=str(base_of("gpt2")),
        **LORA,
        lora_dropout=0.1,
        dropout=0.1,
        max_steps=20,
        grad_accum_steps=2,
        eval_every=7,
        checkpoint_every=10,
        keep_checkpoints=10,
        precision="auto",
    )
    cache = tmp_path / "cache"  # the second run decides from the first's measurements
    a = train(cfg, data.new, data.tok, tmp_path / "a", cache_dir=cache)
    calls = 0

    def stop() -> bool:
        nonlocal calls
        calls += 1
        return calls > 13

    first = train(cfg, data.new, data.tok, tmp_path / "b", should_stop=stop, cache_dir=cache)
    assert first.status == "cancelled" and first.steps == 13
    b = train(cfg, data.new, data.tok, tmp_path / "b", cache_dir=cache)
    assert (b.status, b.resumed_from_step) == ("completed", 13)
    assert b.losses == a.losses and b.val_history == a.val_history and b.test_loss == a.test_loss
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    for sub in ("", "best", ADAPTER_DIR, f"checkpoints/{checkpoint_name(20)}"):
        name = "adapter_model.safetensors" if sub == ADAPTER_DIR else "model.safetensors"
        wa, wb = load_file(str(run_a / sub / name)), load_file(str(run_b / sub / name))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), sub
    recipe = read_manifest(run_a).recipe
    assert recipe is not None and recipe.measured and "'lora'" in recipe.shape
    assert read_manifest(run_b).recipe == msgspec.structs.replace(recipe, measured=False)


def test_lora_where_it_cannot_work_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(FieldError, match="lora_r: LoRA fine-tunes a trained model") as e:
        TrainSettings(lora_r=8).check()
    assert e.value.field == "lora_r"
    char_lstm = TrainSettings(lora_r=8, model_family="char_lstm", pretrained_run_id="r0")
    with pytest.raises(FieldError, match="lora_r: LoRA adapts gpt2, llama, qwen models, not char"):
        char_lstm.check()
    with pytest.raises(FieldError, match=r"lora_target_modules: .*lora_r > 0"):
        TrainSettings(lora_target_modules=["c_attn"]).check()
    TrainSettings(lora_r=8, pretrained_path="models/base").check()  # fine
    # Over HTTP (and the CLI, TOML), the flat body names the field.
    with pytest.raises(msgspec.ValidationError, match=r"LoRA fine-tunes .* - at `\$\.lora_r`"):
        decode_flat({"corpus_name": "x", "lora_r": 8}, TrainRequest)
    with pytest.raises(msgspec.ValidationError, match=r"- at `\$\.lora_r`"):
        decode_flat({"corpus_name": "x", "lora_r": -1}, TrainRequest)
    # The library's config: `pretrained` (a resolved folder) is what a fine-tune needs.
    with pytest.raises(FieldError, match="lora_r: LoRA fine-tunes"):
        tiny_config("gpt2", lora_r=4)
    with pytest.raises(FieldError, match="lora_r: LoRA adapts"):
        tiny_config("char_lstm", lora_r=4, pretrained=str(tmp_path))
    # python -m trainer takes the list of modules as a repeated flag.
    args = trainer_parser().parse_args(
        [
            *("train", "--corpus", "c", "--tokenizer", "t", "--out", "o"),
            *("--pretrained", "p", "--lora-r", "4", "--lora-target-modules", "c_attn"),
            *("--lora-target-modules", "c_fc"),
        ]
    )
    cfg = trainer_train_config(args)
    assert cfg == TrainConfig(pretrained="p", lora_r=4, lora_target_modules=["c_attn", "c_fc"])
