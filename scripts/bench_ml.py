"""The ML benchmarks of scripts/bench: `train` and `tokenizer` (registered in scripts/bench.py).

train: tokens/s of our training loop (trainer.train.train, default callbacks and
checkpoint cadence) against a bare PyTorch loop over the same transformers model and data
(forward, backward, optimizer step, nothing else) and against transformers.Trainer (when
`accelerate` is installed), all in one process with the same threads; then bf16 autocast
against fp32 on the CPU: tokens/s and the validation loss after the same steps.

tokenizer: training a tokenizer through trainer.tokenizer.train_tokenizer against calling
the library directly (HF `tokenizers` for bpe, sentencepiece for spm) on the same split.

Both prepare the shakespeare corpus (and the bpe tokenizer the train bench uses) once,
cached under --work-dir. Heavy imports happen inside the benchmarks.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from trainer.data import TokenWindows

DEFAULT_WORK_DIR = Path(os.environ.get("MT_DATA_DIR", ".model-trainer")) / "bench"


def _prepare_corpus(work: Path) -> Path:
    from trainer.corpus import CorpusConfig, prepare_corpus

    corpus = work / "corpus-shakespeare"
    prepare_corpus("shakespeare", corpus, CorpusConfig())  # cached when already there
    return corpus


def _prepare_tokenizer(corpus: Path, work: Path, vocab_size: int) -> Path:
    from trainer.tokenizer import TokenizerConfig, read_tokenizer_manifest, train_tokenizer

    out = work / f"tok-bpe-{vocab_size}"
    cfg = TokenizerConfig(tokenizer_kind="bpe", vocab_size=vocab_size)
    if (out / "mt_tokenizer.json").is_file() and read_tokenizer_manifest(out)[0] == cfg:
        return out
    train_tokenizer(corpus, out, cfg)
    return out


# ------------------------------------------------------------------------------ train


@dataclass
class Timing:
    """Rates of one variant, one per repeat: tokens per wall second and per CPU second.

    CPU seconds (all threads of this process) barely move when other processes load the
    machine, wall seconds do: the CPU rate is the steadier comparison on a busy machine.
    """

    label: str
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    val_loss: float | None = None
    note: str = ""

    def add(self, rate: tuple[float, float]) -> None:
        self.wall.append(rate[0])
        self.cpu.append(rate[1])

    @property
    def best(self) -> float:
        return max(self.wall)

    @property
    def best_cpu(self) -> float:
        return max(self.cpu)


Stamp = tuple[int, float, float]  # (steps done, perf_counter, process_time)


def _stamp(step: int) -> Stamp:
    return step, time.perf_counter(), time.process_time()


def _rates(a: Stamp, b: Stamp, tokens_per_step: int) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second) between two stamps."""
    tokens = (b[0] - a[0]) * tokens_per_step
    return tokens / (b[1] - a[1]), tokens / (b[2] - a[2])


def _ours(
    args: argparse.Namespace, corpus: Path, tok: Path, precision: str, work: Path
) -> tuple[tuple[float, float], float | None, float]:
    """(rates over the measured steps, final validation loss, validation seconds)."""
    from trainer.config import load_config
    from trainer.report import Progress
    from trainer.train import train

    run_dir = work / f"run-{precision}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a leftover checkpoint would be resumed
    steps = args.warmup + args.steps
    cfg = load_config(
        {
            "model_family": "gpt2",
            "model_size": "tiny",
            "max_seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "max_steps": steps + 1,
            "warmup_steps": 10,
            "learning_rate": 1e-3,
            "threads": args.threads,
            "device": "cpu",
            "precision": precision,
            "seed": 1337,
        }
    )
    stamps: dict[int, Stamp] = {}

    def on_progress(p: Progress) -> None:
        stamps[p.step] = _stamp(p.step)

    # The last step (steps + 1) also runs the final validation: it is timed apart.
    result = train(cfg, corpus, tok, run_dir, on_progress=on_progress)
    tokens_per_step = args.batch_size * args.seq_len
    rates = _rates(stamps[args.warmup], stamps[steps], tokens_per_step)
    val_s = max(0.0, stamps[steps + 1][1] - stamps[steps][1] - tokens_per_step / rates[0])
    val = result.val_history[-1][1] if result.val_history else None
    shutil.rmtree(run_dir, ignore_errors=True)
    return rates, val, val_s


