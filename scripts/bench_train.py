"""`scripts/bench train`: the default recipe against the loop a new user writes (issue 11).

Contenders, each a full run in this process over the same batches (gpt2 tiny, the
shakespeare corpus, one tokenizer, the same batch size and sequence length):

- naive: the loop of the transformers docs, GPT2LMHeadModel(GPT2Config(...)) with the same
  dims and the library's default dropout 0.1, torch.optim.AdamW with torch's defaults, fp32,
  `model(input_ids=x, labels=x).loss`, backward, step;
- default: trainer.train.train with TrainConfig's defaults (precision and compile auto);
- fixed: the same with precision and compile set (fp32/bf16 x compile off/on); fixed fp32
  without compile is today's default, run in every short run;
- bare: the plainest loop over our model and fused optimizer at fp32 without compile, against
  our loop at the same settings (its steps after the warmup without a validation).

A run's wall time runs from the call to its last step's end, including everything the
recipe does on the way (its probe, compiling, validations and checkpoints at the default
cadence) and one final validation on the same windows for every contender. Ratios come
from this one run; the targets are the issue's.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from protocol.settings import DEFAULT_SEED, Compile, Precision
from scripts.bench_ml import DEFAULT_WORK_DIR, _prepare_corpus, _prepare_tokenizer
from trainer.report import Progress, StartInfo

if TYPE_CHECKING:
    import torch

    from trainer.data import TokenWindows

# The fixed recipes --fixed picks from; "fp32" (no compile) is today's default.
CHOICES: dict[str, tuple[Precision, Compile]] = {
    "fp32": ("fp32", "off"),
    "fp32+compile": ("fp32", "on"),
    "bf16": ("bf16", "off"),
    "bf16+compile": ("bf16", "on"),
}
TODAY = "fp32"


@dataclass(frozen=True)
class Setup:
    """What every contender shares, resolved once."""

    corpus: Path
    tok: Path
    vocab_size: int
    pad_id: int
    batch_size: int
    seq_len: int
    warmup: int
    runs_dir: Path
    device: torch.device
    threads: int  # torch's threads when the bench started: what a fresh process gets

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


Clock = tuple[float, float]  # (perf_counter, process_time): wall and CPU seconds


def _clock() -> Clock:
    return time.perf_counter(), time.process_time()


@dataclass
class Run:
    """One contender's run. CPU seconds (this process, all threads) barely move when other
    processes load the machine, wall seconds do: on a busy machine they are the steadier
    comparison, though they miss compile workers' time."""

    label: str
    steps: int
    wall_s: float
    cpu_s: float
    val_loss: float | None
    mfu: float | None = None
    steady: Clock | None = None  # ours: seconds of the steps after the warmup, no validation
    steady_steps: int = 0
    threads: int = 0
    recipe: str = ""

    def tok_s(self, setup: Setup) -> float:
        return self.steps * setup.tokens_per_step / self.wall_s


@dataclass
class Length:
    """One run length: its contenders and the fixed choices that could not run."""

    name: str
    steps: int
    naive: Run
    default: Run
    fixed: dict[str, Run]
    refused: dict[str, str]

    def best_fixed(self, setup: Setup) -> Run | None:
        return max(self.fixed.values(), key=lambda r: r.tok_s(setup), default=None)


# ---------------------------------------------------------------------------- contenders


def _fresh(setup: Setup, threads: int = 0) -> None:
    """Every contender starts as a new process would: torch's threads, no compiled graphs."""
    import torch

    torch.set_num_threads(threads or setup.threads)
    torch._dynamo.reset()


def _windows(setup: Setup, split: str, shuffle: bool = True) -> TokenWindows:
    """The windows train() reads (its token cache and seed), so every contender sees the
    same batches and the same validation windows."""
    from trainer.data import TokenWindows, dir_sha256, encode_splits

    info = encode_splits(
        setup.corpus, setup.tok, setup.corpus / "tokens" / dir_sha256(setup.tok)[:16]
    )
    return TokenWindows(
        info.path(split),
        info.meta.dtype,
        setup.seq_len,
        setup.batch_size,
        setup.pad_id,
        seed=DEFAULT_SEED,
        shuffle=shuffle,
    )


