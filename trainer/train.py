"""The training loop: one visible loop, nanoGPT style.

train() encodes the corpus (cached), builds or loads the model, and runs AdamW/Adam/SGD
with warmup + cosine decay, gradient accumulation and clipping, periodic validation
(best model kept in run_dir/best/, early stopping), periodic checkpoints and cancellation
between steps. A run_dir holding a checkpoint is resumed from it and continues exactly as
if it had never stopped (same weights bit for bit on CPU, same loss curve). At the end the
best-by-validation model and the tokenizer files are written directly into run_dir, so
`AutoModelForCausalLM.from_pretrained(run_dir)` / `AutoTokenizer.from_pretrained(run_dir)`
load them, with manifest.json beside them; metrics.jsonl gets one line per step/validation.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

import msgspec
import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from protocol.events import Sample
from protocol.settings import Device
from protocol.settings import Precision as SettingsPrecision
from trainer import lora
from trainer.checkpoint import (
    CheckpointMeta,
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    read_meta,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from trainer.config import TrainConfig
from trainer.data import IGNORE_INDEX, TokenDataInfo, TokenWindows, dir_sha256, encode_splits
from trainer.distributed import World, check_world, current, rank_threads
from trainer.errors import UserError
from trainer.manifest import DataRef, RunManifest, TokenizerRef, write_manifest
from trainer.model import (
    MODEL_FILES,
    ModelConfig,
    build_model,
    count_parameters,
    load_model,
    logits,
    read_model_config,
)
from trainer.recipe import (
    PROBE_MIN_STEPS,
    PROBE_STEPS,
    PROBE_WARMUP,
    Precision,
    Recipe,
    Trial,
    cpu_flags,
    decide,
    flops_per_token,
    machine_id,
    median,
    mfu,
    peak_flops,
    read_trials,
    write_trials,
)
from trainer.report import Progress, StartInfo, Status, TrainResult
from trainer.tokenizer import load_tokenizer
from trainer.tracking import Tracker

# Config fields that may differ when a run is resumed: they do not change the maths.
# The world size too: a run resumed on more or fewer processes continues from the same global
# step (the data position counts global batches), though not bit for bit.
RESUMABLE_CHANGES = frozenset(
    {
        "threads",
        "keep_checkpoints",
        "compile",
        "sample_count",
        "sample_tokens",
        "nproc_per_node",
        "nnodes",
        "max_restarts",
    }
)
METRICS_NAME = "metrics.jsonl"
ONE = World()  # a run on one process


def perplexity(loss: float | None) -> float | None:
    if loss is None:
        return None
    return math.exp(loss) if loss < 700 else math.inf


def cpu_supports_bf16(capability: str | None = None, flags: set[str] | None = None) -> bool:
    """Whether the CPU advertises native bf16 matmuls (AVX512/AMX kernels and the
    avx512_bf16/amx_bf16 instructions). Informational only (benchmarks print it): the flags
    do not tell whether bf16 is faster, so `precision: auto` measures (trainer.recipe)."""
    cap = capability if capability is not None else torch.backends.cpu.get_cpu_capability()
    found = flags if flags is not None else cpu_flags()
    return ("AVX512" in cap or "AMX" in cap) and bool(found & {"avx512_bf16", "amx_bf16"})


def resolve_device(name: Device) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda was asked but no CUDA GPU is available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def precision_candidates(name: SettingsPrecision, device: torch.device) -> list[Precision]:
    """The precisions a run may use on this device, the safe default first: auto measures
    them (trainer.recipe); any other is the one asked for. fp16 only on CUDA."""
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if name == "bf16" and not bf16_ok:
            raise UserError("this GPU does not support bf16; use fp16 or fp32")
        if name == "auto":
            return ["fp32", "bf16"] if bf16_ok else ["fp32"]
        return [name]
    if name == "fp16":
        raise UserError("fp16 needs a CUDA GPU; on CPU use fp32 or bf16")
    return ["fp32", "bf16"] if name == "auto" else [name]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(cfg: TrainConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """Weight decay on matrices only (not biases, norms); frozen parameters left out."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # fused: one kernel for all parameters (about 5x faster steps than the default on CPU).
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=True)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=(0.9, 0.95), fused=True)
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, fused=True)


