"""DDP through torch.distributed's elastic launcher (gloo on CPU): 2 processes x 1 thread
train as one process does on the same global batches, and resume bit for bit.

One launch serves every assertion (each process imports torch: seconds on this machine)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import msgspec
import pytest
import torch
from safetensors.torch import load_file

from tests.helpers_ml import char_tokenizer, small_corpus, tiny_config
from trainer.checkpoint import latest_checkpoint, read_meta
from trainer.checkpoint_names import checkpoint_name
from trainer.config import TrainConfig
from trainer.distributed import World, check_world, close_rank, init_rank, launch
from trainer.errors import UserError
from trainer.manifest import read_manifest
from trainer.train import shard, train

torch.set_num_threads(1)
# 32 batches of 4 per epoch (the last one of 3 rows: uneven shares), so 18 steps of 2
# micro-batches cross the epoch's end.
SAME: dict[str, object] = {
    "max_steps": 18,
    "grad_accum_steps": 2,
    "eval_every": 6,
    "checkpoint_every": 6,
    "keep_checkpoints": 5,
}
# Dropout on: a resume must restore every rank's generator.
RESUME: dict[str, object] = {**SAME, "dropout": 0.1, "max_steps": 12}
STOP_AT = 8  # between checkpoints: the cancel saves its own


def _rank(corpus: Path, tok: Path, out: Path) -> dict[str, object]:
    """Each process of the launch: the run to compare with one process; a resume run, whole
    and stopped then resumed; the stopped run copied for a resume on one process."""
    cfg = tiny_config("gpt2", **SAME)
    world = init_rank(cfg)
    try:
        same = train(cfg, corpus, tok, out / "two")
        whole = train(tiny_config("gpt2", **RESUME), corpus, tok, out / "whole")
        calls = 0

        def stop() -> bool:
            nonlocal calls
            calls += 1
            return calls > STOP_AT and world.rank == 1  # one rank's flag stops both

        stopped = train(
            tiny_config("gpt2", **RESUME), corpus, tok, out / "resumed", should_stop=stop
        )
        if world.leader:
            shutil.copytree(out / "resumed", out / "one-after-two")
        world.barrier()
        resumed = train(tiny_config("gpt2", **RESUME), corpus, tok, out / "resumed")
        return {
            "same": msgspec.to_builtins(same),
            "whole": msgspec.to_builtins(whole),
            "stopped": [stopped.status, stopped.steps],
            "resumed": msgspec.to_builtins(resumed),
        }
    finally:
        close_rank()


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, dict[str, object]]:
    root = tmp_path_factory.mktemp("ddp")
    corpus = small_corpus(root / "corpus")
    tok = char_tokenizer(corpus, root / "tok")
    results = launch(_rank, (corpus, tok, root), nproc=2, run_id="test-ddp", max_restarts=0)
    assert sorted(results) == [0, 1]
    return corpus, tok, root, results[0]


def test_two_processes_train_as_one(runs: tuple[Path, Path, Path, dict[str, object]]) -> None:
    corpus, tok, root, out = runs
    one = train(tiny_config("gpt2", **SAME), corpus, tok, root / "one")
    two = msgspec.convert(out["same"], type(one))
    assert two.steps == one.steps == 18 and two.tokens == one.tokens  # tokens of all ranks
    assert two.losses == pytest.approx(one.losses, rel=1e-4)
    assert [v for _, v in two.val_history] == pytest.approx(
        [v for _, v in one.val_history], rel=1e-4
    )
    last = checkpoint_name(18)
    a, b = (
        weights(root / "one" / "checkpoints" / last),
        weights(root / "two" / "checkpoints" / last),
    )
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    manifest = read_manifest(root / "two")
    assert (manifest.world_size, manifest.backend, manifest.threads) == (2, "gloo", 1)
    assert read_meta(root / "two" / "checkpoints" / last).world_size == 2
    lines = [json.loads(x) for x in (root / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "train"] == list(range(1, 19))  # rank 0 only


def test_resume_on_two_processes_is_exact(
    runs: tuple[Path, Path, Path, dict[str, object]],
) -> None:
    root, out = runs[2], runs[3]
    assert out["stopped"] == ["cancelled", STOP_AT]
    whole, resumed = out["whole"], out["resumed"]
    assert isinstance(whole, dict) and isinstance(resumed, dict)
    assert resumed["resumed_from_step"] == STOP_AT
    assert resumed["losses"] == whole["losses"] and resumed["val_history"] == whole["val_history"]
    last = checkpoint_name(12)
    a = weights(root / "whole" / "checkpoints" / last)
    b = weights(root / "resumed" / "checkpoints" / last)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_on_another_world_size_goes_on_from_the_step(
    runs: tuple[Path, Path, Path, dict[str, object]],
) -> None:
    corpus, tok, root, _ = runs
    run = root / "one-after-two"
    ckpt = latest_checkpoint(run / "checkpoints")
    assert ckpt is not None and read_meta(ckpt).world_size == 2
    result = train(tiny_config("gpt2", **RESUME), corpus, tok, run)
    assert (result.status, result.resumed_from_step, result.steps) == ("completed", STOP_AT, 12)


def test_shares_of_a_batch() -> None:
    x = torch.arange(12).view(3, 4)
    y = x.clone()
    y[2, 2:] = -100  # padding: 10 targets in all
    first = shard(x, y, World(rank=0, size=2), batch_size=4)
    second = shard(x, y, World(rank=1, size=2), batch_size=4)
    assert first[0].tolist() == x[:2].tolist() and first[2] == pytest.approx(1 / 10)
    assert second[0].tolist() == x[2:].tolist() and second[2] == pytest.approx(1 / 10)
    # The short last batch of an epoch may leave a rank without rows: one row, no weight.
    empty = shard(x[:1], y[:1], World(rank=1, size=2), batch_size=4)
    assert empty[0].shape == (1, 4) and empty[2] == 0.0


def test_batch_size_must_divide_among_the_processes() -> None:
    with pytest.raises(UserError, match="batch_size 6 must be a multiple of the world size 4"):
        check_world(TrainConfig(batch_size=6), 4)
    check_world(TrainConfig(batch_size=6), 3)
