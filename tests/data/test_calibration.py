"""Tests for gsq.data.calibration: reading text, choosing a source, tokenizing, cutting windows."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from gsq.data import calibration as cal
from gsq.data.calibration import (
    bundled_text_path,
    cut_windows,
    load_calibration_text,
    read_text,
    tokenize_text,
)
from gsq.errors import GSQError

# ----------------------------------------------------------------------------- read_text


def test_read_text_file(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_bytes("héllo\r\nworld\n".encode())
    assert read_text(f) == "héllo\nworld\n"  # UTF-8, newlines normalised


def test_read_text_folder_sorted_and_joined(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "c.md").write_text("ignored", encoding="utf-8")
    assert read_text(tmp_path) == "first\n\nsecond"


def test_read_text_missing(tmp_path: Path) -> None:
    with pytest.raises(GSQError, match="does not exist"):
        read_text(tmp_path / "nope.txt")


def test_read_text_folder_without_txt(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("x", encoding="utf-8")
    with pytest.raises(GSQError, match="no .txt files"):
        read_text(tmp_path)


def test_read_text_empty(tmp_path: Path) -> None:
    f = tmp_path / "blank.txt"
    f.write_text("  \n\t\n", encoding="utf-8")
    with pytest.raises(GSQError, match="empty"):
        read_text(f)


def test_read_text_not_utf8(tmp_path: Path) -> None:
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(GSQError, match="not UTF-8"):
        read_text(f)


# ----------------------------------------------------------------------------- sources


def test_bundled_text_loads() -> None:
    path = bundled_text_path()
    assert path.is_file() and path.name == "pg1342.txt"
    text = load_calibration_text(None)
    assert len(text) > 500_000
    assert "Elizabeth" in text and "Darcy" in text


def test_load_calibration_text_path(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("some text", encoding="utf-8")
    assert load_calibration_text(str(tmp_path)) == "some text"


def test_load_calibration_text_unknown_source() -> None:
    with pytest.raises(GSQError, match=r"'nonsense-set' is neither a file/folder nor a known"):
        load_calibration_text("nonsense-set")


def test_dataset_without_datasets_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(GSQError, match="pip install datasets"):
        load_calibration_text("wikitext")


class _FakeStream:
    """Stands in for a streamed datasets.IterableDataset."""

    def __init__(self, rows: list[str]) -> None:
        self.rows = rows
        self.shuffled_with: tuple[int, int] | None = None

    def shuffle(self, seed: int, buffer_size: int) -> _FakeStream:
        self.shuffled_with = (seed, buffer_size)
        return self

    def __iter__(self):
        return iter({"text": r} for r in self.rows)


def _fake_datasets(monkeypatch: pytest.MonkeyPatch, stream: _FakeStream | Exception) -> list:
    calls: list = []

    def load_dataset(path, name, split, streaming):
        calls.append((path, name, split, streaming))
        if isinstance(stream, Exception):
            raise stream
        return stream

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_dataset_streams_train_split_until_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = _FakeStream(["a" * 10, "", "b" * 10, "c" * 10, "d" * 10])
    calls = _fake_datasets(monkeypatch, stream)
    text = load_calibration_text("fineweb-edu", max_chars=20)
    assert calls == [("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True)]
    assert stream.shuffled_with is not None and stream.shuffled_with[0] == 0
    assert text == "a" * 10 + "\n\n" + "b" * 10  # empty row skipped, stops at the budget
    assert "<|endoftext|>" not in text


def test_wikitext_uses_train_split(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_datasets(monkeypatch, _FakeStream([" = T = \n", "", " line .\n"]))
    text = load_calibration_text("wikitext")
    assert calls[0][1:3] == ("wikitext-2-raw-v1", "train")
    assert text == " = T = \n line .\n"


def test_dataset_download_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_datasets(monkeypatch, ConnectionError("Name or service not known\nmore detail"))
    with pytest.raises(GSQError, match=r"cannot download calibration dataset 'c4'.*not known$"):
        load_calibration_text("c4")


# ----------------------------------------------------------------------------- tokenize_text


class _CharTokenizer:
    """Maps each character to its code point; records the texts it was called with.

    With `prefix`, every call starts with an extra id 0, like a SentencePiece tokenizer that
    prepends a space to each input: then tokenizing in pieces is not exact.
    """

    def __init__(self, prefix: bool = False) -> None:
        self.prefix = prefix
        self.calls: list[str] = []

    def __call__(self, text: str, add_special_tokens: bool, **kwargs) -> dict:
        assert add_special_tokens is False
        self.calls.append(text)
        return {"input_ids": [0] * self.prefix + [ord(c) for c in text]}


TEXT = "line one\n\n  indented\nline two \n three\n\n four\nlast line\nx"


def test_split_for_tokenizer_cuts_only_at_safe_line_breaks() -> None:
    pieces = cal._split_for_tokenizer(TEXT, 5)
    assert "".join(pieces) == TEXT
    # Cuts after a lone newline ("indented\n|line") or before one space + word ("\n| three",
    # "\n\n| four"); never inside "\n\n  " (two spaces), never an empty last piece.
    assert pieces == [
        "line one\n\n  indented\n", "line two \n", " three\n\n", " four\n", "last line\nx"
    ]
    assert cal._split_for_tokenizer(TEXT, 1000) == [TEXT]


def test_tokenize_text_in_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cal, "TOKENIZE_CHUNK_CHARS", 5)
    tok = _CharTokenizer()
    ids = tokenize_text(tok, TEXT)
    assert ids.dtype == torch.long and ids.dim() == 1
    assert ids.tolist() == [ord(c) for c in TEXT]  # nothing lost or duplicated
    pieces = cal._split_for_tokenizer(TEXT, 5)
    assert len(pieces) == 5 and tok.calls[-5:] == pieces


def test_tokenize_text_whole_when_pieces_would_differ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cal, "TOKENIZE_CHUNK_CHARS", 5)
    tok = _CharTokenizer(prefix=True)
    ids = tokenize_text(tok, TEXT)
    assert ids.tolist() == [0] + [ord(c) for c in TEXT]  # one call: one prefix
    assert tok.calls[-1] == TEXT


# ----------------------------------------------------------------------------- cut_windows


def test_cut_windows_shapes_disjoint_deterministic() -> None:
    tokens = torch.arange(1000)  # 1000 // 10 = 100 chunks, each identified by its first token
    counts = {"train": 30, "val": 5, "gptq": 20}
    out = cut_windows(tokens, counts, seqlen=10, seed=3)
    assert list(out) == ["train", "val", "gptq"]
    starts: list[int] = []
    for split, n in counts.items():
        w = out[split]
        assert w.shape == (n, 10) and w.dtype == tokens.dtype
        assert torch.equal(w - w[:, :1], torch.arange(10).expand(n, 10))  # contiguous chunks
        assert (w[:, 0] % 10 == 0).all()  # aligned on the chunk grid: non-overlapping
        starts += w[:, 0].tolist()
    assert len(set(starts)) == len(starts)  # disjoint across splits

    again = cut_windows(tokens, counts, seqlen=10, seed=3)
    assert all(torch.equal(out[k], again[k]) for k in counts)
    other = cut_windows(tokens, counts, seqlen=10, seed=4)
    assert not torch.equal(out["train"], other["train"])
    assert out["train"][:, 0].tolist() != sorted(out["train"][:, 0].tolist())  # shuffled


def test_cut_windows_drops_tail_and_allows_zero() -> None:
    out = cut_windows(torch.arange(25), {"a": 2, "b": 0}, seqlen=12, seed=0)
    assert out["a"].shape == (2, 12) and out["b"].shape == (0, 12)
    assert out["a"].max() < 24


def test_cut_windows_too_few_tokens_message() -> None:
    msg = (
        "calibration text has 12,345 tokens = 6 windows of 2048; "
        "need 104 (train 64 + val 8 + gptq 32)"
    )
    with pytest.raises(GSQError) as exc:
        cut_windows(torch.zeros(12_345, dtype=torch.long), {"train": 64, "val": 8, "gptq": 32},
                    2048, 0)
    assert str(exc.value) == msg


@pytest.mark.parametrize(
    ("counts", "seqlen", "match"),
    [({"a": 1}, 1, "at least 2"), ({"a": -1}, 4, "negative")],
)
def test_cut_windows_bad_arguments(counts: dict[str, int], seqlen: int, match: str) -> None:
    with pytest.raises(GSQError, match=match):
        cut_windows(torch.arange(100), counts, seqlen, 0)