def _validate(setup: Setup, model: torch.nn.Module) -> float | None:
    """The validation train() runs: its windows, its batch count, its loss."""
    from trainer.config import TrainConfig
    from trainer.train import evaluate_loss

    val = _windows(setup, "validation", shuffle=False)
    batches = val.eval_batches(TrainConfig().eval_batches)
    return evaluate_loss(model, val, batches, setup.device, contextlib.nullcontext)


def _ours(
    setup: Setup, label: str, steps: int, precision: Precision, compile: Compile
) -> Run | str:
    """trainer.train.train with the defaults but for the sizes (and precision, compile);
    a string says why the recipe was refused on this machine."""
    from trainer.config import TrainConfig
    from trainer.errors import UserError
    from trainer.train import train

    run_dir = setup.runs_dir / label.replace("+", "-")
    shutil.rmtree(run_dir, ignore_errors=True)  # a leftover checkpoint would be resumed
    cfg = TrainConfig(
        model_family="gpt2",
        model_size="tiny",
        max_seq_len=setup.seq_len,
        batch_size=setup.batch_size,
        max_steps=steps,
        precision=precision,
        compile=compile,
    )
    stamps: list[tuple[int, Clock, bool]] = []  # (step, clock, validated)
    last: list[Progress] = []
    started: list[StartInfo] = []

    def on_progress(p: Progress) -> None:
        stamps.append((p.step, _clock(), p.val_loss is not None))
        last[:] = [p]

    _fresh(setup)
    t0 = _clock()
    try:
        result = train(
            cfg, setup.corpus, setup.tok, run_dir, on_progress=on_progress, on_start=started.append
        )
    except UserError as e:
        return str(e)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    steady, steady_n = (0.0, 0.0), 0
    for (_, before, _), (step, at, validated) in itertools.pairwise(stamps):
        if step > setup.warmup and not validated:
            steady = (steady[0] + at[0] - before[0], steady[1] + at[1] - before[1])
            steady_n += 1
    info, end = started[0], stamps[-1][1]
    chose = f"{info.precision}, compile {'on' if info.compile else 'off'}"
    return Run(
        label=f"{label} ({chose})" if precision == "auto" else label,
        steps=steps,
        wall_s=end[0] - t0[0],
        cpu_s=end[1] - t0[1],
        val_loss=dict(result.val_history).get(steps),
        mfu=result.mfu if result.mfu is not None else last[0].mfu,
        steady=steady if steady_n else None,
        steady_steps=steady_n,
        threads=info.threads,
        recipe=info.recipe,
    )


