"""Token data: corpus splits encoded once into flat token files, read as fixed windows.

A prepared corpus has one document per non-empty line (see trainer.corpus), so every line
is encoded on its own and followed by the tokenizer's eos id: eos is the line separator
the model learns. The flat stream is cut into consecutive windows of seq_len + 1 tokens
that overlap by one token (window i starts at i * seq_len), so every token is a target
exactly once; a short last window, or a split smaller than one window, is padded and its
padding masked out of the loss (label -100).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, Literal

import msgspec
import numpy as np
import numpy.typing as npt
import torch

from trainer.corpus import SPLITS
from trainer.errors import UserError
from trainer.jsonfile import BadFile, dumps, read_json
from trainer.tokenizer import Tokenizer, load_tokenizer

TOKENS_VERSION = 1
META_NAME = "tokens.json"
IGNORE_INDEX = -100  # label of a masked position (torch cross_entropy's default ignore_index)
_CHUNK_LINES = 2048


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def dir_sha256(path: Path) -> str:
    """Over the names and bytes of the regular files directly in path, in name order."""
    h = hashlib.sha256()
    for p in sorted(q for q in path.iterdir() if q.is_file()):
        h.update(f"{p.name}\0{p.stat().st_size}\0".encode())
        h.update(bytes.fromhex(file_sha256(p)))
    return h.hexdigest()


TokenDtype = Literal["uint16", "uint32"]


class TokenFiles(msgspec.Struct, frozen=True, kw_only=True):
    """tokens.json: what the {split}.bin files beside it hold."""

    version: int = TOKENS_VERSION
    dtype: TokenDtype
    vocab_size: int
    pad_id: int
    eos_id: int
    tokens: dict[str, int]  # tokens per split
    corpus_sha256: dict[str, str]  # per split text file
    tokenizer_sha256: str
    created_at: str


@dataclass(frozen=True)
class TokenDataInfo:
    dir: Path
    meta: TokenFiles

    def path(self, split: str) -> Path:
        return self.dir / f"{split}.bin"

    @property
    def fingerprint(self) -> str:
        """Identifies the token data (corpus + tokenizer), e.g. to refuse a mismatched resume."""
        m = self.meta
        parts = [m.tokenizer_sha256, *(m.corpus_sha256[s] for s in SPLITS)]
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def token_dtype(vocab_size: int) -> TokenDtype:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def load_token_data(out_dir: Path) -> TokenDataInfo | None:
    """The token data in out_dir, or None when it is missing or incomplete."""
    try:
        info = TokenDataInfo(out_dir, read_json(out_dir / META_NAME, TokenFiles, TOKENS_VERSION))
    except (OSError, BadFile):
        return None  # encoded again
    itemsize = np.dtype(info.meta.dtype).itemsize
    for split in SPLITS:
        p = info.path(split)
        if not p.is_file() or p.stat().st_size != info.meta.tokens.get(split, -1) * itemsize:
            return None
    return info


def encode_splits(
    corpus_dir: Path, tokenizer_dir: Path, out_dir: Path, threads: int = 0
) -> TokenDataInfo:
    """Encode corpus_dir/{train,validation,test}.txt into out_dir/{split}.bin + tokens.json.

    Cached: when out_dir already holds the encoding of these exact split files with this
    exact tokenizer it is returned as is. Written to a temp dir and renamed into place, so
    a reader never sees a half-written encoding. threads=0 uses every core.
    """
    texts = {s: corpus_dir / f"{s}.txt" for s in SPLITS}
    missing = [str(p) for p in texts.values() if not p.is_file()]
    if missing:
        raise UserError(f"prepared corpus is incomplete, missing: {', '.join(missing)}")
    corpus_sha = {s: file_sha256(p) for s, p in texts.items()}
    tok_sha = dir_sha256(tokenizer_dir)
    cached = load_token_data(out_dir)
    if (
        cached
        and cached.meta.corpus_sha256 == corpus_sha
        and cached.meta.tokenizer_sha256 == tok_sha
    ):
        return cached

    tok = load_tokenizer(tokenizer_dir)
    dtype = token_dtype(tok.vocab_size)
    n_threads = threads if threads > 0 else os.cpu_count() or 1
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        counts = {
            s: _encode_file(tok, texts[s], tmp / f"{s}.bin", dtype, n_threads) for s in SPLITS
        }
        meta = TokenFiles(
            dtype=dtype,
            vocab_size=tok.vocab_size,
            pad_id=tok.pad_id,
            eos_id=tok.eos_id,
            tokens=counts,
            corpus_sha256=corpus_sha,
            tokenizer_sha256=tok_sha,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        (tmp / META_NAME).write_text(dumps(meta))
        info = TokenDataInfo(out_dir, meta)
        _replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info


def _replace_dir(src: Path, dst: Path) -> None:
    if dst.exists():  # a stale encoding (other corpus/tokenizer): move it aside first
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        try:
            dst.rename(old)
        except FileNotFoundError:
            pass  # another process replaced it meanwhile
        else:
            shutil.rmtree(old, ignore_errors=True)
    try:
        src.rename(dst)
    except OSError:
        # A concurrent encoder renamed its (identical) result into place first.
        if load_token_data(dst) is None:
            raise


def _chunks(path: Path) -> Iterator[list[str]]:
    chunk: list[str] = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            text = line.rstrip("\n")
            if text:
                chunk.append(text)
                if len(chunk) == _CHUNK_LINES:
                    yield chunk
                    chunk = []
    if chunk:
        yield chunk


def _encode_file(tok: Tokenizer, src: Path, dst: Path, dtype: str, threads: int) -> int:
    """Encode src line by line (each line + eos) into the flat token file dst; token count."""
    eos = tok.eos_id

    def encode(lines: list[str]) -> npt.NDArray[np.int64]:
        flat: list[int] = []
        for ids in tok.encode_batch(lines):
            flat.extend(ids)
            flat.append(eos)
        return np.asarray(flat, dtype=np.int64)

    total = 0
    with dst.open("wb") as out, ThreadPoolExecutor(max_workers=threads) as pool:
        # A bounded window of chunks in flight keeps memory flat while keeping line order.
        pending: deque[Future[npt.NDArray[np.int64]]] = deque()
        for chunk in _chunks(src):
            pending.append(pool.submit(encode, chunk))
            if len(pending) >= 2 * threads:
                total += _write(pending.popleft().result(), out, dtype)
        while pending:
            total += _write(pending.popleft().result(), out, dtype)
    return total


def _write(ids: npt.NDArray[np.int64], out: BinaryIO, dtype: str) -> int:
    ids.astype(dtype).tofile(out)
    return int(ids.size)


class TokenWindows:
    """Fixed windows of seq_len + 1 tokens over a flat token file, served as (x, y) batches.

    Batch `index` of `epoch` takes windows order(epoch)[index * B : (index + 1) * B]; the
    order is a permutation seeded by (seed, epoch) (or the identity without shuffle), so
    (epoch, index) is a complete data position for a checkpoint. The last batch of an
    epoch may be smaller.
    """

    def __init__(
        self,
        path: Path,
        dtype: str,
        seq_len: int,
        batch_size: int,
        pad_id: int,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if seq_len < 1 or batch_size < 1:
            raise UserError("seq_len and batch_size must be positive")
        itemsize = np.dtype(dtype).itemsize
        self.n_tokens = path.stat().st_size // itemsize
        self.data: npt.NDArray[np.unsignedinteger] = (
            np.memmap(path, dtype=dtype, mode="r") if self.n_tokens else np.zeros(0, dtype)
        )
        self.seq_len, self.batch_size, self.pad_id = seq_len, batch_size, pad_id
        self.seed, self.shuffle = seed, shuffle
        # A window needs at least 2 tokens (one input, one target).
        self.num_windows = -(-(self.n_tokens - 1) // seq_len) if self.n_tokens >= 2 else 0
        self.batches_per_epoch = -(-self.num_windows // batch_size)
        self._order: tuple[int, npt.NDArray[np.int64]] | None = None

    def order(self, epoch: int) -> npt.NDArray[np.int64]:
        if self._order is None or self._order[0] != epoch:
            if self.shuffle:
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            else:
                perm = np.arange(self.num_windows)
            self._order = (epoch, perm.astype(np.int64))
        return self._order[1]

    def batch(self, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.batches_per_epoch:
            raise IndexError(f"batch {index} outside 0..{self.batches_per_epoch - 1}")
        b = self.batch_size
        return self.windows(self.order(epoch)[index * b : (index + 1) * b])

    def windows(self, idx: npt.NDArray[np.int64]) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows by index -> x [len(idx), seq_len] token ids, y the same with -100 at pads."""
        t = self.seq_len
        x = np.full((len(idx), t), self.pad_id, dtype=np.int64)
        y = np.full((len(idx), t), IGNORE_INDEX, dtype=np.int64)
        for row, w in enumerate(idx.tolist()):
            chunk = self.data[w * t : w * t + t + 1]
            n = len(chunk) - 1
            x[row, :n] = chunk[:-1]
            y[row, :n] = chunk[1:]
        return torch.from_numpy(x), torch.from_numpy(y)

    def eval_batches(self, max_batches: int) -> list[npt.NDArray[np.int64]]:
        """A fixed, deterministic set of window batches spread evenly over the split."""
        if self.num_windows == 0 or max_batches < 1:
            return []
        n = min(self.num_windows, max_batches * self.batch_size)
        idx = np.unique(np.linspace(0, self.num_windows - 1, n).round().astype(np.int64))
        return [idx[i : i + self.batch_size] for i in range(0, len(idx), self.batch_size)]
