"""Small corpora, tokenizers and configs shared by the ML tests (models, training, resume)."""

from __future__ import annotations

import json
from pathlib import Path

from protocol.settings import ModelFamily
from trainer.config import TrainConfig, load_config
from trainer.tokenizer import TokenizerConfig, train_tokenizer

# Plain English prose written for these tests: real words and sentences, so that a small
# model has something to learn (frequent letters, common words, line structure).
TEXT = """\
The river ran past the old mill, and the miller's daughter watched it from the window.
Every morning she counted the boats that came down from the hills with wood and wool.
Her father said the river was older than the town and would outlive every house in it.
In the spring the water rose and the meadow turned into a wide and shining lake.
The children of the town sailed little boats of bark and paper across the flooded grass.
When summer came the river grew slow and green, and the fish hid under the stones.
The miller ground wheat and barley, and the sacks of flour stood in rows by the door.
Travellers stopped at the mill to ask the way, and the daughter drew them little maps.
She knew every road and every bridge, and which fords were safe after a heavy rain.
One autumn a stranger came with a book of songs and stayed until the first snow.
He sang of ships and islands, of kings who lost their crowns and found them again.
The town listened in the evenings, and the miller forgot to close the sluice gate.
The water turned the great wheel all night long, and the stones ground nothing at all.
In the morning the stranger was gone, but the songs stayed in the town for many years.
The daughter wrote them down in a blue notebook and taught them to the children.
Long after the mill had stopped, people still sang by the river on summer nights.
"""


def lines() -> list[str]:
    return [line for line in TEXT.splitlines() if line]


def write_corpus(root: Path, train: list[str], validation: list[str], test: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("validation", validation), ("test", test)):
        (root / f"{name}.txt").write_text("".join(f"{line}\n" for line in part))
    return root


def small_corpus(root: Path, repeat: int = 3) -> Path:
    """Train on the text repeated (learnable in a few dozen steps); hold out two lines."""
    ls = lines()
    return write_corpus(root, ls * repeat, ls[3:5], ls[9:11])


def char_tokenizer(corpus_dir: Path, out_dir: Path) -> Path:
    train_tokenizer(corpus_dir, out_dir, TokenizerConfig(tokenizer_kind="char", min_frequency=1))
    return out_dir


TINY_DIMS: dict[ModelFamily, dict[str, int]] = {
    "gpt2": {"n_layer": 1, "n_embd": 32, "n_head": 2},
    "llama": {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_kv_head": 1, "intermediate": 64},
    "qwen": {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_kv_head": 1, "intermediate": 64},
    "char_lstm": {"n_layer": 1, "n_embd": 16, "hidden": 32},
}


def tiny_config(family: ModelFamily, **changes: object) -> TrainConfig:
    """size "tiny" shrunk further through model_overrides, seq 32, batch 4, one thread."""
    base: dict[str, object] = {
        "model_family": family,
        "model_size": "tiny",
        "model_overrides": dict(TINY_DIMS[family]),
        "max_seq_len": 32,
        "batch_size": 4,
        "max_steps": 30,
        "learning_rate": 3e-3,
        "warmup_steps": 3,
        "eval_every": 10,
        "eval_batches": 4,
        "checkpoint_every": 10,
        "threads": 1,
        "device": "cpu",
        "precision": "fp32",
    }
    base.update(changes)
    return load_config(base)


def same_weights(a: Path, b: Path) -> bool:
    """Two run folders hold bitwise the same weights."""
    import torch
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def train_curve(run_dir: Path) -> list[tuple[str, int, float]]:
    """(kind, step, loss) of every line of metrics.jsonl: what a stray writer would change."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out.append((r["kind"], r["step"], r.get("loss", r.get("val_loss", r.get("test_loss")))))
    return out
