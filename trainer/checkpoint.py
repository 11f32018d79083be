"""Training checkpoints: everything a resumed run needs to continue bit for bit.

checkpoints/step-00000200/
    model.safetensors   the weights (safetensors: shared/tied tensors stored once)
    state.pt            optimizer, scheduler, grad scaler and RNG states; tensors, numbers and
                        lists only, so torch.load(weights_only=True) reads it
    trainer.json        CheckpointMeta: format version, TrainState (step, data position, best
                        val loss, patience counter, the per-step loss history), the run's
                        config and the fingerprint of the data it trains on
checkpoints/latest      the name of the newest complete checkpoint

A checkpoint is written into a temp dir and renamed into place, then `latest` is replaced
(temp file + rename): a crash at any moment leaves the previous checkpoint usable.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np
import torch
from torch import nn

from trainer.checkpoint_names import LATEST, META, checkpoint_name, latest_name, name_step
from trainer.jsonfile import dumps, read_json
from trainer.recipe import Recipe

CHECKPOINT_VERSION = 1


class TrainState(msgspec.Struct, kw_only=True):
    step: int = 0  # optimizer steps done
    micro_step: int = 0  # batches consumed; data position = divmod(micro_step, batches/epoch)
    epoch: int = 0  # data position, for people reading trainer.json
    batch_index: int = 0
    tokens: int = 0
    train_time_s: float = 0.0  # time spent in training steps, across resumes
    best_val_loss: float = math.inf
    best_step: int | None = None
    bad_evals: int = 0  # validations since the last improvement (early stopping patience)
    early_stopped: bool = False
    losses: list[float] = []  # train loss of every step
    val_history: list[tuple[int, float]] = []  # (step, val loss)


class CheckpointMeta(msgspec.Struct, kw_only=True):
    """trainer.json: the train state and the facts checked on resume."""

    version: int = CHECKPOINT_VERSION
    state: TrainState
    config: dict[str, object]  # the run's training config
    data_fingerprint: str  # TokenDataInfo.fingerprint: the corpus + tokenizer trained on
    # The precision and compile the run chose at its start: a resumed run keeps them, since
    # its maths must not change halfway (None: saved before recipes were recorded).
    recipe: Recipe | None = None
    # The processes that trained it (DDP). TrainState's data position counts global batches,
    # so a run resumes on any number of them from the same step; with as many as saved it
    # continues bit for bit (state.pt holds every rank's RNG under "rng_ranks").
    world_size: int = 1


def rng_state() -> dict[str, object]:
    """Python, numpy, torch CPU (and CUDA) generator states in weights_only-loadable types."""
    version, internal, gauss = random.getstate()
    key, keys, pos, has_gauss, cached = _numpy_state()
    state: dict[str, object] = {
        "python": [version, list(internal), gauss],
        "numpy": [key, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state() -> tuple[str, np.ndarray[tuple[int], np.dtype[np.uint32]], int, int, float]:
    st = np.random.get_state(legacy=True)
    assert isinstance(st, tuple)  # legacy=True: the MT19937 tuple, not a dict
    return st


def set_rng_state(state: dict[str, object]) -> None:
    py, npy, cpu = state["python"], state["numpy"], state["torch"]
    if not (isinstance(py, list) and isinstance(npy, list) and isinstance(cpu, torch.Tensor)):
        raise ValueError("corrupt checkpoint: bad RNG state")
    random.setstate((py[0], tuple(py[1]), py[2]))
    key, keys, pos, has_gauss, cached = npy
    np.random.set_state((key, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(cpu)
    cuda = state.get("cuda")
    if isinstance(cuda, list) and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def checkpoint_step(path: Path) -> int | None:
    return name_step(path.name)


def save_checkpoint(
    ckpt_dir: Path,
    model: nn.Module,
    states: dict[str, object],
    meta: CheckpointMeta,
) -> Path:
    """Write checkpoint `step-<meta.state.step>` and point `latest` at it.

    states: optimizer/scheduler/scaler state dicts (saved with torch.save, plus RNG states).
    """
    from safetensors.torch import save_model

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(meta.state.step)
    final = ckpt_dir / name
    tmp = ckpt_dir / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save({**states, "rng": rng_state()}, tmp / "state.pt")
        (tmp / META).write_text(dumps(meta, indent=1))
        if final.exists():  # the same step saved before (e.g. cancelled, then resumed)
            old = ckpt_dir / f".{name}.old-{uuid.uuid4().hex[:8]}"
            final.rename(old)
            shutil.rmtree(old)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    latest_tmp = ckpt_dir / f".{LATEST}.tmp-{uuid.uuid4().hex[:8]}"
    latest_tmp.write_text(name + "\n")
    os.replace(latest_tmp, ckpt_dir / LATEST)
    return final


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    name = latest_name(ckpt_dir)
    return ckpt_dir / name if name is not None else None


@dataclass
class LoadedCheckpoint:
    path: Path
    meta: CheckpointMeta  # trainer.json
    states: dict[str, object]  # state.pt: optimizer/scheduler/scaler/"rng"


def read_meta(path: Path) -> CheckpointMeta:
    """A checkpoint's trainer.json alone (what the run decided, where its data stood)."""
    return read_json(path / META, CheckpointMeta, CHECKPOINT_VERSION)


def load_checkpoint(path: Path, model: nn.Module) -> LoadedCheckpoint:
    """Load the weights into model (in place) and read the rest of the checkpoint."""
    from safetensors.torch import load_model

    meta = read_meta(path)
    load_model(model, str(path / "model.safetensors"))
    states = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    if not isinstance(states, dict):
        raise ValueError(f"{path}: corrupt state.pt")
    return LoadedCheckpoint(path, meta, states)


def prune_checkpoints(ckpt_dir: Path, keep: int, protect: set[int] | None = None) -> None:
    """Delete all but the newest `keep` checkpoints and those whose step is in protect."""
    found = list_checkpoints(ckpt_dir)
    keep_names = {p.name for p in found[-keep:]} if keep > 0 else set()
    for p in found:
        if p.name not in keep_names and checkpoint_step(p) not in (protect or set()):
            shutil.rmtree(p, ignore_errors=True)
