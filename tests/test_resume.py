"""Exact resume: a run stopped at a checkpoint and resumed in a new process ends with
bit-identical weights and the same loss curve as a run never stopped (CPU)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from protocol.settings import ModelFamily
from tests.helpers_ml import char_tokenizer, same_weights, small_corpus, tiny_config, train_curve
from trainer.checkpoint_names import LATEST, checkpoint_name
from trainer.manifest import read_manifest
from trainer.train import train

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
# Dropout on, so the resumed run must restore the RNG; accumulation and a shuffled multi-
# epoch order, so it must restore the data position; warmup + cosine, so the schedule.
CHANGES: dict[str, object] = {
    "max_steps": 40,
    "dropout": 0.1,
    "grad_accum_steps": 2,
    "eval_every": 7,
    "checkpoint_every": 10,
    "keep_checkpoints": 10,
    "warmup_steps": 5,
    # Samples at each validation (short: they only have to be there) must not change a thing.
    "sample_count": 2,
    "sample_tokens": 4,
}
FAMILIES: tuple[ModelFamily, ...] = ("gpt2", "llama", "char_lstm")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("data")
    corpus = small_corpus(root / "corpus", repeat=2)
    return corpus, char_tokenizer(corpus, root / "tok")


def stop_after(steps: int) -> Callable[[], bool]:
    """A should_stop that cancels the run after this many steps (asked once a step)."""
    calls = 0

    def stop() -> bool:
        nonlocal calls
        calls += 1
        return calls > steps

    return stop


# Runs, in a fresh process, each named config (tiny_config's family + overrides) on the
# run folder tmp/<name>-b, and prints what each run reports.
RESUME_SCRIPT = """
import json, sys
from pathlib import Path
from tests.helpers_ml import tiny_config
from trainer.train import train
corpus, tok, tmp, configs, cache = sys.argv[1:6]
out = {}
for name, c in json.loads(configs).items():
    r = train(tiny_config(c.pop("family"), **c), Path(corpus), Path(tok), Path(tmp) / f"{name}-b",
              cache_dir=Path(cache) if cache else None)
    out[name] = [r.status, r.resumed_from_step, r.losses, r.val_history, r.test_loss]
print(json.dumps(out))
"""


def resume_in_new_process(
    data: tuple[Path, Path],
    tmp_path: Path,
    configs: dict[str, dict[str, object]],
    cache: Path | None = None,
) -> dict[str, list[object]]:
    corpus, tok_dir = data
    args = [str(corpus), str(tok_dir), str(tmp_path), json.dumps(configs), str(cache or "")]
    proc = subprocess.run(
        [sys.executable, "-c", RESUME_SCRIPT, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out: dict[str, list[object]] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def test_resume_in_a_new_process_is_exact(data: tuple[Path, Path], tmp_path: Path) -> None:
    corpus, tok_dir = data
    uninterrupted = {
        f: train(tiny_config(f, **CHANGES), corpus, tok_dir, tmp_path / f"{f}-a") for f in FAMILIES
    }
    for family in FAMILIES:
        cfg = tiny_config(family, **CHANGES)
        first = train(cfg, corpus, tok_dir, tmp_path / f"{family}-b", should_stop=stop_after(13))
        assert first.status == "cancelled" and first.steps == 13

    configs: dict[str, dict[str, object]] = {f: {"family": f, **CHANGES} for f in FAMILIES}
    resumed = resume_in_new_process(data, tmp_path, configs)
    for family, a in uninterrupted.items():
        status, from_step, losses, val_history, test_loss = resumed[family]
        assert (status, from_step) == ("completed", 13)
        assert losses == a.losses and len(a.losses) == 40  # the whole curve, bit for bit
        assert isinstance(val_history, list)
        assert [tuple(v) for v in val_history] == a.val_history
        assert test_loss == a.test_loss
        run_a, run_b = tmp_path / f"{family}-a", tmp_path / f"{family}-b"
        assert same_weights(run_a, run_b)  # final (best) model
        last = checkpoint_name(40)
        assert same_weights(run_a / "checkpoints" / last, run_b / "checkpoints" / last)
        assert same_weights(run_a / "best", run_b / "best")
        assert train_curve(run_a) == train_curve(run_b)


def test_resume_after_a_crash_redoes_the_lost_steps(
    data: tuple[Path, Path], tmp_path: Path
) -> None:
    """A run killed after step 27 (last checkpoint 20) leaves metrics and best/ from steps
    past its checkpoint; the resumed run redoes them and ends exactly as a clean run."""
    corpus, tok_dir = data
    clean = train(tiny_config("gpt2", **CHANGES), corpus, tok_dir, tmp_path / "clean")
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "clean", crashed)
    for step in (30, 40):
        shutil.rmtree(crashed / "checkpoints" / checkpoint_name(step))
    (crashed / "checkpoints" / LATEST).write_text(checkpoint_name(20) + "\n")
    for name in ("model.safetensors", "manifest.json"):
        (crashed / name).unlink()
    metrics = (crashed / "metrics.jsonl").read_text().splitlines()
    cut = [line for line in metrics if json.loads(line)["step"] <= 27]
    (crashed / "metrics.jsonl").write_text("\n".join(cut) + '\n{"kind": "tra')  # torn line

    resumed = train(tiny_config("gpt2", **CHANGES), corpus, tok_dir, crashed)
    assert resumed.resumed_from_step == 20
    assert resumed.losses == clean.losses and resumed.val_history == clean.val_history
    assert same_weights(crashed, tmp_path / "clean")
    assert train_curve(crashed) == train_curve(tmp_path / "clean")


# A run's recipe is kept across a resume; bf16 and a compiled run resume exactly too.
RECIPES: dict[str, dict[str, object]] = {
    "bf16": {"precision": "bf16", "compile": "off"},
    "compiled": {"precision": "fp32", "compile": "on"},
}


def test_resume_is_exact_in_bf16_and_compiled(data: tuple[Path, Path], tmp_path: Path) -> None:
    corpus, tok_dir = data
    cache = tmp_path / "cache"  # the inductor cache: the resumed process compiles from it
    uninterrupted = {
        name: train(
            tiny_config("gpt2", **CHANGES, **r),
            corpus,
            tok_dir,
            tmp_path / f"{name}-a",
            cache_dir=cache,
        )
        for name, r in RECIPES.items()
    }
    for name, r in RECIPES.items():
        first = train(
            tiny_config("gpt2", **CHANGES, **r),
            corpus,
            tok_dir,
            tmp_path / f"{name}-b",
            should_stop=stop_after(13),
            cache_dir=cache,
        )
        assert first.status == "cancelled" and first.steps == 13
    configs = {name: {"family": "gpt2", **CHANGES, **r} for name, r in RECIPES.items()}
    resumed = resume_in_new_process(data, tmp_path, configs, cache)
    for name, a in uninterrupted.items():
        status, from_step, losses, *_ = resumed[name]
        assert (status, from_step) == ("completed", 13)
        assert losses == a.losses
        assert same_weights(tmp_path / f"{name}-a", tmp_path / f"{name}-b")
        manifest = read_manifest(tmp_path / f"{name}-b")
        assert manifest.recipe is not None
        assert (manifest.precision, manifest.compile) == (
            RECIPES[name]["precision"],
            RECIPES[name]["compile"] == "on",
        )
