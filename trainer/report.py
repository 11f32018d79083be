"""What a training run reports while it runs and when it ends (trainer.train's callbacks
and result). Plain msgspec Structs with no heavy imports: the trainer actor decodes them from
its training child without importing torch.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from protocol.events import Sample

Status = Literal["completed", "cancelled", "early_stopped"]


class StartInfo(msgspec.Struct, kw_only=True):
    """What a run resolved before its first step (for on_start)."""

    device: str
    precision: str
    parameters: int
    total_steps: int
    total_epochs: int
    resumed_from_step: int
    compile: bool = False
    recipe: str = ""  # why this precision and compile: the measured figures, in one line
    threads: int = 0  # torch threads of each process
    world_size: int = 1  # processes training the run together (DDP)
    backend: str = ""  # their torch.distributed backend: gloo (CPU), nccl (CUDA); "": one
    flops_per_token: float = 0.0  # 6 x parameters + attention, forward and backward
    peak_flops: float = 0.0  # FLOP/s of a GEMM probe in the chosen precision (MFU's base)


class Progress(msgspec.Struct, kw_only=True):
    step: int
    epoch: int  # 1-based epoch of the last batch
    total_epochs: int
    total_steps: int
    loss: float
    lr: float
    grad_norm: float
    tokens_per_s: float
    samples_per_s: float
    val_loss: float | None  # set on the steps that ran a validation
    val_ppl: float | None
    elapsed_s: float
    mfu: float | None = None  # model FLOPs utilisation, 0..1, when the peak is known
    samples: list[Sample] = []  # written at this step's validation (trainer.samples)


class TrainResult(msgspec.Struct, kw_only=True):
    status: Status
    steps: int
    total_steps: int
    tokens: int
    train_loss: float | None  # mean of the last (up to) 20 steps
    val_loss: float | None  # of the final (best) model
    val_ppl: float | None
    test_loss: float | None
    test_ppl: float | None
    best_step: int | None
    best_val_loss: float | None
    tokens_per_s: float
    resumed_from_step: int | None
    elapsed_s: float
    losses: list[float]  # every step's train loss, including steps before a resume
    val_history: list[tuple[int, float]]
    mfu: float | None = None  # over the whole run
