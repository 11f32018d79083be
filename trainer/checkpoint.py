"""Training checkpoints: everything a resumed run needs to continue bit for bit.

checkpoints/step-00000200/
    model.safetensors   the weights (safetensors: shared/tied tensors stored once)
    state.pt            optimizer, scheduler, grad scaler and RNG states; tensors, numbers and
                        lists only, so torch.load(weights_only=True) reads it
    trainer.json        TrainState (step, data position, best val loss, patience counter, the
                        per-step loss history) and the run's config
checkpoints/latest      the name of the newest complete checkpoint

A checkpoint is written into a temp dir and renamed into place, then `latest` is replaced
(temp file + rename): a crash at any moment leaves the previous checkpoint usable.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

CHECKPOINT_VERSION = 1
LATEST = "latest"
_NAME = re.compile(r"^step-(\d{8,})$")


@dataclass
class TrainState:
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
    losses: list[float] = field(default_factory=list)  # train loss of every step
    val_history: list[tuple[int, float]] = field(default_factory=list)  # (step, val loss)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> TrainState:
        losses, vals, best_step = d["losses"], d["val_history"], d["best_step"]
        if not isinstance(losses, list) or not isinstance(vals, list):
            raise ValueError("corrupt train state: losses/val_history are not lists")
        return cls(
            step=_int(d["step"]),
            micro_step=_int(d["micro_step"]),
            epoch=_int(d["epoch"]),
            batch_index=_int(d["batch_index"]),
            tokens=_int(d["tokens"]),
            train_time_s=_float(d["train_time_s"]),
            best_val_loss=_float(d["best_val_loss"]),
            best_step=None if best_step is None else _int(best_step),
            bad_evals=_int(d["bad_evals"]),
            early_stopped=bool(d["early_stopped"]),
            losses=[_float(v) for v in losses],
            val_history=[(_int(s), _float(v)) for s, v in vals],
        )


def _int(v: object) -> int:
    if not isinstance(v, int):
        raise ValueError(f"corrupt train state: expected an integer, got {v!r}")
    return v


def _float(v: object) -> float:
    if not isinstance(v, int | float):
        raise ValueError(f"corrupt train state: expected a number, got {v!r}")
    return float(v)


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


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoint_step(path: Path) -> int | None:
    m = _NAME.match(path.name)
    return int(m.group(1)) if m else None


def save_checkpoint(
    ckpt_dir: Path,
    model: nn.Module,
    states: dict[str, object],
    train_state: TrainState,
    info: dict[str, object],
) -> Path:
    """Write checkpoint `step-<train_state.step>` and point `latest` at it.

    states: optimizer/scheduler/scaler state dicts (saved with torch.save, plus RNG states);
    info: JSON-able facts checked on resume (config, data fingerprint).
    """
    from safetensors.torch import save_model

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(train_state.step)
    final = ckpt_dir / name
    tmp = ckpt_dir / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save({**states, "rng": rng_state()}, tmp / "state.pt")
        meta = {"version": CHECKPOINT_VERSION, "state": train_state.to_dict(), **info}
        (tmp / "trainer.json").write_text(json.dumps(meta, indent=1) + "\n")
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
    try:
        name = (ckpt_dir / LATEST).read_text().strip()
    except OSError:
        name = ""
    if name and (ckpt_dir / name / "trainer.json").is_file():
        return ckpt_dir / name
    found = [p for p in list_checkpoints(ckpt_dir) if (p / "trainer.json").is_file()]
    return found[-1] if found else None


@dataclass
class LoadedCheckpoint:
    path: Path
    state: TrainState
    info: dict[str, object]  # trainer.json minus the state
    states: dict[str, object]  # state.pt: optimizer/scheduler/scaler/"rng"


def load_checkpoint(path: Path, model: nn.Module) -> LoadedCheckpoint:
    """Load the weights into model (in place) and read the rest of the checkpoint."""
    from safetensors.torch import load_model

    load_model(model, str(path / "model.safetensors"))
    meta = json.loads((path / "trainer.json").read_text())
    if not isinstance(meta, dict) or meta.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: unsupported checkpoint version")
    raw_state = meta.pop("state")
    if not isinstance(raw_state, dict):
        raise ValueError(f"{path}: corrupt train state")
    states = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    if not isinstance(states, dict):
        raise ValueError(f"{path}: corrupt state.pt")
    return LoadedCheckpoint(path, TrainState.from_dict(raw_state), meta, states)


def prune_checkpoints(ckpt_dir: Path, keep: int, protect: set[int] | None = None) -> None:
    """Delete all but the newest `keep` checkpoints and those whose step is in protect."""
    found = list_checkpoints(ckpt_dir)
    keep_names = {p.name for p in found[-keep:]} if keep > 0 else set()
    for p in found:
        if p.name not in keep_names and checkpoint_step(p) not in (protect or set()):
            shutil.rmtree(p, ignore_errors=True)
