"""Corpus formats (trainer/formats.py): every format, plain or compressed, gives the same
splits as the same text in a .txt file; a wrong field is named with the fields there are; a
forced format reads a misleadingly named file; a big corpus streams in bounded memory."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import get_args

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from actors.workers.ingest import prepare
from protocol.codec import decode_command
from protocol.commands import CorpusIngest
from protocol.settings import CorpusFormat
from trainer.__main__ import main as trainer_main
from trainer.corpus import SPLITS, CorpusConfig, CorpusManifest, prepare_corpus, split_path
from trainer.errors import FieldError, UserError
from trainer.formats import READERS, Format, json_array_items

# Documents with what each format must carry through: commas, quotes, backslashes, brackets
# inside strings, tabs, CRLF and lone newlines inside a record, non-ASCII, blank records.
DOCS = [
    "First line, with a comma\nand its second line",
    'She said "hello" \\ and [left] {braces} behind',
    "café naïve 日本語 🙂",
    "a tab\there, and CRLF\r\ninside",
    "",
    "   indented, with trailing spaces   ",
    *(f"document {i}: the quick brown fox {i * 7 % 13}\nline two of {i}" for i in range(60)),
]
CONFIG = CorpusConfig(seed=3)


def _txt() -> bytes:
    return ("\n".join(DOCS) + "\n").encode()


def _jsonl() -> bytes:
    return "".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(DOCS)).encode()


def _json() -> bytes:
    # Pretty-printed, non-ASCII kept: brackets and escapes the array scanner must step over.
    items = [{"id": i, "meta": {"tags": ["a", "]"]}, "text": d} for i, d in enumerate(DOCS)]
    return json.dumps(items, indent=1, ensure_ascii=False).encode()


def _table(dialect: type[csv.Dialect]) -> bytes:
    out = io.StringIO(newline="")
    w = csv.writer(out, dialect)
    w.writerow(["id", "text"])
    w.writerows([i, d] for i, d in enumerate(DOCS))
    return out.getvalue().encode()


def _parquet() -> bytes:
    out = io.BytesIO()
    table = pa.table({"id": list(range(len(DOCS))), "text": DOCS})
    pq.write_table(table, out, row_group_size=16)  # several row groups
    return out.getvalue()


WRITERS: dict[str, tuple[str, Callable[[], bytes]]] = {
    "txt": (".txt", _txt),
    "jsonl": (".jsonl", _jsonl),
    "json": (".json", _json),
    "json lines": (".json", _jsonl),  # what datasets' to_json writes
    "csv": (".csv", lambda: _table(csv.excel)),
    "tsv": (".tsv", lambda: _table(csv.excel_tab)),
    "parquet": (".parquet", _parquet),
}


def _zstd(data: bytes) -> bytes:
    """Two frames, as pzstd or an append writes: both must be read."""
    half = len(data) // 2
    c = zstandard.ZstdCompressor()
    return c.compress(data[:half]) + c.compress(data[half:])


COMPRESSORS: dict[str, tuple[str, Callable[[bytes], bytes]]] = {
    "plain": ("", lambda d: d),
    "gz": (".gz", gzip.compress),
    "zst": (".zst", _zstd),
}


def _split_hashes(m: CorpusManifest) -> dict[str, str]:
    return {s: m.splits[s].sha256 for s in SPLITS}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> CorpusManifest:
    d = tmp_path_factory.mktemp("ref")
    (d / "corpus.txt").write_bytes(_txt())
    m = prepare_corpus(d / "corpus.txt", d / "out", CONFIG)
    assert sum(m.splits[s].lines for s in SPLITS) == 2 * 60 + 7  # CRLF: 2 lines, "" none
    return m


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A Dataset and a DatasetDict saved by `datasets` itself (local, no hub)."""
    import datasets

    d = tmp_path_factory.mktemp("hf")
    ids = list(range(len(DOCS)))
    datasets.Dataset.from_dict({"id": ids, "text": DOCS}).save_to_disk(
        str(d / "dataset"), max_shard_size="2KB"
    )
    half = len(DOCS) // 2
    parts = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"id": ids[:half], "text": DOCS[:half]}),
            "test": datasets.Dataset.from_dict({"id": ids[half:], "text": DOCS[half:]}),
        }
    )
    parts.save_to_disk(str(d / "dataset_dict"))
    return {"hf": d / "dataset", "hf dict": d / "dataset_dict"}


CASES = [(w, c) for w in WRITERS for c in COMPRESSORS] + [("hf", "plain"), ("hf dict", "plain")]


