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
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, TypeVar

import msgspec

from protocol.flags import add_flags, field_message, given, struct_fields
from protocol.settings import GenerateSettings
from trainer.config import TrainConfig
from trainer.corpus import CorpusConfig
from trainer.errors import UserError
from trainer.tokenizer import TokenizerConfig

if TYPE_CHECKING:
    from trainer.report import Progress, StartInfo, TrainResult

EXIT_USER_ERROR = 2


def _cmd_corpus(args: argparse.Namespace) -> int:
    from trainer.corpus import SPLITS, prepare_corpus

    manifest = prepare_corpus(args.source, args.out, corpus_config(args), root=args.root)
    print(
        f"corpus {manifest.source} ({manifest.source_kind}, {len(manifest.files)} file(s)) "
        f"-> {args.out}"
    )
    for split in SPLITS:
        s = manifest.splits[split]
        print(f"  {split:<10} {s.lines:>8} lines {s.chars:>10} chars")
    return 0


def _cmd_tokenizer(args: argparse.Namespace) -> int:
    from trainer.tokenizer import train_tokenizer

    cfg = _settings(TokenizerConfig, given(args, TOKENIZER_FIELDS))
    stats = train_tokenizer(args.corpus, args.out, cfg)
    print(f"tokenizer {cfg.tokenizer_kind} -> {args.out} (trained in {stats.train_seconds:.1f}s)")
    print(f"  vocab size      {stats.vocab_size}")
    print(
        f"  coverage        {stats.coverage:.4f}  (unk rate {stats.unk_rate:.4f}, "
        f"oov rate {stats.oov_rate:.4f})"
    )
    print(f"  tokens/char     {stats.tokens_per_char:.3f}")
    print(f"  tokens/word     {stats.tokens_per_word:.3f}")
    return 0


S = TypeVar("S", bound=msgspec.Struct)

# The flags are the settings' fields (protocol.settings), so that they cannot drift from the
# service's; a few keep the short spelling they had before as an alias.
CORPUS_FIELDS = struct_fields(CorpusConfig)
TOKENIZER_FIELDS = struct_fields(TokenizerConfig, skip=("lowercase",))
TRAIN_FIELDS = struct_fields(TrainConfig)
GENERATE_FIELDS = struct_fields(GenerateSettings)
ALIASES: dict[str, list[str]] = {
    "tokenizer_kind": ["--kind"],
    "model_family": ["--family"],
    "model_size": ["--size"],
    "max_seq_len": ["--seq-len"],
    "num_epochs": ["--epochs"],
    "learning_rate": ["--lr"],
    "gradient_clipping": ["--grad-clip"],
    "grad_accum_steps": ["--grad-accum"],
    "early_stopping_patience": ["--patience"],
    "num_return_sequences": ["-n"],
}


def _settings(typ: type[S], values: dict[str, object]) -> S:
    try:
        return msgspec.convert(values, typ)
    except msgspec.ValidationError as e:
        raise UserError(field_message(e, typ.__name__)) from None


