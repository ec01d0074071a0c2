"""The GPU step benchmark still runs on the library it imports: its CPU dry run (tiny shapes, the
torch sampler) gives every requested row without an error, the staged projection included."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_gpu_step_dry_run(tmp_path):
    out = tmp_path / "step.json"
    assert _load("gpu_step").main(["--dry-run", "--modes", "plain", "torch-2bit", "torch-ternary",
                                   "--no-kernels", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["modes"]
    assert set(rows) == {"plain", "torch-2bit", "torch-ternary"}
    for name, row in rows.items():
        assert "error" not in row, (name, row)
        assert row["micro_ms"] > 0 and row["opt_ms"] > 0
    stages = rows["torch-2bit"]["stages"]
    assert all(stages[k] > 0 for k in ("t_q", "t_k", "t_vo", "t_mlp", "o_vo", "o_mlp"))