def _gpt2_tiny(tok: Path, seq_len: int) -> torch.nn.Module:
    import torch

    from trainer.model import ModelConfig, build_model
    from trainer.tokenizer import load_tokenizer

    t = load_tokenizer(tok)
    torch.manual_seed(1337)
    return build_model(
        ModelConfig(
            family="gpt2",
            size="tiny",
            vocab_size=t.vocab_size,
            max_seq_len=seq_len,
            pad_id=t.pad_id,
            bos_id=t.bos_id,
            eos_id=t.eos_id,
        )
    )


def _train_windows(
    corpus: Path, tok: Path, args: argparse.Namespace, shuffle: bool = True
) -> TokenWindows:
    from trainer.data import TokenWindows, dir_sha256, encode_splits
    from trainer.tokenizer import load_tokenizer

    # The token cache train() uses, so every variant reads the same file.
    info = encode_splits(corpus, tok, corpus / "tokens" / dir_sha256(tok)[:16])
    return TokenWindows(
        info.path("train"),
        info.meta.dtype,
        args.seq_len,
        args.batch_size,
        load_tokenizer(tok).pad_id,
        seed=1337,
        shuffle=shuffle,
    )


def _bare(args: argparse.Namespace, corpus: Path, tok: Path) -> tuple[float, float]:
    """The same model, data and optimizer settings in the plainest loop."""
    import torch
    import torch.nn.functional as F

    windows = _train_windows(corpus, tok, args)
    model = _gpt2_tiny(tok, args.seq_len)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    start = _stamp(0)
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            start = _stamp(step)
        x, y = windows.batch(0, step % windows.batches_per_epoch)
        out = model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(out.view(-1, out.size(-1)), y.view(-1), ignore_index=-100)
        torch.autograd.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return _rates(start, _stamp(args.warmup + args.steps), args.batch_size * args.seq_len)


