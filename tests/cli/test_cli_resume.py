"""`gsq quantize` killed with SIGKILL in the middle of a block, then `--resume`d, writes the same
bytes (codes, scales and model shards) as an uninterrupted run; a resume with another config is
refused with one line; nothing appears at --out before the run completes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gsq.io.partial import partial_path

WORDS = ("the", "of", "and", "to", "in", "is", "was", "that", "for", "on", "with", "as", "by")
# GSQ with every block stage on a tiny budget (a block takes about a second); the end-to-end
# scale stage, which runs on the finished directory after the block loop and may rewrite it as
# one file, is off so that the per-block shards the resume writes are what is compared
BUDGET = ["--method", "gsq", "--group-size", "32", "--nsamples", "8", "--val-samples", "2",
          "--gptq-samples", "4", "--seqlen", "16", "--batch-size", "4", "--micro-batch-size", "2",
          "--epochs", "1", "--qk-steps", "4", "--e2e-epochs", "0"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama, byte_tokenizer):
    root = tmp_path_factory.mktemp("resume")
    tiny_llama(7, num_hidden_layers=4).to(torch.bfloat16).save_pretrained(root / "model")
    byte_tokenizer.save_pretrained(root / "model")
    rng = random.Random(2)
    (root / "calib.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(1500)))
    return root


def _argv(root: Path, out: Path, *extra: str, quiet: bool = True) -> list[str]:
    return [sys.executable, "-m", "gsq.cli", *(["-q"] if quiet else []), "quantize",
            str(root / "model"), "--calib", str(root / "calib.txt"), "--out", str(out), *BUDGET,
            *extra]


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[2] / "src")
    return {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def _done(out: Path) -> int:
    try:
        return json.loads((partial_path(out) / "run.json").read_text())["done"]
    except (OSError, ValueError, KeyError):
        return 0


def _outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix == ".safetensors"}


def test_sigkill_mid_block_then_resume_gives_the_same_bytes(setup, tmp_path):
    reference = tmp_path / "ref"
    subprocess.run(_argv(setup, reference), env=_env(), check=True, capture_output=True)
    out = tmp_path / "q"
    proc = subprocess.Popen(_argv(setup, out), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while _done(out) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)  # block 2 has just started
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert 2 <= _done(out) < 4
    assert not out.exists()  # nothing finished-looking before completion

    changed = subprocess.run(_argv(setup, out, "--resume", "--seed", "1"), env=_env(),
                             capture_output=True, text=True)
    assert changed.returncode == 2
    lines = [line for line in changed.stderr.splitlines() if line.startswith("gsq: error:")]
    assert len(lines) == 1 and "the run config differs (config.seed: 0 -> 1)" in lines[0]

    resumed = subprocess.run(_argv(setup, out, "--resume", quiet=False), env=_env(),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr and "continuing at block" in resumed.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["resumed_from_block"] >= 2 and len(report["blocks"]) == 4
    assert not partial_path(out).exists()
    ours, theirs = _outputs(out), _outputs(reference)
    assert "gsq_codes.safetensors" in ours and len(ours) == 6  # codes + 5 model shards
    assert ours == theirs