@pytest.mark.parametrize(("fmt", "compression"), CASES)
def test_every_format_gives_the_splits_of_the_same_text(
    fmt: str,
    compression: str,
    reference: CorpusManifest,
    hf_folders: dict[str, Path],
    tmp_path: Path,
) -> None:
    if fmt in hf_folders:
        source = hf_folders[fmt]
        assert len(list(source.rglob("*.arrow"))) > 1  # several shards (or splits) read
    else:
        suffix, write = WRITERS[fmt]
        ext, compress = COMPRESSORS[compression]
        source = tmp_path / f"corpus{suffix}{ext}"
        source.write_bytes(compress(write()))
    m = prepare_corpus(source, tmp_path / "out", CONFIG)
    assert _split_hashes(m) == _split_hashes(reference)
    for s in SPLITS:
        assert m.splits[s].lines == reference.splits[s].lines
    if fmt in hf_folders:
        assert {f.format for f in m.files} == {"hf"}
        assert any(f.path.endswith("state.json") for f in m.files)
    else:
        assert [f.format for f in m.files] == [{"txt": "text", "json lines": "json"}.get(fmt, fmt)]


def test_a_folder_mixes_formats_and_saved_datasets(
    hf_folders: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    root = tmp_path / "mixed"
    root.mkdir()
    shutil.copytree(hf_folders["hf"], root / "b_saved")
    (root / "a.csv.gz").write_bytes(gzip.compress(_table(csv.excel)))
    (root / "c.md").write_text("# Title\n\n**bold** words\n")
    (root / "notes.rst").write_text("not a corpus format\n")
    m = prepare_corpus(root, tmp_path / "out", CONFIG)
    names = [(f.path, f.format) for f in m.files]
    assert names[0] == ("a.csv.gz", "csv") and names[-1] == ("c.md", "text")
    assert {fmt for _, fmt in names[1:-1]} == {"hf"}
    assert all(p.startswith("b_saved/") for p, _ in names[1:-1])
    lines = [x for s in SPLITS for x in split_path(tmp_path / "out", s).read_text().splitlines()]
    assert len(lines) == 2 * (2 * 60 + 7) + 2 and "bold words" in lines


@pytest.mark.parametrize(
    ("name", "data", "fields"),
    [
        ("c.jsonl", _jsonl, "'id', 'text'"),
        ("c.json", _json, "'id', 'meta', 'text'"),
        ("c.csv.zst", lambda: _zstd(_table(csv.excel)), "'id', 'text'"),
        ("c.parquet", _parquet, "'id', 'text'"),
    ],
)
def test_a_wrong_field_is_named_with_the_fields_there_are(
    name: str, data: Callable[[], bytes], fields: str, tmp_path: Path
) -> None:
    (tmp_path / name).write_bytes(data())
    with pytest.raises(FieldError) as caught:
        prepare_corpus(tmp_path / name, tmp_path / "out", CorpusConfig(text_field="body"))
    assert caught.value.field == "text_field"
    assert f"{name!r} has no field 'body'" in str(caught.value)
    assert f"its fields: {fields}" in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_python_m_trainer_reads_a_format_and_names_a_wrong_field(
    reference: CorpusManifest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "c.tsv.zst").write_bytes(_zstd(_table(csv.excel_tab)))
    args = ["corpus", str(tmp_path / "c.tsv.zst"), "--seed", "3"]
    assert trainer_main([*args, "--out", str(tmp_path / "o"), "--text-field", "text"]) == 0
    m = msgspec.json.decode((tmp_path / "o" / "corpus.json").read_bytes(), type=CorpusManifest)
    assert _split_hashes(m) == _split_hashes(reference)
    assert trainer_main([*args, "--out", str(tmp_path / "p"), "--text-field", "body"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: text_field: corpus file 'c.tsv.zst' has no field 'body'")
    assert "its fields: 'id', 'text'" in err and "Traceback" not in err


def test_a_wrong_field_of_a_saved_dataset(hf_folders: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(FieldError, match=r"no field 'body'.*its fields: 'id', 'text'"):
        prepare_corpus(hf_folders["hf"], tmp_path / "o", CorpusConfig(text_field="body"))


def test_another_text_field(reference: CorpusManifest, tmp_path: Path) -> None:
    table = pa.table({"body": DOCS, "text": ["not this"] * len(DOCS)})
    pq.write_table(table, tmp_path / "c.parquet")
    cfg = CorpusConfig(seed=3, text_field="body")
    m = prepare_corpus(tmp_path / "c.parquet", tmp_path / "o", cfg)
    assert _split_hashes(m) == _split_hashes(reference)


def test_a_forced_format_reads_a_misleading_name(
    reference: CorpusManifest, hf_folders: dict[str, Path], tmp_path: Path
) -> None:
    (tmp_path / "notes.txt").write_bytes(_jsonl())  # jsonl named .txt
    forced = CorpusConfig(seed=3, corpus_format="jsonl")
    m = prepare_corpus(tmp_path / "notes.txt", tmp_path / "a", forced)
    assert _split_hashes(m) == _split_hashes(reference) and m.files[0].format == "jsonl"
    # left to its name, the same file is JSON text split by line: other splits
    plain = prepare_corpus(tmp_path / "notes.txt", tmp_path / "b", CorpusConfig(seed=3))
    assert _split_hashes(plain) != _split_hashes(reference)
    # no name to go by, and gzip told by its bytes
    (tmp_path / "export.bin").write_bytes(gzip.compress(_table(csv.excel_tab)))
    tsv = CorpusConfig(seed=3, corpus_format="tsv")
    assert _split_hashes(prepare_corpus(tmp_path / "export.bin", tmp_path / "c", tsv)) == (
        _split_hashes(reference)
    )
    # a folder forced to jsonl reads every file in it as jsonl
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "part.data").write_bytes(_jsonl())
    m = prepare_corpus(tmp_path / "dir", tmp_path / "d", forced)
    assert _split_hashes(m) == _split_hashes(reference)
    with pytest.raises(UserError, match="not saved by datasets' save_to_disk"):
        prepare_corpus(tmp_path / "dir", tmp_path / "e", CorpusConfig(corpus_format="hf"))
    # a parquet file named .txt: the message says how to read it
    (tmp_path / "x.txt").write_bytes(_parquet())
    with pytest.raises(UserError, match=r"looks binary .*set corpus_format"):
        prepare_corpus(tmp_path / "x.txt", tmp_path / "f", CorpusConfig())


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("t.jsonl", b'{"text": "a"}\n[1, 2]\n', r"'t.jsonl', line 2: not a JSON object"),
        ("t.jsonl", b'{"text": "a"}\n{"text": 5}\n', r"line 2, field 'text': Expected `str`"),
        ("t.json", b'[{"text": "a"}, "b"]', r"not a JSON array of objects: item 2 is not an"),
        ("t.json", b'[{"text": "a"} {"text": "b"}]', r"unexpected '\{' after item 1"),
        ("t.json", b'[{"text": "a"},\n', r"ends before the array is closed"),
        ("t.json", b'[{"text": "a"}] x', r"text after the array's end"),
        ("t.json", b"42", r"not a JSON array of objects nor JSON lines"),
        ("t.csv", b'text\n"open quote\n', r"'t.csv', line 2: unexpected end of data"),
        ("t.jsonl.gz", gzip.compress(b'{"text": "a"}\n' * 50)[:-12], r"not valid gzip"),
        ("t.jsonl.zst", _zstd(b'{"text": "a"}\n' * 50)[:-4], "not valid zstd: .*truncated"),
        ("t.jsonl.zst", b"\x28\xb5\x2f\xfd garbage", "not valid zstd"),
        ("t.parquet", b"PAR1 not really", r"'t.parquet' is not a valid parquet file"),
    ],
)
def test_bad_content_is_a_user_error_naming_the_file(
    name: str, data: bytes, message: str, tmp_path: Path
) -> None:
    (tmp_path / name).write_bytes(data)
    with pytest.raises(UserError, match=message):
        prepare_corpus(tmp_path / name, tmp_path / "out", CorpusConfig())


def test_a_null_or_a_number_column_is_refused(tmp_path: Path) -> None:
    pq.write_table(pa.table({"text": ["a", None, "c"]}), tmp_path / "n.parquet")
    with pytest.raises(UserError, match="column 'text' is null at row 1"):
        prepare_corpus(tmp_path / "n.parquet", tmp_path / "o", CorpusConfig())
    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "i.parquet")
    with pytest.raises(UserError, match="column 'text' holds int64, not text"):
        prepare_corpus(tmp_path / "i.parquet", tmp_path / "o", CorpusConfig())


