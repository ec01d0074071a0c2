"""The calibration mix: spec parsing, the bundled parts, proportional windows, chat rendering."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gsq.data.calibration import (
    BUNDLED_SOURCES,
    DEFAULT_MIX,
    CalibSource,
    TokenMix,
    _apportion,
    cut_windows,
    load_calibration_mix,
    load_calibration_text,
    parse_calib_spec,
    render_chat,
    window_capacity,
)
from gsq.errors import GSQError

# ----------------------------------------------------------------------------- parse_calib_spec


def test_spec_weights_are_normalised(tmp_path: Path) -> None:
    path = str(tmp_path / "notes.txt")
    assert parse_calib_spec(f"fiction:0.3,code:0.2,{path}:0.5") == [
        CalibSource("fiction", 0.3), CalibSource("code", 0.2), CalibSource(path, 0.5)]
    assert parse_calib_spec("code:3, dialogue:1") == [CalibSource("code", 0.75),
                                                      CalibSource("dialogue", 0.25)]


def test_spec_without_weights_is_equal_shares() -> None:
    assert parse_calib_spec("code,dialogue") == [CalibSource("code", 0.5),
                                                 CalibSource("dialogue", 0.5)]
    assert parse_calib_spec("c:/data/x.txt") == [CalibSource("c:/data/x.txt", 1.0)]


def test_default_spec_is_the_whole_mix() -> None:
    default = parse_calib_spec(None)
    assert default == parse_calib_spec("mix") == parse_calib_spec(DEFAULT_MIX)
    assert {s.source for s in default} == set(BUNDLED_SOURCES) - {"book"}
    assert sum(s.weight for s in default) == pytest.approx(1.0)


@pytest.mark.parametrize("spec, match", [
    ("code:0.5,dialogue", "every source or to none"),
    ("code:0,dialogue:1", "positive number"),
    ("code:-1", "positive number"),
    ("code:nan", "positive number"),
    ("code,,dialogue", "empty entry"),
    ("code:1,code:2", "twice"),
])
def test_bad_specs(spec: str, match: str) -> None:
    with pytest.raises(GSQError, match=match):
        parse_calib_spec(spec)


# ----------------------------------------------------------------------------- bundled parts


@pytest.mark.parametrize("part, marker", [
    ("fiction", "Lucy"), ("encyclopedic", "Background:"), ("technical", "PEP"),
    ("code", "def "), ("dialogue", "ROMEO"), ("book", "Darcy"),
])
def test_bundled_parts_load(part: str, marker: str) -> None:
    text = load_calibration_text(part)
    assert len(text) > 300_000 and marker in text
    assert "wikitext" not in text.lower()[:1000]


# ----------------------------------------------------------------------------- windows


def _mix(*sizes_weights: tuple[int, float]) -> TokenMix:
    """Source i's tokens are 1000*i + 0..n-1: every window tells its source."""
    return TokenMix([(CalibSource(f"s{i}", w), torch.arange(n) + 1000 * i)
                     for i, (n, w) in enumerate(sizes_weights)])


def test_apportion_is_exact_and_proportional() -> None:
    assert _apportion(8, [0.25, 0.2, 0.2, 0.15, 0.2]) == [2, 2, 2, 1, 1]
    for n in (0, 1, 7, 64, 1000):
        counts = _apportion(n, [0.5, 0.3, 0.2])
        assert sum(counts) == n
        assert all(abs(c - n * w) < 1 for c, w in zip(counts, [0.5, 0.3, 0.2], strict=True))


def test_mix_windows_follow_the_proportions() -> None:
    mix = _mix((800, 0.5), (500, 0.3), (400, 0.2))
    counts = {"train": 20, "val": 5, "gptq": 10}
    out = cut_windows(mix, counts, seqlen=10, seed=0)
    seen = set()
    for split, n in counts.items():
        windows = out[split]
        assert windows.shape == (n, 10)
        source = windows[:, 0] // 1000
        assert [int((source == i).sum()) for i in range(3)] == _apportion(n, [0.5, 0.3, 0.2])
        # each window is a contiguous chunk of its own source's stream
        assert torch.equal(windows - windows[:, :1], torch.arange(10).expand(n, 10))
        assert all(int(w[0]) % 1000 % 10 == 0 for w in windows)
        starts = {int(w[0]) for w in windows}
        assert not starts & seen  # disjoint across splits
        seen |= starts


def test_mix_windows_deterministic_with_the_seed() -> None:
    mix = _mix((800, 0.5), (500, 0.5))
    counts = {"train": 12, "val": 4}
    a, b = (cut_windows(mix, counts, 10, seed=5) for _ in range(2))
    other = cut_windows(mix, counts, 10, seed=6)
    assert all(torch.equal(a[s], b[s]) for s in counts)
    assert not all(torch.equal(a[s], other[s]) for s in counts)


def test_mix_source_too_short_names_it() -> None:
    mix = _mix((800, 0.5), (50, 0.5))
    with pytest.raises(GSQError, match=r"source 's1' \(50% of the windows\).*need 10"):
        cut_windows(mix, {"train": 20}, 10, 0)


def test_window_capacity_is_safe() -> None:
    mix = _mix((1000, 0.5), (700, 0.3), (300, 0.2))
    cap = window_capacity(mix, 10)
    assert cap == min((100 - 4) / 0.5, (70 - 4) / 0.3, (30 - 4) / 0.2) // 1
    for split in range(1, 5):  # any split of the capacity into up to 4 splits can be cut
        counts = {str(i): cap // split + (i < cap % split) for i in range(split)}
        cut_windows(mix, counts, 10, 0)
    assert window_capacity(torch.arange(105), 10) == 10


# ----------------------------------------------------------------------------- chat template


class _ChatTokenizer:
    chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"

    def apply_chat_template(self, messages, tokenize: bool):
        assert tokenize is False
        return "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages)

    def __call__(self, text: str, add_special_tokens: bool, **kwargs) -> dict:
        return {"input_ids": [ord(c) for c in text]}


def test_render_chat_turns() -> None:
    text = "Question one?\n\nAnswer one.\n\nMore of it.\n\n\n\nLone paragraph."
    out = render_chat(_ChatTokenizer(), text)
    assert out.startswith("<|user|>Question one?<|end|><|assistant|>Answer one.\n\nMore of it.")
    for para in ("Question one?", "Answer one.", "More of it.", "Lone paragraph."):
        assert out.count(para) == 1


def test_chat_template_needs_a_template(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("x\n\ny", encoding="utf-8")
    tok = _ChatTokenizer()
    tok.chat_template = None
    with pytest.raises(GSQError, match="no chat template"):
        load_calibration_mix(tok, str(tmp_path / "a.txt"), chat_template=True)


def test_load_mix_tokenizes_each_source(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("aaaa", encoding="utf-8")
    (tmp_path / "b.txt").write_text("bb", encoding="utf-8")
    mix = load_calibration_mix(_ChatTokenizer(), f"{tmp_path / 'a.txt'}:1,{tmp_path / 'b.txt'}:3")
    assert [(s.weight, t.tolist()) for s, t in mix.parts] == [(0.25, [97] * 4), (0.75, [98] * 2)]