def corpus_config(args: argparse.Namespace) -> CorpusConfig:
    """The corpus configuration the `corpus` flags ask for (defaults: the settings')."""
    return _settings(CorpusConfig, given(args, CORPUS_FIELDS))


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The training configuration the `train` flags ask for (defaults: the settings')."""
    values = given(args, TRAIN_FIELDS)
    if args.override:
        values["model_overrides"] = _overrides(args.override)
    cfg = _settings(TrainConfig, values)
    cfg.validate()
    return cfg


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
        if p.mfu is not None:
            line += f"  MFU {p.mfu:.1%}"
        if p.val_loss is not None:
            line += f"  val {p.val_loss:.4f} (ppl {p.val_ppl:.2f})"
        for sample in p.samples:  # JSON-quoted: one line each, a newline shows as \n
            quoted = [msgspec.json.encode(t).decode() for t in (sample.prompt, sample.text)]
            line += f"\n    sample: {quoted[0]} → {quoted[1]}"
        print(line, flush=True)

    return show


def _train_rank(
    cfg: TrainConfig, corpus: Path, tokenizer: Path, out: Path, log_every: int, cache_dir: Path
) -> TrainResult | str:
    """One process of a DDP run (trainer.distributed.launch): rank 0 prints. A user error is
    returned, not raised: the launcher would restart the group for it."""
    from trainer.distributed import close_rank, init_rank
    from trainer.train import train

    world = init_rank(cfg)
    try:
        return train(
            cfg,
            corpus,
            tokenizer,
            out,
            on_progress=_progress_printer(log_every),
            on_start=_print_start,
            cache_dir=cache_dir,
        )
    except UserError as e:
        return str(e) if world.leader else ""
    finally:
        close_rank()


def _print_start(info: StartInfo) -> None:
    ranks = f", {info.world_size} processes ({info.backend}) x" if info.world_size > 1 else ","
    print(
        f"{info.device} {info.precision}{' compiled' if info.compile else ''}{ranks} "
        f"{info.threads} threads: {info.recipe}",
        flush=True,
    )


def _launch(cfg: TrainConfig, args: argparse.Namespace, nproc: int) -> TrainResult:
    """The run on nproc processes of this machine, through the elastic launcher."""
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # By its importable name: under `python -m trainer` this module is __main__, which the
    # spawned processes cannot unpickle a function from.
    from trainer.__main__ import _train_rank
    from trainer.distributed import launch, start_method

    if cfg.nnodes > 1:
        raise UserError("nnodes > 1 trains through the service (model-trainer), not here")
    print(f"training on {nproc} processes (DDP)", flush=True)
    try:
        results = launch(
            _train_rank,
            (
                cfg,
                args.corpus.resolve(),
                args.tokenizer.resolve(),
                args.out.resolve(),
                max(1, args.log_every),
                args.cache_dir.resolve(),
            ),
            nproc=nproc,
            run_id=uuid.uuid4().hex[:12],
            method=start_method(cfg),
            max_restarts=cfg.max_restarts,
        )
    except ChildFailedError as e:  # past max_restarts: the launcher's account of it
        print(f"error: training failed: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    outcome = results[0]
    if isinstance(outcome, str):
        raise UserError(outcome)
    return outcome


def _cmd_train(args: argparse.Namespace) -> int:
    from trainer.distributed import check_world, procs_per_node
    from trainer.train import train

    cfg = train_config(args)
    nproc = procs_per_node(cfg)
    check_world(cfg, nproc * cfg.nnodes)
    if nproc * cfg.nnodes > 1:
        return _report(_launch(cfg, args, nproc))

    # First Ctrl-C: stop after the current step with a checkpoint; second: abort at once.
    stop = {"asked": False}

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        stop["asked"] = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("stopping after this step (Ctrl-C again to abort)", file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        print(f"training {cfg.model_family} {cfg.model_size} -> {args.out}", flush=True)
        # Absolute paths: the run's manifest records them for later evaluation.
        result = train(
            cfg,
            args.corpus.resolve(),
            args.tokenizer.resolve(),
            args.out,
            on_progress=_progress_printer(max(1, args.log_every)),
            should_stop=lambda: stop["asked"],
            on_start=_print_start,
            cache_dir=args.cache_dir,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    return _report(result)


def _report(result: TrainResult) -> int:
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
        _settings(GenerateSettings, given(args, GENERATE_FIELDS)),
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

    c = sub.add_parser("corpus", help="normalize and split a corpus file/folder or named corpus")
    c.add_argument(
        "source",
        help="a file or folder (.txt .md .jsonl .json .csv .tsv .parquet, maybe .gz/.zst; a "
        "datasets save_to_disk folder) or a named corpus (shakespeare)",
    )
    c.add_argument("--out", type=Path, required=True, help="output folder")
    c.add_argument("--root", type=Path, help="only read below this folder (paths relative to it)")
    add_flags(c, CORPUS_FIELDS)
    c.set_defaults(run=_cmd_corpus)

    t = sub.add_parser("tokenizer", help="train a tokenizer on a prepared corpus")
    t.add_argument("--corpus", type=Path, required=True, help="prepared corpus folder")
    t.add_argument("--out", type=Path, required=True, help="output folder")
    add_flags(t, TOKENIZER_FIELDS, ALIASES)
    t.set_defaults(run=_cmd_tokenizer)

    r = sub.add_parser("train", help="train (or resume) a model; Ctrl-C stops with a checkpoint")
    r.add_argument("--corpus", type=Path, required=True, help="prepared corpus folder")
    r.add_argument("--tokenizer", type=Path, required=True, help="trained tokenizer folder")
    r.add_argument("--out", type=Path, required=True, help="run folder (resumed if it has one)")
    add_flags(r.add_argument_group("training settings"), TRAIN_FIELDS, ALIASES)
    r.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="NAME=INT",
        help="model dimension override, e.g. n_layer=2 (repeatable)",
    )
    r.add_argument("--log-every", type=int, default=10, help="print every N steps")
    r.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("MT_DATA_DIR") or ".model-trainer") / "cache",
        help="what is measured on this machine: the recipe probe, compiled code "
        "(default: the service's, $MT_DATA_DIR/cache)",
    )
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
    add_flags(g, GENERATE_FIELDS, ALIASES)
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