def test_every_format_a_setting_names_has_a_reader() -> None:
    assert set(get_args(CorpusFormat)) == {"auto", *READERS} == {"auto", *get_args(Format)}


def test_the_json_array_is_cut_the_same_whatever_the_chunks() -> None:
    text = _json().decode()
    whole = list(json_array_items([text], "t.json"))
    assert [json.loads(item)["text"] for item in whole] == DOCS
    for size in (1, 2, 3, 7, 64):
        chunks = [text[i : i + size] for i in range(0, len(text), size)]
        assert list(json_array_items(chunks, "t.json")) == whole
    assert list(json_array_items(["  [ ]  "], "t.json")) == []


def test_ingest_passes_the_settings_through(reference: CorpusManifest, tmp_path: Path) -> None:
    """A raw XADD's corpus_format / text_field reach prepare_corpus through the ingest actor's
    pool function (the HTTP body, CLI and TOML build the same command: test_settings)."""
    root = tmp_path / "root"
    root.mkdir()
    table = pa.table({"body": DOCS})
    pq.write_table(table, root / "c.dat")
    raw = {
        "kind": "corpus.ingest",
        "command_id": "r1.ingest",
        "run_id": "r1",
        "corpus_id": "r1-corpus",
        "path": "c.dat",
        "seed": 3,
        "corpus_format": "parquet",
        "text_field": "body",
    }
    cmd = decode_command("ingest", json.dumps(raw))
    assert isinstance(cmd, CorpusIngest)
    m = prepare("c.dat", False, str(tmp_path / "out"), str(root), cmd)
    assert _split_hashes(m) == _split_hashes(reference)
    assert m.config.corpus_format == "parquet" and m.config.text_field == "body"
    with pytest.raises(msgspec.ValidationError, match=r"\$\.corpus_format"):
        decode_command("ingest", json.dumps({**raw, "corpus_format": "xlsx"}))