def _hf_trainer(
    args: argparse.Namespace, corpus: Path, tok: Path, work: Path
) -> tuple[float, float]:
    """transformers.Trainer over the same model and windows; timed by a step callback."""
    import numpy as np
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    windows = _train_windows(corpus, tok, args, shuffle=False)

    class Windows(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
        # transformers shifts labels itself: give it the unshifted window as labels.
        def __len__(self) -> int:
            return windows.num_windows

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            x, _ = windows.windows(np.array([i], dtype=np.int64))
            return {"input_ids": x[0], "labels": x[0]}

    stamps: list[Stamp] = []

    class StepStamps(TrainerCallback):
        def on_step_end(self, *_: object, **__: object) -> None:
            stamps.append(_stamp(len(stamps) + 1))

    targs = TrainingArguments(
        output_dir=str(work / "hf-trainer"),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.warmup + args.steps,
        learning_rate=1e-3,
        warmup_steps=10,
        weight_decay=0.1,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        lr_scheduler_type="cosine",
        logging_steps=10_000,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=1337,
    )
    trainer = Trainer(
        model=_gpt2_tiny(tok, args.seq_len),
        args=targs,
        train_dataset=Windows(),
        callbacks=[StepStamps()],
    )
    trainer.train()
    shutil.rmtree(work / "hf-trainer", ignore_errors=True)
    return _rates(stamps[args.warmup - 1], stamps[-1], args.batch_size * args.seq_len)


def bench_train(args: argparse.Namespace) -> None:
    """Our training loop against a bare PyTorch loop and transformers.Trainer; bf16 vs fp32."""
    import torch

    from trainer.train import cpu_supports_bf16

    if args.warmup < 1 or args.steps < 2:
        raise SystemExit("bench train: --warmup must be >= 1 and --steps >= 2")
    torch.set_num_threads(args.threads)
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    corpus = _prepare_corpus(work)
    tok = _prepare_tokenizer(corpus, work, args.vocab_size)

    bare = Timing("bare PyTorch loop (fp32)")
    ours = Timing("ours: trainer.train (fp32)")
    hf = Timing("transformers.Trainer (fp32)")
    ours_bf16 = Timing("ours: trainer.train (bf16 autocast)")
    bf16_ok = cpu_supports_bf16()
    if not bf16_ok:
        ours_bf16.note = "skipped: this CPU has no native bf16 (avx512_bf16/amx_bf16)"
    if importlib.util.find_spec("accelerate") is None:
        hf.note = "skipped: transformers.Trainer needs `accelerate`, which is not installed"
    val_s: list[float] = []
    print(
        f"train bench: gpt2 tiny (4 layers, 256 wide), seq {args.seq_len}, batch "
        f"{args.batch_size}, {args.threads} thread(s), {args.warmup} warmup + {args.steps} "
        f"measured steps, shakespeare / bpe {args.vocab_size}, {args.repeat} repeat(s); "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    # Interleaved repeats: a neighbour's load on the machine hits every variant alike.
    for r in range(args.repeat):
        bare.add(_bare(args, corpus, tok))
        print(f"  [{r + 1}] bare {bare.wall[-1]:,.0f} tok/s", flush=True)
        rates, ours.val_loss, v = _ours(args, corpus, tok, "fp32", work)
        ours.add(rates)
        val_s.append(v)
        print(f"  [{r + 1}] ours fp32 {ours.wall[-1]:,.0f} tok/s", flush=True)
        if not hf.note:
            hf.add(_hf_trainer(args, corpus, tok, work))
            print(f"  [{r + 1}] transformers.Trainer {hf.wall[-1]:,.0f} tok/s", flush=True)
        if bf16_ok:
            rates, ours_bf16.val_loss, _ = _ours(args, corpus, tok, "bf16", work)
            ours_bf16.add(rates)
            print(f"  [{r + 1}] ours bf16 {ours_bf16.wall[-1]:,.0f} tok/s", flush=True)

    print()
    print(f"{'':38} {'tok/s':>7} {'vs bare':>8} {'tok/CPU-s':>10} {'vs bare':>8}")
    for t in (bare, ours, hf, ours_bf16):
        if t.note:
            print(f"{t.label:38} {t.note}")
        else:
            print(
                f"{t.label:38} {t.best:7,.0f} {t.best / bare.best:8.1%} "
                f"{t.best_cpu:10,.0f} {t.best_cpu / bare.best_cpu:8.1%}"
            )
    print()
    print(
        f"targets (best of repeats; wall, then CPU time); load average now "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores:"
    )
    print(_verdict("ours >= 0.95 x bare", ours, bare, 0.95))
    if hf.note:
        print(f"  ours >= 1.1 x transformers.Trainer: not measured ({hf.note[9:]})")
    else:
        print(_verdict("ours >= 1.1 x transformers.Trainer", ours, hf, 1.1))
    if bf16_ok:
        print(_verdict("bf16 >= 1.5 x fp32 tokens/s", ours_bf16, ours, 1.5))
        if ours.val_loss is not None and ours_bf16.val_loss is not None:
            rel = abs(ours_bf16.val_loss - ours.val_loss) / ours.val_loss
            verdict = "met" if rel <= 0.02 else "MISSED"
            print(
                f"  bf16 val loss within 2% of fp32 after {args.warmup + args.steps + 1} "
                f"steps: fp32 {ours.val_loss:.4f}, bf16 {ours_bf16.val_loss:.4f} "
                f"({rel:.2%}) -> {verdict}"
            )
    else:
        print(f"  bf16: {ours_bf16.note}")
    step_s = args.batch_size * args.seq_len / ours.best
    median_val = statistics.median(val_s)
    print(
        f"info: one validation (20 batches, the default) took {median_val:.1f}s = "
        f"{median_val / step_s:.1f} training steps; at the default cadence (every 100 steps) "
        f"that adds {median_val / (100 * step_s):.1%} to a run, not counted above"
    )


def _verdict(what: str, a: Timing, b: Timing, target: float) -> str:
    wall, cpu = a.best / b.best, a.best_cpu / b.best_cpu
    return (
        f"  {what}: {wall:.2f}x -> {'met' if wall >= target else 'MISSED'}; "
        f"CPU time {cpu:.2f}x -> {'met' if cpu >= target else 'MISSED'}"
    )


def train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=40, help="measured steps")
    p.add_argument("--warmup", type=int, default=5, help="steps before measuring")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--repeat", type=int, default=1, help="interleaved repeats, best counts")
    p.add_argument(
        "--work-dir", type=Path, default=DEFAULT_WORK_DIR, help="corpus and tokenizer cache"
    )


# -------------------------------------------------------------------------- tokenizer


def _direct_bpe(train_file: Path, out: Path, vocab_size: int) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    from trainer.tokenizer import _BPE_SPLIT, SPECIAL_TOKENS

    # The same tokenizer as ours (NFC, the split regex, byte-level), built by hand.
    hf = Tokenizer(models.BPE())
    hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_BPE_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    hf.train([str(train_file)], trainer)
    hf.save(str(out / "tokenizer.json"))


def _direct_spm(train_file: Path, out: Path, vocab_size: int) -> None:
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        input=str(train_file),
        model_prefix=str(out / "spm"),
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        pad_piece="<pad>",
        unk_piece="<unk>",
        bos_piece="<bos>",
        eos_piece="<eos>",
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        byte_fallback=False,
        character_coverage=1.0,
        input_sentence_size=2_000_000,
        shuffle_input_sentence=True,
        max_sentence_length=1 << 16,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )


def _timed(fn: Callable[[Path], object], work: Path) -> float:
    out = Path(tempfile.mkdtemp(prefix="tok-", dir=work))
    try:
        t0 = time.perf_counter()
        fn(out)
        return time.perf_counter() - t0
    finally:
        shutil.rmtree(out, ignore_errors=True)


def bench_tokenizer(args: argparse.Namespace) -> None:
    """Tokenizer training through trainer/ against the libraries called directly."""
    from protocol.settings import TokenizerKind
    from trainer.corpus import split_path
    from trainer.tokenizer import TokenizerConfig, train_tokenizer

    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    corpus = _prepare_corpus(work)
    train_file = split_path(corpus, "train")
    size = train_file.stat().st_size
    print(
        f"tokenizer bench: shakespeare train split ({size / 1e6:.1f} MB), vocab "
        f"{args.vocab_size}, {os.cpu_count()} core(s), {args.repeat} repeat(s)",
        flush=True,
    )
    kinds: dict[str, tuple[TokenizerKind, Callable[[Path, Path, int], None]]] = {
        "bpe": ("bpe", _direct_bpe),
        "sentencepiece": ("sentencepiece", _direct_spm),
    }
    rows: list[tuple[str, float, float, float]] = []
    for name in args.kinds:
        kind, direct = kinds[name]
        cfg = TokenizerConfig(tokenizer_kind=kind, vocab_size=args.vocab_size)
        train_only: list[float] = []

        def ours(
            out: Path, cfg: TokenizerConfig = cfg, train_only: list[float] = train_only
        ) -> None:
            train_only.append(train_tokenizer(corpus, out / "tok", cfg).train_seconds)

        def lib(out: Path, direct: Callable[[Path, Path, int], None] = direct) -> None:
            direct(train_file, out, args.vocab_size)

        ours_s: list[float] = []
        lib_s: list[float] = []
        for r in range(args.repeat):  # interleaved, best of each counts
            lib_s.append(_timed(lib, work))
            ours_s.append(_timed(ours, work))
            print(
                f"  [{r + 1}] {name}: library {lib_s[-1]:.2f}s, ours {ours_s[-1]:.2f}s "
                f"(training {train_only[-1]:.2f}s)",
                flush=True,
            )
        rows.append((name, min(lib_s), min(ours_s), min(train_only)))

    print()
    print(f"{'':14} {'library s':>10} {'ours s':>8} {'ours train s':>13} {'ratio':>6}")
    for name, lib_best, ours_best, train_best in rows:
        print(
            f"{name:14} {lib_best:10.2f} {ours_best:8.2f} {train_best:13.2f} "
            f"{lib_best / ours_best:6.2f}"
        )
    print()
    print(
        "target: library time / our time >= 0.9 (ours end to end: train, stats on the "
        "validation split, HF files)"
    )
    for name, lib_best, ours_best, train_best in rows:
        ratio = lib_best / ours_best
        print(
            f"  {name}: {ratio:.2f} -> {'met' if ratio >= 0.9 else 'MISSED'} "
            f"(training alone {lib_best / train_best:.2f})"
        )


def tokenizer_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--kinds", nargs="+", choices=("bpe", "sentencepiece"), default=["bpe", "sentencepiece"]
    )
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--repeat", type=int, default=1, help="interleaved repeats, best counts")
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR, help="corpus cache")
