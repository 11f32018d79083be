"""`python -m trainer`: the ML core from the command line, no service needed.

    python -m trainer corpus shakespeare --out work/corpus
    python -m trainer tokenizer --corpus work/corpus --out work/tok --kind bpe --vocab-size 4096
    python -m trainer train --corpus work/corpus --tokenizer work/tok --out work/run --max-steps 200
    python -m trainer evaluate work/run
    python -m trainer generate work/run "To be" --seed 1
    python -m trainer score work/run "To be, or not to be"

Bad input (a missing corpus, a wrong option value) prints one line on stderr and exits 2.
Heavy libraries are imported by the subcommands that need them.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from trainer.errors import UserError

if TYPE_CHECKING:
    from trainer.report import Progress

EXIT_USER_ERROR = 2


def _cmd_corpus(args: argparse.Namespace) -> int:
    from trainer.corpus import SPLITS, CorpusConfig, prepare_corpus

    cfg = CorpusConfig(
        lowercase=args.lowercase,
        validation_fraction=args.validation_fraction,
        test_fraction=args.test_fraction,
        seed=args.seed,
    )
    manifest = prepare_corpus(args.source, args.out, cfg, root=args.root)
    print(
        f"corpus {manifest.source} ({manifest.source_kind}, {len(manifest.files)} file(s)) "
        f"-> {args.out}"
    )
    for split in SPLITS:
        s = manifest.splits[split]
        print(f"  {split:<10} {s.lines:>8} lines {s.chars:>10} chars")
    return 0


def _cmd_tokenizer(args: argparse.Namespace) -> int:
    from trainer.tokenizer import TokenizerConfig, train_tokenizer

    cfg = TokenizerConfig(
        kind=args.kind,
        vocab_size=args.vocab_size,
        min_frequency=args.min_frequency,
        spm_model_type=args.spm_model_type,
        threads=args.threads,
    )
    stats = train_tokenizer(args.corpus, args.out, cfg)
    print(f"tokenizer {cfg.kind} -> {args.out} (trained in {stats.train_seconds:.1f}s)")
    print(f"  vocab size      {stats.vocab_size}")
    print(
        f"  coverage        {stats.coverage:.4f}  (unk rate {stats.unk_rate:.4f}, "
        f"oov rate {stats.oov_rate:.4f})"
    )
    print(f"  tokens/char     {stats.tokens_per_char:.3f}")
    print(f"  tokens/word     {stats.tokens_per_word:.3f}")
    return 0


# train flag -> TrainConfig field; flags left out keep the TrainConfig default.
_TRAIN_OPTIONS: dict[str, str] = {
    "family": "family",
    "size": "size",
    "seq_len": "max_seq_len",
    "dropout": "dropout",
    "pretrained": "pretrained",
    "epochs": "num_epochs",
    "max_steps": "max_steps",
    "batch_size": "batch_size",
    "lr": "learning_rate",
    "finetune_lr_cap": "finetune_lr_cap",
    "optimizer": "optimizer",
    "weight_decay": "weight_decay",
    "warmup_steps": "warmup_steps",
    "min_lr_ratio": "min_lr_ratio",
    "grad_clip": "gradient_clipping",
    "grad_accum": "grad_accum_steps",
    "eval_every": "eval_every",
    "eval_batches": "eval_batches",
    "checkpoint_every": "checkpoint_every",
    "keep_checkpoints": "keep_checkpoints",
    "patience": "early_stopping_patience",
    "seed": "seed",
    "device": "device",
    "precision": "precision",
    "threads": "threads",
}


def _overrides(items: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        key, _, value = (part.strip() for part in item.partition("="))
        if not key or not value.lstrip("-").isdigit():
            raise UserError(f"--override takes NAME=INTEGER (e.g. n_layer=2), got {item!r}")
        out[key] = int(value)
    return out


def _progress_printer(log_every: int) -> Callable[[Progress], None]:
    def show(p: Progress) -> None:
        if p.step % log_every and p.val_loss is None and p.step != p.total_steps:
            return
        line = (
            f"step {p.step:>6}/{p.total_steps}  epoch {p.epoch}/{p.total_epochs}  "
            f"loss {p.loss:.4f}  lr {p.lr:.2e}  grad {p.grad_norm:.2f}  "
            f"{p.tokens_per_s:,.0f} tok/s"
        )
        if p.val_loss is not None:
            line += f"  val {p.val_loss:.4f} (ppl {p.val_ppl:.2f})"
        print(line, flush=True)

    return show


def _cmd_train(args: argparse.Namespace) -> int:
    from trainer.train import TrainConfig, train

    options: dict[str, object] = {
        field: getattr(args, flag)
        for flag, field in _TRAIN_OPTIONS.items()
        if getattr(args, flag) is not None
    }
    if args.override:
        options["model_overrides"] = _overrides(args.override)
    if args.freeze_embed:
        options["freeze_embed"] = True
    if args.compile:
        options["compile"] = True
    cfg = TrainConfig.from_dict(options)

    # First Ctrl-C: stop after the current step with a checkpoint; second: abort at once.
    stop = {"asked": False}

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        stop["asked"] = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("stopping after this step (Ctrl-C again to abort)", file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        print(f"training {cfg.family} {cfg.size} -> {args.out}", flush=True)
        # Absolute paths: the run's manifest records them for later evaluation.
        result = train(
            cfg,
            args.corpus.resolve(),
            args.tokenizer.resolve(),
            args.out,
            on_progress=_progress_printer(max(1, args.log_every)),
            should_stop=lambda: stop["asked"],
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    print(
        f"{result.status}: {result.steps}/{result.total_steps} steps, {result.tokens:,} tokens, "
        f"{result.tokens_per_s:,.0f} tok/s, {result.elapsed_s:.1f}s"
    )
    if result.resumed_from_step is not None:
        print(f"  resumed from step {result.resumed_from_step}")
    for name, loss, ppl in (
        ("val", result.val_loss, result.val_ppl),
        ("test", result.test_loss, result.test_ppl),
    ):
        if loss is not None and ppl is not None:
            print(f"  {name:<5} loss {loss:.4f}  ppl {ppl:.2f}")
    if result.best_step is not None:
        print(f"  best step {result.best_step}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from trainer.evaluate import eval_paths, evaluate

    metrics = evaluate(
        args.run_dir,
        split=args.split,
        path=args.path,
        corpus_dir=args.corpus,
        out_name=args.name,
        max_tokens=args.max_tokens,
        device=args.device,
    )
    if args.json:
        print(json.dumps(metrics, indent=2))
        return 0
    metrics_file, samples_file = eval_paths(args.run_dir, args.name)
    cut = " (truncated)" if metrics["truncated"] else ""
    print(f"evaluated on {metrics['source']}: {metrics['tokens']} tokens{cut}")
    for key in (
        "loss",
        "perplexity",
        "bits_per_token",
        "bits_per_char",
        "tokens_per_char",
        "tokens_per_word",
        "distinct_1",
        "distinct_2",
        "repetition_rate",
    ):
        value = metrics[key]
        print(f"  {key:<16} {value:.4f}" if isinstance(value, float) else f"  {key:<16} {value}")
    print(f"wrote {metrics_file} and {samples_file}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from trainer.evaluate import generate

    texts = generate(
        args.run_dir,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        stop=args.stop,
        stop_on_eos=not args.no_stop_on_eos,
        seed=args.seed,
        num_return_sequences=args.num_return_sequences,
        device=args.device,
    )
    if args.json:
        print(json.dumps(texts, ensure_ascii=False))
        return 0
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- {i + 1}")
        print(args.prompt + text)
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from trainer.evaluate import score

    result = score(
        args.run_dir,
        args.text,
        detail=args.detail or args.json,
        top_k=args.top_k,
        device=args.device,
    )
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
        return 0
    print(
        f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}  "
        f"bits/char {result['bits_per_char']:.3f}  tokens {result['num_tokens']}  "
        f"chars {result['num_chars']}"
    )
    tokens = result.get("tokens")
    if isinstance(tokens, list):
        for t in tokens:
            top = ", ".join(f"{c['token']!r} {c['prob']:.2f}" for c in t["top_k"])
            print(f"  {t['token']!r:<16} {t['bits']:6.2f} bits   expected: {top}")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    devices = ("auto", "cpu", "cuda")

    c = sub.add_parser("corpus", help="normalize and split a text file/folder or named corpus")
    c.add_argument("source", help="a file or folder of .txt/.md, or a named corpus (shakespeare)")
    c.add_argument("--out", type=Path, required=True, help="output folder")
    c.add_argument("--root", type=Path, help="only read below this folder (paths relative to it)")
    c.add_argument("--lowercase", action="store_true")
    c.add_argument("--validation-fraction", type=float, default=0.1)
    c.add_argument("--test-fraction", type=float, default=0.1)
    c.add_argument("--seed", type=int, default=1337)
    c.set_defaults(run=_cmd_corpus)

    t = sub.add_parser("tokenizer", help="train a tokenizer on a prepared corpus")
    t.add_argument("--corpus", type=Path, required=True, help="prepared corpus folder")
    t.add_argument("--out", type=Path, required=True, help="output folder")
    t.add_argument("--kind", choices=("bpe", "sentencepiece", "char"), default="bpe")
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--min-frequency", type=int, default=2)
    t.add_argument("--spm-model-type", choices=("unigram", "bpe"), default="unigram")
    t.add_argument("--threads", type=int, default=0, help="0 = all cores")
    t.set_defaults(run=_cmd_tokenizer)

    r = sub.add_parser("train", help="train (or resume) a model; Ctrl-C stops with a checkpoint")
    r.add_argument("--corpus", type=Path, required=True, help="prepared corpus folder")
    r.add_argument("--tokenizer", type=Path, required=True, help="trained tokenizer folder")
    r.add_argument("--out", type=Path, required=True, help="run folder (resumed if it has one)")
    r.add_argument("--family", choices=("gpt2", "llama", "qwen", "char_lstm"))
    r.add_argument("--size", choices=("tiny", "small", "medium", "large"))
    r.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="NAME=INT",
        help="model dimension override, e.g. n_layer=2 (repeatable)",
    )
    r.add_argument("--seq-len", type=int)
    r.add_argument("--dropout", type=float)
    r.add_argument("--pretrained", help="run folder or local HF model folder to fine-tune")
    r.add_argument("--freeze-embed", action="store_true")
    r.add_argument("--epochs", type=int)
    r.add_argument("--max-steps", type=int)
    r.add_argument("--batch-size", type=int)
    r.add_argument("--lr", type=float)
    r.add_argument("--finetune-lr-cap", type=float)
    r.add_argument("--optimizer", choices=("adamw", "adam", "sgd"))
    r.add_argument("--weight-decay", type=float)
    r.add_argument("--warmup-steps", type=int)
    r.add_argument("--min-lr-ratio", type=float)
    r.add_argument("--grad-clip", type=float)
    r.add_argument("--grad-accum", type=int)
    r.add_argument("--eval-every", type=int)
    r.add_argument("--eval-batches", type=int)
    r.add_argument("--checkpoint-every", type=int)
    r.add_argument("--keep-checkpoints", type=int)
    r.add_argument("--patience", type=int, help="early stopping after N validations w/o gain")
    r.add_argument("--seed", type=int)
    r.add_argument("--device", choices=devices)
    r.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"))
    r.add_argument("--threads", type=int, help="torch threads (0 = torch's default)")
    r.add_argument("--compile", action="store_true", help="torch.compile (pays on long runs)")
    r.add_argument("--log-every", type=int, default=10, help="print every N steps")
    r.set_defaults(run=_cmd_train)

    e = sub.add_parser("evaluate", help="metrics and samples into RUN_DIR/eval/")
    e.add_argument("run_dir", type=Path)
    src = e.add_mutually_exclusive_group()
    src.add_argument("--split", choices=("validation", "test"), default="validation")
    src.add_argument("--path", type=Path, help="evaluate on this text file instead")
    e.add_argument("--corpus", type=Path, help="corpus folder (default: the run's)")
    e.add_argument("--name", default="metrics", help="output name (eval/NAME.json)")
    e.add_argument("--max-tokens", type=int, help="score only the first lines up to N tokens")
    e.add_argument("--device", choices=devices, default="auto")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    e.set_defaults(run=_cmd_evaluate)

    g = sub.add_parser("generate", help="continue a prompt")
    g.add_argument("run_dir", type=Path)
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=100)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=50, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    g.add_argument("--no-stop-on-eos", action="store_true", help="go on past the end of a line")
    g.add_argument("--seed", type=int)
    g.add_argument("-n", "--num-return-sequences", type=int, default=1)
    g.add_argument("--device", choices=devices, default="auto")
    g.add_argument("--json", action="store_true", help="print the continuations as JSON")
    g.set_defaults(run=_cmd_generate)

    s = sub.add_parser("score", help="loss and per-token surprisal of a text")
    s.add_argument("run_dir", type=Path)
    s.add_argument("text")
    s.add_argument("--detail", action="store_true", help="per token bits and expectations")
    s.add_argument("--top-k", type=int, default=5)
    s.add_argument("--device", choices=devices, default="auto")
    s.add_argument("--json", action="store_true", help="print everything as JSON")
    s.set_defaults(run=_cmd_score)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