# ---------------------------------------------------------------------------- streaming

BIG_BYTES = 200 * 2**20  # about 200 MB of text per corpus
BLOCK_ROWS = 4000
# The child is the ingest pool's work alone: what it imports besides is not the corpus's.
CHILD = """
import sys
from pathlib import Path
from trainer.corpus import CorpusConfig, prepare_corpus
m = prepare_corpus(Path(sys.argv[1]), Path(sys.argv[2]), CorpusConfig(text_field="body"))
status = Path("/proc/self/status").read_text()
print(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
"""


def _block() -> list[str]:
    """BLOCK_ROWS documents of 8 lines, about 1 KB each."""
    return [
        "\n".join(f"row {r} line {k}: " + "lorem ipsum dolor sit amet " * 4 for k in range(8))
        for r in range(BLOCK_ROWS)
    ]


def _write_big(path: Path, fmt: str) -> int:
    """A corpus of about BIG_BYTES from one block written again and again: its text bytes."""
    block = _block()
    block_bytes = sum(len(d) + 1 for d in block)
    repeats = BIG_BYTES // block_bytes
    if fmt == "parquet":
        table = pa.table({"body": block})
        # no dictionary, no compression: the file is as big as its text
        with pq.ParquetWriter(path, table.schema, use_dictionary=False, compression="none") as w:
            for _ in range(repeats):
                w.write_table(table, row_group_size=BLOCK_ROWS)
    else:
        data = "".join(json.dumps({"body": d}) + "\n" for d in block).encode()
        with path.open("wb") as f:
            for _ in range(repeats):
                f.write(data)
    return repeats * block_bytes


def _peak_rss_mib(source: Path, out: Path) -> float:
    """Run prepare_corpus on source in a child; its peak resident memory in MiB."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(source), str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stderr.decode()
    # VmHWM: the peak since exec (getrusage's maxrss would count the forked pytest too).
    return int(stdout) / 1024


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_a_big_corpus_streams_in_bounded_memory(fmt: str, tmp_path: Path) -> None:
    small = tmp_path / f"small.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.table({"body": _block()[:50]}), small)
    else:
        small.write_text("".join(json.dumps({"body": d}) + "\n" for d in _block()[:50]))
    big = tmp_path / f"big.{fmt}"
    text_bytes = _write_big(big, fmt)
    base = _peak_rss_mib(small, tmp_path / "small-out")
    peak = _peak_rss_mib(big, tmp_path / "big-out")
    m = msgspec.json.decode((tmp_path / "big-out" / "corpus.json").read_bytes(), type=dict)
    lines = sum(s["lines"] for s in m["splits"].values())
    assert lines == 8 * BLOCK_ROWS * (text_bytes // sum(len(d) + 1 for d in _block()))
    print(f"{fmt}: {text_bytes / 2**20:.0f} MiB of text, peak RSS {peak:.0f} MiB (base {base:.0f})")
    # The corpus never sits in memory: the peak is the small corpus's plus bounded buffers
    # (the base is mostly the interpreter and pyarrow's libraries).
    assert peak - base < 32, (peak, base)