def _naive(setup: Setup, steps: int) -> Run:
    """The training loop of the transformers docs, timed like ours (model built inside)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from trainer.model import ModelConfig, model_dims

    _fresh(setup)
    # GPT2Config's bos/eos 50256 lie outside our vocab: harmless, and not worth a warning.
    logging.getLogger("transformers").setLevel(logging.ERROR)
    dims = model_dims(ModelConfig(family="gpt2", size="tiny"))
    t0 = _clock()
    windows = _windows(setup, "train")
    torch.manual_seed(DEFAULT_SEED)
    config = GPT2Config(
        vocab_size=setup.vocab_size,
        n_positions=setup.seq_len,
        n_embd=dims["n_embd"],
        n_layer=dims["n_layer"],
        n_head=dims["n_head"],
    )
    model: torch.nn.Module = GPT2LMHeadModel(config)
    model.to(setup.device)
    optimizer = torch.optim.AdamW(model.parameters())
    model.train()
    for step in range(steps):
        x, _ = windows.batch(*divmod(step, windows.batches_per_epoch))
        x = x.to(setup.device)
        loss: torch.Tensor = model(input_ids=x, labels=x).loss
        torch.autograd.backward(loss)  # loss.backward(), which is untyped
        optimizer.step()
        optimizer.zero_grad()
    val = _validate(setup, model)
    end = _clock()
    return Run("naive loop (transformers docs)", steps, end[0] - t0[0], end[1] - t0[1], val)


def _gpt2_tiny(setup: Setup) -> torch.nn.Module:
    import torch

    from trainer.model import ModelConfig, build_model

    torch.manual_seed(DEFAULT_SEED)
    return build_model(
        ModelConfig(
            family="gpt2", size="tiny", vocab_size=setup.vocab_size, max_seq_len=setup.seq_len
        )
    )


def _bare(setup: Setup, steps: int, threads: int) -> Clock:
    """Our model and optimizer (fp32, no compile) in the plainest loop: the seconds of the
    steps after the warmup."""
    import torch
    import torch.nn.functional as F

    from trainer.config import TrainConfig
    from trainer.train import make_optimizer

    _fresh(setup, threads)
    windows = _windows(setup, "train")
    model = _gpt2_tiny(setup).to(setup.device)
    model.train()
    cfg = TrainConfig()
    optimizer = make_optimizer(cfg, model, cfg.learning_rate)
    t0 = _clock()
    for step in range(steps):
        if step == setup.warmup:
            if setup.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = _clock()
        x, y = windows.batch(*divmod(step, windows.batches_per_epoch))
        x, y = x.to(setup.device), y.to(setup.device)
        out = model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(out.view(-1, out.size(-1)), y.view(-1), ignore_index=-100)
        torch.autograd.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if setup.device.type == "cuda":
        torch.cuda.synchronize()
    end = _clock()
    return end[0] - t0[0], end[1] - t0[1]


def _length(setup: Setup, name: str, steps: int, fixed: list[str]) -> Length:
    print(f"{name} run, {steps} steps:", flush=True)
    naive = _naive(setup, steps)
    print(f"  {naive.label}: {naive.tok_s(setup):,.0f} tok/s", flush=True)
    default = _ours(setup, "default recipe", steps, "auto", "auto")
    if isinstance(default, str):
        raise SystemExit(f"bench train: the default recipe failed: {default}")
    print(f"  {default.label}: {default.tok_s(setup):,.0f} tok/s", flush=True)
    length = Length(name, steps, naive, default, {}, {})
    for choice in fixed:
        run = _ours(setup, f"fixed {choice}", steps, *CHOICES[choice])
        if isinstance(run, str):
            length.refused[choice] = run
            print(f"  fixed {choice}: refused ({run})", flush=True)
        else:
            length.fixed[choice] = run
            print(f"  {run.label}: {run.tok_s(setup):,.0f} tok/s", flush=True)
    return length


# ---------------------------------------------------------------------------- report


def _machine(device: torch.device) -> tuple[str, bool]:
    """A line naming the machine, and whether bf16 is native there (AMX or a GPU)."""
    import torch

    from trainer.recipe import cpu_flags

    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        lscpu = ""
    fields = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in lscpu.splitlines())}
    cores = int(fields.get("Core(s) per socket", "0") or 0) * int(fields.get("Socket(s)", "1") or 1)
    flags = sorted(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    line = (
        f"machine: {fields.get('Model name', 'unknown CPU')}, {cores or '?'} cores "
        f"({os.cpu_count()} logical), torch {torch.__version__} cpu capability "
        f"{torch.backends.cpu.get_cpu_capability()}, bf16 flags: {', '.join(flags) or 'none'}"
    )
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
        line += f"; device {torch.cuda.get_device_name(device)}"
    else:
        native = "amx_bf16" in flags
        line += "; device cpu"
    return f"{line}; bf16 native (AMX or a GPU): {'yes' if native else 'no'}", native


def _opt(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _rel(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b - 1


def _faster(a: Run, b: Run) -> Clock:
    """How many times faster a ran than b over the same steps: by wall and by CPU seconds."""
    return b.wall_s / a.wall_s, b.cpu_s / a.cpu_s


def _table(setup: Setup, length: Length) -> None:
    naive = length.naive
    print(f"\n{length.name} run: {length.steps} steps of {setup.tokens_per_step} tokens")
    print(
        f"  {'':38} {'wall s':>7} {'tok/s':>7} {'vs naive':>8} {'CPU s':>7} {'vs naive':>8} "
        f"{'val loss':>8} {'vs naive':>8}"
    )
    for run in (naive, length.default, *length.fixed.values()):
        wall, cpu = _faster(run, naive)
        print(
            f"  {run.label:38} {run.wall_s:7.1f} {run.tok_s(setup):7,.0f} {wall:7.2f}x "
            f"{run.cpu_s:7.1f} {cpu:7.2f}x {_opt(run.val_loss, '8.4f')} "
            f"{_opt(_rel(run.val_loss, naive.val_loss), '+8.1%')}"
        )
    for choice, why in length.refused.items():
        print(f"  {'fixed ' + choice:38} refused: {why}")
    if length.default.recipe:
        print(f"  the default's recipe: {length.default.recipe}")


def _verdict(what: str, ratio: Clock, goal: float) -> str:
    """The verdict goes by wall time (the targets'); CPU time is shown for a busy machine."""
    met = "met" if ratio[0] >= goal else "MISSED"
    return f"  {what}: {ratio[0]:.2f}x (CPU time {ratio[1]:.2f}x) -> {met}"


def _targets(setup: Setup, lengths: list[Length], native: bool, bare: Clock | None) -> None:
    by_name = {length.name: length for length in lengths}
    print(f"\ntargets (issue 11); load average now {os.getloadavg()[0]:.1f}:")
    long, short = by_name.get("long"), by_name.get("short")
    if long is not None:
        goal = 2.5 if native else 2.0
        bf16 = "bf16 native" if native else "bf16 not native"
        what = f"long run, default >= {goal:.1f}x the naive loop ({bf16})"
        print(_verdict(what, _faster(long.default, long.naive), goal))
    today = short.fixed.get(TODAY) if short is not None else None
    if short is not None and today is not None:
        what = "short run, default >= 1.00x today's default (fp32, compile off)"
        print(_verdict(what, _faster(short.default, today), 1.0))
    for length in lengths:
        rel = _rel(length.default.val_loss, length.naive.val_loss)
        met = "met" if rel is not None and rel <= 0.02 else "MISSED"
        print(
            f"  {length.name} run, validation loss at most 2% above the naive loop's: "
            f"{_opt(length.default.val_loss, '.4f')} vs {_opt(length.naive.val_loss, '.4f')} "
            f"({_opt(rel, '+.1%')}) -> {met}"
        )
    for length in lengths:
        best = length.best_fixed(setup)
        if best is None:
            print(f"  {length.name} run, automatic choice vs the best fixed one: none ran")
            continue
        partial = "" if len(length.fixed) == len(CHOICES) else f" of {', '.join(length.fixed)}"
        what = (
            f"{length.name} run, automatic choice >= 0.97x the best fixed choice{partial} "
            f"({best.label})"
        )
        print(_verdict(what, _faster(length.default, best), 0.97))
    if today is not None and today.steady is not None and bare is not None:
        ours = today.steady
        n_bare = today.steps - setup.warmup
        per_step = (ours[0] / today.steady_steps, ours[1] / today.steady_steps)
        loop = (bare[0] / n_bare / per_step[0], bare[1] / n_bare / per_step[1])
        what = (
            f"our loop >= 0.97x the bare loop (fp32, compile off, "
            f"{today.threads or setup.threads} threads, steps after the warmup without a "
            f"validation; {per_step[0] * 1e3:.0f} vs {bare[0] / n_bare * 1e3:.0f} ms a step)"
        )
        print(_verdict(what, loop, 0.97))
    for length in lengths:
        print(f"  {length.name} run, MFU of the default recipe: {_opt(length.default.mfu, '.1%')}")


# ---------------------------------------------------------------------------- entry


def bench_train(args: argparse.Namespace) -> None:
    """The default recipe against the naive transformers loop, fixed recipes and a bare loop."""
    import torch

    from trainer.tokenizer import load_tokenizer
    from trainer.train import resolve_device

    short_steps, long_steps, warmup = int(args.short_steps), int(args.long_steps), int(args.warmup)
    fixed: list[str] = list(args.fixed)
    if warmup < 1 or (short_steps and short_steps < warmup + 2) or long_steps < 0:
        raise SystemExit("bench train: --warmup >= 1, --short-steps 0 or >= warmup + 2")
    if not short_steps and not long_steps:
        raise SystemExit("bench train: nothing to run (--short-steps and --long-steps are 0)")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    corpus = _prepare_corpus(work)
    tok = _prepare_tokenizer(corpus, work, int(args.vocab_size))
    if int(args.nproc) > 1:  # DDP against threads instead (scripts/bench_ddp.py)
        from scripts.bench_ddp import bench_ddp

        steps = short_steps or 30
        batch, seq = int(args.batch_size), int(args.seq_len)
        bench_ddp(int(args.nproc), corpus, tok, work / "runs", steps, warmup, batch, seq)
        return
    t = load_tokenizer(tok)
    setup = Setup(
        corpus=corpus,
        tok=tok,
        vocab_size=t.vocab_size,
        pad_id=t.pad_id,
        batch_size=int(args.batch_size),
        seq_len=int(args.seq_len),
        warmup=warmup,
        runs_dir=work / "runs",
        device=resolve_device("auto"),
        threads=torch.get_num_threads(),
    )
    line, native = _machine(setup.device)
    print(line)
    print(
        f"train bench: gpt2 tiny, seq {setup.seq_len}, batch {setup.batch_size}, shakespeare / "
        f"bpe {args.vocab_size}, torch threads {setup.threads}; fixed: {', '.join(fixed) or 'none'}"
        f"; load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    # Untimed: the process's first-use costs (lazy imports, kernel setup) hit no contender.
    _ours(setup, "warm-up", 2, "fp32", "off")
    lengths: list[Length] = []
    bare: Clock | None = None
    if short_steps:
        short_fixed = fixed if TODAY in fixed else [TODAY, *fixed]  # today's default, always
        lengths.append(_length(setup, "short", short_steps, short_fixed))
        today = lengths[-1].fixed.get(TODAY)
        bare = _bare(setup, short_steps, today.threads if today is not None else 0)
        rate = (short_steps - warmup) * setup.tokens_per_step / bare[0]
        print(f"  bare loop (fp32, compile off): {rate:,.0f} tok/s after the warmup", flush=True)
    if long_steps:
        lengths.append(_length(setup, "long", long_steps, fixed))
    for length in lengths:
        _table(setup, length)
    _targets(setup, lengths, native, bare)


def _fixed(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return list(CHOICES)
    if names == ["none"]:
        return []
    unknown = [n for n in names if n not in CHOICES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown {', '.join(unknown)}; pick from {', '.join(CHOICES)}, all or none"
        )
    return list(dict.fromkeys(names))


def train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--short-steps", type=int, default=50, help="short run (0: skip it)")
    p.add_argument("--long-steps", type=int, default=500, help="long run (0: skip it)")
    p.add_argument(
        "--fixed",
        type=_fixed,
        default=list(CHOICES),
        help=f"fixed recipes to run, comma-separated from {', '.join(CHOICES)}, all (default) "
        "or none; the short run always has fp32 (today's default)",
    )
    p.add_argument("--warmup", type=int, default=5, help="steps the loop-vs-bare rates leave out")
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="instead: N processes x 1 thread (DDP) against 1 process x N threads, "
        "--short-steps steps each, and the communication share of a step",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument(
        "--work-dir", type=Path, default=DEFAULT_WORK_DIR, help="corpus and tokenizer cache"
    )
