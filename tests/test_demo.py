"""The demo's outputs: the table, the plot (PNG), the budgets (the demo itself runs the real model
for minutes and is not run here)."""

from __future__ import annotations

import pytest

from gsq.demo import BUDGETS, METHODS, format_table, quick_preset, run_demo, write_plot
from gsq.errors import GSQError

ROWS = [{"name": "base (fp32)", "method": "base", "ppl": 20.0, "kl": 0.0, "top1": 1.0,
         "bpp": 32.0}] + [
    {"name": f"{m} {b}", "method": m, "bits": b, "ppl": 100.0 / b + i, "kl": 1.0 / b + i,
     "top1": 0.5, "bpp": b + 0.25, "seconds": 1.0, "peak_gib": 1.0}
    for i, m in enumerate(METHODS) for b in (2, 3)]


def test_table_has_a_line_per_row():
    lines = format_table(ROWS).splitlines()
    assert len(lines) == 2 + len(ROWS)
    assert lines[2].startswith("| base (fp32) | 20.000 | 0.0000 | 1.0000 | 32.000 | - | - |")


def test_plot_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "demo.png"
    assert write_plot(ROWS, path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_budgets():
    quick = quick_preset(method="gsq", bits=2)
    assert quick.e2e.epochs == 0 and quick.nsamples == 16
    assert BUDGETS["quick"].max_blocks is not None and BUDGETS["full"].max_blocks is None
    with pytest.raises(GSQError, match="demo budget must be one of quick, full"):
        run_demo(budget="medium", text="unused")