def next_token_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Mean cross-entropy over the unmasked targets (y = -100 at padding); with scale, their
    sum times scale (a rank's share of a global batch's mean: see shard)."""
    out = logits(model, x, mask)
    if scale is None:
        return F.cross_entropy(
            out.float().view(-1, out.size(-1)), y.view(-1), ignore_index=IGNORE_INDEX
        )
    total = F.cross_entropy(
        out.float().view(-1, out.size(-1)), y.view(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total * scale


def shard(
    x: torch.Tensor, y: torch.Tensor, world: World, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """This rank's rows of a global micro-batch (batch_size / world size of them), and the
    scale of its summed loss that makes it its share of the global batch's mean loss: DDP's
    average of the ranks' gradients, times the world size, is then the gradient of that mean,
    as on one process. A rank left without rows (the short last batch of an epoch) runs one
    row at scale 0, so that it still joins the gradient all-reduce."""
    per = batch_size // world.size
    lo, hi = world.rank * per, min((world.rank + 1) * per, x.size(0))
    targets = int((y != IGNORE_INDEX).sum())  # of the whole global batch: every rank agrees
    if lo >= hi:
        return x[:1], y[:1], 0.0
    return x[lo:hi], y[lo:hi], 1.0 / targets


def padding_mask(y: torch.Tensor) -> torch.Tensor | None:
    """The attention mask of a padded batch (None when unpadded); y still on the CPU.

    Padding only ever fills the end of a window, so the last column tells.
    """
    if not bool((y[:, -1] == IGNORE_INDEX).any()):
        return None
    return (y != IGNORE_INDEX).long()


def evaluate_loss(
    model: nn.Module,
    windows: TokenWindows,
    batches: list[npt.NDArray[np.int64]],
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager[object]],
    world: World = ONE,
) -> float | None:
    """Mean next-token loss per target token over the given window batches (shared out among
    the ranks of world, every rank gets the whole's mean)."""
    if not batches:
        return None
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    with torch.no_grad():
        for idx in batches[world.rank :: world.size]:
            x, y = windows.windows(idx)
            mask = padding_mask(y)
            count += int((y != IGNORE_INDEX).sum())  # on the CPU: no device sync
            x, y = x.to(device), y.to(device)
            with autocast():
                out = logits(model, x, None if mask is None else mask.to(device))
            total += F.cross_entropy(
                out.float().view(-1, out.size(-1)),
                y.view(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            ).double()
    model.train(was_training)
    if world.size > 1:
        both = world.sum(torch.stack([total, torch.tensor(float(count), device=device).double()]))
        total, count = both[0], int(both[1].item())
    return float(total.item()) / count


def _copy_into(src: Path, dst_dir: Path) -> None:
    tmp = dst_dir / f".{src.name}.tmp-{uuid.uuid4().hex[:8]}"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst_dir / src.name)


def _save_model_dir(model: nn.Module, cfg: ModelConfig, out: Path) -> None:
    """save_model into a temp dir renamed over `out`."""
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        lora.save(model, cfg, tmp)  # save_model, or a LoRA model merged + its adapter
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
            shutil.rmtree(old)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _MetricsLine(msgspec.Struct):
    """What _trim_metrics reads of a metrics.jsonl line."""

    kind: str
    step: int = 0


def _trim_metrics(path: Path, upto_step: int) -> None:
    """Drop metrics lines past the checkpoint a run resumes from (they will be redone),
    and the test line of a finished run (the final evaluation is redone too)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            # json, not msgspec, parses: the lines may hold NaN, which JSON proper cannot.
            record = msgspec.convert(json.loads(line), _MetricsLine)
        except (ValueError, msgspec.ValidationError):
            continue  # a line cut short by a crash
        if record.step <= upto_step and record.kind != "test":
            kept.append(line + "\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def _log(f: IO[str], record: dict[str, object]) -> None:
    f.write(json.dumps(record) + "\n")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def train(
    cfg: TrainConfig,
    data_dir: Path,
    tokenizer_dir: Path,
    run_dir: Path,
    on_progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    token_dir: Path | None = None,
    on_start: Callable[[StartInfo], None] | None = None,
    cache_dir: Path | None = None,
) -> TrainResult:
    """Train (or resume) the model of cfg on the prepared corpus in data_dir.

    data_dir holds {train,validation,test}.txt; their token encoding is cached in token_dir
    (default data_dir/tokens/<tokenizer hash>). should_stop is checked between steps: when
    it answers True a checkpoint is saved and the result has status "cancelled". cache_dir
    keeps what was measured on this machine (the recipe probe, the peak FLOP/s).

    Under a process group (trainer.distributed: every rank calls train) the run is DDP: each
    rank takes its share of every global batch, so the batches, their order and the epochs
    are those of one process; rank 0 alone decides the recipe, reads and writes checkpoints
    and the run's files and calls on_start/on_progress; any rank's should_stop stops all.
    """
    cfg.validate()
    world = current()
    check_world(cfg, world.size)
    t_start = time.perf_counter()
    started_at = _now()
    run_dir.mkdir(parents=True, exist_ok=True)
    threads = rank_threads(cfg, world.local_size)
    torch.set_num_threads(threads)
    device = resolve_device(cfg.device)
    if world.backend == "nccl":
        device = torch.device("cuda", world.local_rank)
    candidates = precision_candidates(cfg.precision, device)

    # ---- data
    tok = load_tokenizer(tokenizer_dir)
    if cfg.model_family == "qwen" and tok.config.tokenizer_kind != "bpe":
        # transformers loads every qwen2 folder with its own byte-level Qwen2Tokenizer,
        # whatever tokenizer_config.json says: only our byte-level BPE survives that.
        raise UserError(
            f"qwen models need a bpe tokenizer (got {tok.config.tokenizer_kind}): transformers "
            "loads qwen2 run folders with its own byte-level BPE tokenizer"
        )
    if token_dir is None:
        token_dir = data_dir / "tokens" / dir_sha256(tokenizer_dir)[:16]
    if world.local_rank:  # one encoder per machine; the others read what it wrote
        world.barrier()
    info = encode_splits(data_dir, tokenizer_dir, token_dir, threads=cfg.threads)
    if not world.local_rank:
        world.barrier()
    seq = cfg.max_seq_len
    train_w = TokenWindows(
        info.path("train"), info.meta.dtype, seq, cfg.batch_size, tok.pad_id, seed=cfg.seed
    )
    if train_w.num_windows == 0:
        raise UserError("the train split has fewer than 2 tokens: nothing to train on")
    val_w, test_w = (
        TokenWindows(info.path(s), info.meta.dtype, seq, cfg.batch_size, tok.pad_id, shuffle=False)
        for s in ("validation", "test")
    )
    val_batches = val_w.eval_batches(cfg.eval_batches)
    bpe, accum = train_w.batches_per_epoch, cfg.grad_accum_steps
    total_steps = cfg.max_steps or -(-cfg.num_epochs * bpe // accum)
    total_epochs = -(-total_steps * accum // bpe)

    model_cfg = ModelConfig(
        family=cfg.model_family,
        size=cfg.model_size,
        vocab_size=tok.vocab_size,
        max_seq_len=seq,
        dropout=cfg.dropout,
        pad_id=tok.pad_id,
        bos_id=tok.bos_id,
        eos_id=tok.eos_id,
        pretrained=cfg.pretrained,
        freeze_embed=cfg.freeze_embed,
        overrides=dict(cfg.model_overrides),
    )

    # ---- the recipe: measured before the run's RNG is seeded; a resumed run keeps its own.
    # Rank 0 decides (probing with its share of the machine) and tells the others: every
    # rank must train in the same precision.
    ckpt_dir = run_dir / "checkpoints"
    ckpt = latest_checkpoint(ckpt_dir) if world.leader else None
    machine = machine_id(str(device), threads)
    kept = read_meta(ckpt).recipe if ckpt is not None else None
    recipe: Recipe | None = None
    if world.leader and kept is not None:
        recipe = msgspec.structs.replace(kept, measured=False)
    elif world.leader:  # the other ranks take rank 0's decision (broadcast below)
        shape = repr((model_cfg.to_dict(), cfg.batch_size, cfg.optimizer))
        if cfg.lora_r:  # adapters alone train at another speed than the whole model
            shape += repr(lora.describe(cfg))
        known = read_trials(cache_dir, machine, shape)
        held_out = (val_w, val_batches[:1]) if val_batches else (train_w, [])

        def measure(precision: Precision, compiled: bool) -> Trial:
            # Built per trial, only when a probe runs: a short run never reads them.
            batches = [train_w.batch(0, i % bpe) for i in range(PROBE_STEPS)]
            return _probe(cfg, model_cfg, device, precision, compiled, batches, held_out)

        may_probe = total_steps >= PROBE_MIN_STEPS
        recipe = decide(candidates, cfg.compile, total_steps, known, measure if may_probe else None)
        recipe = msgspec.structs.replace(recipe, machine=machine, shape=shape)
        if recipe.measured:
            write_trials(cache_dir, machine, shape, recipe.trials)
    recipe = world.broadcast(recipe)
    assert recipe is not None
    precision = recipe.precision

    # ---- model and optimizer
    seed_everything(cfg.seed)
    model = build_model(model_cfg).to(device)
    if cfg.lora_r:  # only the adapters train (trainer.lora)
        model = lora.wrap(model, cfg)
    if world.rank:  # the same weights (DDP copies rank 0's), but dropout masks of its own
        torch.manual_seed(cfg.seed + world.rank)
    if cfg.pretrained is not None:  # what was loaded (its dims, its context length)
        model_cfg = replace(
            read_model_config(Path(cfg.pretrained)),
            dropout=cfg.dropout,
            pad_id=tok.pad_id,
            bos_id=tok.bos_id,
            eos_id=tok.eos_id,
            pretrained=cfg.pretrained,
            freeze_embed=cfg.freeze_embed,
        )
    model.train()
    lr = cfg.learning_rate
    if cfg.pretrained is not None and cfg.finetune_lr_cap is not None:
        lr = min(lr, cfg.finetune_lr_cap)
    optimizer = make_optimizer(cfg, model, lr)
    warmup, min_ratio = cfg.warmup_steps, cfg.min_lr_ratio
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup, total_steps, min_ratio)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def autocast() -> contextlib.AbstractContextManager[object]:
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=amp_dtype)

    trainable = [p for p in model.parameters() if p.requires_grad]
    max_norm = cfg.gradient_clipping if cfg.gradient_clipping > 0 else math.inf

    # ---- resume
    metrics_path = run_dir / METRICS_NAME
    config_dict: dict[str, object] = msgspec.to_builtins(cfg)
    state = TrainState()
    resumed_from: int | None = None
    # Rank 0 reads the checkpoint and sends it to the others (a machine of a multi-node run
    # need not have it); DDP copies rank 0's weights to every rank when it wraps the model.
    saved: tuple[CheckpointMeta, dict[str, object]] | None = None
    refused = ""
    if ckpt is not None:
        loaded = load_checkpoint(ckpt, model)
        saved = (loaded.meta, loaded.states)
        try:
            _check_resumable(loaded.meta, config_dict, info)
        except UserError as e:
            refused = str(e)
    saved, refused = world.broadcast((saved, refused))
    if refused:
        raise UserError(refused)
    if saved is not None:
        meta, states = saved
        optimizer.load_state_dict(_state_dict(states, "optimizer"))
        scheduler.load_state_dict(_state_dict(states, "scheduler"))
        if scaler.is_enabled() and "scaler" in states:
            scaler.load_state_dict(_state_dict(states, "scaler"))
        state = meta.state
        resumed_from = state.step
        # Last: building the model drew numbers. Each rank's own generators when the world
        # size is the one saved; otherwise rank 0's (the run goes on, not bit for bit).
        ranks = states.get("rng_ranks")
        same_world = isinstance(ranks, list) and len(ranks) == world.size
        rng = ranks[world.rank] if same_world and isinstance(ranks, list) else states["rng"]
        set_rng_state(_state_dict({"rng": rng}, "rng"))
        if world.leader:
            _trim_metrics(metrics_path, state.step)
    elif world.leader:
        metrics_path.unlink(missing_ok=True)  # left by a run that died before its 1st checkpoint

    ddp: DistributedDataParallel | None = None
    fwd: nn.Module = model
    if world.size > 1:
        ids = [world.local_rank] if device.type == "cuda" else None
        # Buffers synced at the start only: ours are constants (no batch norm).
        ddp = DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)
        fwd = ddp
    if recipe.compile:
        if cache_dir is not None:  # a later run of the same shape compiles in seconds
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir / "inductor"))
        compiled = torch.compile(fwd)
        assert isinstance(compiled, nn.Module)
        fwd = compiled

    n_params = count_parameters(model)
    per_token = flops_per_token(n_params, *_attention_dims(model), seq)
    # The group's peak: one device's (measured by rank 0) times the ranks, as tokens/s counts
    # every rank's tokens.
    peak = (
        peak_flops(str(device), precision, machine, cache_dir) * world.size if world.leader else 0.0
    )
    manifest = RunManifest(
        status="running",
        config=config_dict,
        model={
            **model_cfg.to_dict(),
            "parameters": n_params,
            "trainable_parameters": sum(p.numel() for p in trainable),
            **lora.describe(cfg),
        },
        tokenizer=TokenizerRef(
            dir=str(tokenizer_dir.resolve()),
            vocab_size=tok.vocab_size,
            sha256=info.meta.tokenizer_sha256,
        ),
        data=DataRef(
            dir=str(data_dir.resolve()),
            tokens=info.meta.tokens,
            fingerprint=info.fingerprint,
        ),
        seed=cfg.seed,
        device=str(device),
        precision=precision,
        started_at=started_at,
        total_steps=total_steps,
        resumed_from_step=resumed_from,
        compile=recipe.compile,
        recipe=recipe,
        threads=threads,
        world_size=world.size,
        backend=world.backend,
        flops_per_token=per_token,
        peak_flops=peak,
    )
    if world.leader:
        write_manifest(run_dir, manifest)
    if on_start is not None and world.leader:
        on_start(
            StartInfo(
                device=str(device),
                precision=precision,
                parameters=n_params,
                total_steps=total_steps,
                total_epochs=total_epochs,
                resumed_from_step=resumed_from or 0,
                compile=recipe.compile,
                recipe=recipe.reason,
                threads=threads,
                world_size=world.size,
                backend=world.backend,
                flops_per_token=per_token,
                peak_flops=peak,
            )
        )

    def checkpoint() -> None:
        # Every rank's generators (their dropout masks differ), so that a resume on as many
        # ranks is exact; rank 0 writes.
        rng_ranks = world.gather(rng_state()) if world.size > 1 else None
        if not world.leader:
            return
        states: dict[str, object] = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
        }
        if scaler.is_enabled():
            states["scaler"] = scaler.state_dict()
        if rng_ranks is not None:
            states["rng_ranks"] = rng_ranks
        meta = CheckpointMeta(
            state=state,
            config=config_dict,
            data_fingerprint=info.fingerprint,
            recipe=recipe,
            world_size=world.size,
        )
        save_checkpoint(ckpt_dir, model, states, meta)
        protect = {state.best_step} if state.best_step is not None else set()
        prune_checkpoints(ckpt_dir, cfg.keep_checkpoints, protect)

    def validate(metrics: IO[str]) -> float | None:
        # The eager model: a compiled one would compile a second (no-grad) graph to save
        # less than it costs at the validation cadence.
        val = evaluate_loss(model, val_w, val_batches, device, autocast, world)
        if val is None:
            return None
        state.val_history.append((state.step, val))
        improved = val < state.best_val_loss  # NaN never improves
        if improved:
            state.best_val_loss, state.best_step, state.bad_evals = val, state.step, 0
            if world.leader:
                _save_model_dir(model, model_cfg, run_dir / "best")
        else:
            state.bad_evals += 1
            patience = cfg.early_stopping_patience
            state.early_stopped = patience is not None and state.bad_evals >= patience
        _log(
            metrics,
            {
                "kind": "val",
                "step": state.step,
                "val_loss": val,
                "val_ppl": perplexity(val),
                "best": improved,
            },
        )
        return val

    # Samples at each validation (trainer.samples; imported here: its generation code,
    # trainer.evaluate, imports this module).
    from trainer.samples import Sampler

    sampler = Sampler.for_run(cfg, run_dir, data_dir, tok, model, model_cfg, device)

    # ---- the loop
    cancelled = False
    session_tokens, session_time = 0, 0.0
    last_saved = state.step if resumed_from is not None else -1
    metrics_file = metrics_path if world.leader else Path(os.devnull)
    with (
        metrics_file.open("a", buffering=1) as metrics,
        # TensorBoard (and MLflow), rank 0's
        Tracker(run_dir, cfg, resumed_from)
        if world.leader
        else contextlib.nullcontext() as tracker,
    ):
        while state.step < total_steps and not state.early_stopped:
            if world.any(should_stop is not None and should_stop()):
                cancelled = True
                break
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            step_tokens = step_samples = 0
            for i in range(accum):
                epoch, index = divmod(state.micro_step, bpe)
                x, y = train_w.batch(epoch, index)
                step_tokens += x.numel()  # of the global batch: tokens/s counts every rank
                step_samples += x.size(0)
                scale: float | None = None
                if world.size > 1:
                    x, y, scale = shard(x, y, world, cfg.batch_size)
                mask = padding_mask(y)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if mask is not None:
                    mask = mask.to(device, non_blocking=True)
                # DDP all-reduces the gradients on the last micro-batch of a step only.
                inner = i < accum - 1
                with ddp.no_sync() if ddp is not None and inner else contextlib.nullcontext():
                    with autocast():
                        loss = next_token_loss(fwd, x, y, mask, scale)
                    # DDP averages the ranks' gradients: times world.size, they sum.
                    torch.autograd.backward(scaler.scale(loss * world.size / accum))
                loss_sum += loss.detach()
                state.micro_step += 1
            world.sum(loss_sum)  # the ranks' shares of the global mean losses
            scaler.unscale_(optimizer)  # no-op unless fp16: clip the true gradients
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step_lr = float(scheduler.get_last_lr()[0])
            scheduler.step()
            state.step += 1
            # One host sync per step, for the loss history and the progress report.
            loss_v, norm_v = torch.stack([loss_sum / accum, grad_norm.float()]).tolist()
            if not math.isfinite(loss_v):
                raise UserError(
                    f"training diverged: loss is {loss_v} at step {state.step}; "
                    "lower the learning rate (or use fp32)"
                )
            dt = time.perf_counter() - t0
            state.losses.append(loss_v)
            state.tokens += step_tokens
            state.train_time_s += dt
            session_tokens += step_tokens
            session_time += dt
            state.epoch, state.batch_index = divmod(state.micro_step, bpe)
            tps = session_tokens / session_time if session_time > 0 else 0.0
            elapsed = time.perf_counter() - t_start
            epoch_no = (state.micro_step - 1) // bpe + 1
            _log(
                metrics,
                {
                    "kind": "train",
                    "step": state.step,
                    "epoch": epoch_no,
                    "loss": loss_v,
                    "lr": step_lr,
                    "grad_norm": norm_v,
                    "tokens": state.tokens,
                    "tokens_per_s": round(tps, 1),
                    "elapsed_s": round(elapsed, 3),
                },
            )

            epoch_end = state.micro_step // bpe > (state.micro_step - accum) // bpe
            val: float | None = None
            samples: list[Sample] = []
            if state.step % cfg.eval_every == 0 or epoch_end or state.step == total_steps:
                val = validate(metrics)
                samples = sampler.draw() if val is not None and world.leader else []
                if samples:
                    rows = msgspec.to_builtins(samples)
                    _log(metrics, {"kind": "samples", "step": state.step, "samples": rows})
            progress = Progress(
                step=state.step,
                epoch=epoch_no,
                total_epochs=total_epochs,
                total_steps=total_steps,
                loss=loss_v,
                lr=step_lr,
                grad_norm=norm_v,
                tokens_per_s=tps,
                samples_per_s=step_samples / dt if dt > 0 else 0.0,
                val_loss=val,
                val_ppl=perplexity(val),
                elapsed_s=elapsed,
                mfu=mfu(tps, per_token, peak),
                samples=samples,
            )
            if tracker is not None:
                tracker.log(progress)
            if on_progress is not None and world.leader:
                on_progress(progress)
            if state.step % cfg.checkpoint_every == 0:
                checkpoint()
                last_saved = state.step

        if last_saved != state.step:
            checkpoint()

        status: Status = (
            "cancelled" if cancelled else "early_stopped" if state.early_stopped else "completed"
        )
        test_loss: float | None = None
        if not cancelled and world.leader:
            test_loss = _finalize(
                model,
                model_cfg,
                state,
                run_dir,
                tokenizer_dir,
                test_w,
                cfg.eval_batches,
                device,
                autocast,
            )
            _log(
                metrics,
                {
                    "kind": "test",
                    "step": state.step,
                    "test_loss": test_loss,
                    "test_ppl": perplexity(test_loss),
                },
            )
        if tracker is not None:
            tracker.finish(status, state.step, test_loss)

    tail = state.losses[-20:]
    train_loss = sum(tail) / len(tail) if tail else None
    best_val = state.best_val_loss if state.best_step is not None else None
    tokens_per_s = state.tokens / state.train_time_s if state.train_time_s > 0 else 0.0
    elapsed = time.perf_counter() - t_start
    manifest.status = status
    manifest.ended_at = _now()
    manifest.elapsed_s = round(elapsed, 3)
    manifest.steps, manifest.tokens = state.step, state.tokens
    manifest.tokens_per_s = round(tokens_per_s, 1)
    manifest.train_loss, manifest.train_ppl = train_loss, perplexity(train_loss)
    manifest.val_loss, manifest.val_ppl = best_val, perplexity(best_val)
    manifest.test_loss, manifest.test_ppl = test_loss, perplexity(test_loss)
    manifest.best_step, manifest.best_val_loss = state.best_step, best_val
    manifest.early_stopped = state.early_stopped
    run_mfu = mfu(tokens_per_s, per_token, peak)
    manifest.mfu = run_mfu
    if world.leader:
        write_manifest(run_dir, manifest)
    return TrainResult(
        status=status,
        steps=state.step,
        total_steps=total_steps,
        tokens=state.tokens,
        train_loss=train_loss,
        val_loss=best_val,
        val_ppl=perplexity(best_val),
        test_loss=test_loss,
        test_ppl=perplexity(test_loss),
        best_step=state.best_step,
        best_val_loss=best_val,
        tokens_per_s=tokens_per_s,
        resumed_from_step=resumed_from,
        elapsed_s=elapsed,
        losses=list(state.losses),
        val_history=list(state.val_history),
        mfu=run_mfu,
    )


def _attention_dims(model: nn.Module) -> tuple[int, int]:
    """(layers, width) of a transformer's attention, (0, 0) for a model without one."""
    conf = getattr(model, "config", None)
    layers = getattr(conf, "num_hidden_layers", 0)
    width = getattr(conf, "hidden_size", 0)
    return (layers, width) if isinstance(layers, int) and isinstance(width, int) else (0, 0)


def _probe(
    cfg: TrainConfig,
    model_cfg: ModelConfig,
    device: torch.device,
    precision: Precision,
    compiled: bool,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    held_out: tuple[TokenWindows, list[npt.NDArray[np.int64]]],
) -> Trial:
    """A few training steps of the run's model and batches in one recipe, timed, and the
    loss they reach on a held-out batch (trainer.recipe decides from these)."""
    torch.manual_seed(cfg.seed)  # the same start for every candidate
    model = build_model(model_cfg).to(device)
    if cfg.lora_r:  # the run's model: adapters on the frozen pretrained one
        model = lora.wrap(model, cfg)
    model.train()
    fwd: nn.Module = model
    if compiled:
        wrapped = torch.compile(model)
        assert isinstance(wrapped, nn.Module)
        fwd = wrapped
    optimizer = make_optimizer(cfg, model, cfg.learning_rate)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def autocast() -> contextlib.AbstractContextManager[object]:
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    times: list[float] = []
    for x, y in batches:
        t0 = time.perf_counter()
        mask = padding_mask(y)
        x, y = x.to(device), y.to(device)
        with autocast():
            loss = next_token_loss(fwd, x, y, None if mask is None else mask.to(device))
        torch.autograd.backward(scaler.scale(loss))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the step is done when its loss is known (CUDA runs ahead)
        times.append(time.perf_counter() - t0)
    step_s = median(times[PROBE_WARMUP:])
    windows, idx = held_out
    if not idx:
        idx = windows.eval_batches(1)
    held = evaluate_loss(model, windows, idx, device, autocast)
    if compiled:
        torch._dynamo.reset()  # free the probe's graphs; the run compiles its own model
    return Trial(
        precision=precision,
        compile=compiled,
        step_s=step_s,
        loss=held if held is not None and math.isfinite(held) else None,
        compile_s=max(0.0, sum(times[:PROBE_WARMUP]) - PROBE_WARMUP * step_s) if compiled else 0.0,
    )


def _finalize(
    model: nn.Module,
    model_cfg: ModelConfig,
    state: TrainState,
    run_dir: Path,
    tokenizer_dir: Path,
    test_w: TokenWindows,
    eval_batches: int,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager[object]],
) -> float | None:
    """Write the final artifacts into run_dir and return the final model's test loss.

    The final model is the best by validation loss (run_dir/best/, copied file by file);
    without a validation split it is the last weights. Its test loss is measured on the
    saved files, i.e. on exactly what users get.
    """
    best = run_dir / "best"
    if state.best_step is None or not (best / "config.json").is_file():
        _save_model_dir(model, model_cfg, best)
    for name in MODEL_FILES:
        (run_dir / name).unlink(missing_ok=True)  # e.g. generation_config.json of another run
    for src in sorted(best.iterdir()):
        if src.is_file():
            _copy_into(src, run_dir)
    lora.copy_adapter(best, run_dir)
    for src in sorted(tokenizer_dir.iterdir()):
        if src.is_file() and src.name not in MODEL_FILES:
            _copy_into(src, run_dir)
    final, _ = load_model(run_dir)
    final.to(device)
    return evaluate_loss(final, test_w, test_w.eval_batches(eval_batches), device, autocast)


def _state_dict(states: dict[str, object], key: str) -> dict[str, object]:
    value = states.get(key)
    if not isinstance(value, dict):
        raise ValueError(f"corrupt checkpoint: no {key} state")
    return value


def _check_resumable(saved: CheckpointMeta, config: dict[str, object], info: TokenDataInfo) -> None:
    old = saved.config
    changed = sorted(
        k
        for k in set(old) | set(config)
        if k not in RESUMABLE_CHANGES and old.get(k) != config.get(k)
    )
    if changed:
        raise UserError(
            f"run dir holds a checkpoint of a different training config ({', '.join(changed)} "
            f"changed); resume with the same config or use a new run dir"
        )
    if saved.data_fingerprint != info.fingerprint:
        raise UserError(
            "run dir holds a checkpoint trained on other data (corpus or tokenizer changed); "
            "use a new run dir"
        )
