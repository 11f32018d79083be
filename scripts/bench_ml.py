"""The tokenizer benchmark of scripts/bench (registered in scripts/bench.py), and the corpus
and tokenizer the ML benchmarks share (scripts/bench_train.py is the train one).

tokenizer: training a tokenizer through trainer.tokenizer.train_tokenizer against calling
the library directly (HF `tokenizers` for bpe, sentencepiece for spm) on the same split.

Both benchmarks prepare the shakespeare corpus (and the train bench its bpe tokenizer) once,
cached under --work-dir. Heavy imports happen inside the benchmarks.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

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
