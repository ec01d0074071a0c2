"""Data parallel over the processes of a torchrun launch (`gsq.dist`): 2 gloo processes give the
same bits as 1 process, and a failing rank stops the run with nothing at --out.

Why bit-for-bit: the processes exchange only elementwise sums of partial sums (Hessian sums and
token counts, gradients, training losses) and rank 0's held-out losses. With two ranks a sum over
ranks is a + b, which is exactly what one process computes when it adds the same two parts in
sequence, (0 + a) + b. The budgets below give every optimiser step two micro-batches and every
Hessian two chunks of GPTQ windows, so every sum has two parts, dealt one to each rank; all
processes run one thread, as the reference does (a BLAS may split a product's reduction over
threads). With more parts per sum the grouping differs ((a + c) + (b + d) against
((a + b) + c) + d) and results agree to rounding only (benchmarks/RESULTS.md).

The activations pushed through each block are computed in shares (batch i by rank i mod N) and
shared (a node-wide memory-mapped store under the CLI, sent between ranks in memory): the report's
`ranks` entries show each rank's share of the windows and that the CLI's activations are one copy.

MoE experts are expert parallel for GPTQ: expert e's Hessian sums are reduced to rank e mod 2
alone (the same a + b), solved there, and its codes sent to every rank; batched GPTQ gives each
expert the bits it gets alone (tests/quant/test_gptq.py), so an owner's smaller batch changes
nothing.

The launches run `dist_worker.py` under `python -m torch.distributed.run` (torchrun).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gsq
from gsq.cli.__main__ import main

HERE = Path(__file__).resolve().parent
WORKER = HERE / "dist_worker.py"
sys.path.insert(0, str(HERE))
import dist_worker  # noqa: E402

# Two micro-batches per step (batch 4 of 2), two GPTQ chunks (4 windows of 2); one epoch.
BUDGET = ["--group-size", "32", "--nsamples", "8", "--val-samples", "2", "--gptq-samples", "4",
          "--seqlen", "16", "--batch-size", "4", "--micro-batch-size", "2", "--epochs", "1",
          "--qk-steps", "4", "--device", "cpu"]


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(gsq.__file__).resolve().parents[1]),
                                          os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", str(WORKER), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def _expert_index(name: str) -> int:
    return int(name.rsplit(".", 1)[1])


def test_two_processes_quantize_the_same_bits_as_one(tmp_path):
    """Tiny Llama (GSQ with the e2e scale stage, GPTQ), Qwen3-MoE (GSQ, GPTQ, GSQ with starved
    experts) and Mixtral (GPTQ with starved experts) in memory; each rank solved GPTQ for the
    experts it owns (e mod 2) and no other."""
    run = torchrun(2, "records", str(tmp_path / "rec"))
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rec.rank{r}") for r in (0, 1)]
    refs = {}
    for name in dist_worker.CASES:
        ref = refs[name] = dist_worker.run_case(name)
        assert ref["records"], name
        for rank, got in enumerate(ranks):
            assert got[name]["records"].keys() == ref["records"].keys(), (name, rank)
            for module, (codes, scale) in ref["records"].items():
                got_codes, got_scale = got[name]["records"][module]
                assert torch.equal(got_codes, codes), (name, rank, module)
                assert torch.equal(got_scale, scale), (name, rank, module)
            assert got[name]["val"] == ref["val"], (name, rank)
            assert got[name]["e2e"] == ref["e2e"], (name, rank)
            _check_shares(got[name]["ranks"], ref["ranks"])
            for (solved, starved), (ref_solved, ref_starved) in zip(got[name]["moe"], ref["moe"],
                                                                    strict=True):
                assert starved == ref_starved, (name, rank)
                assert solved == [e for e in ref_solved if _expert_index(e) % 2 == rank], name
        if not name.startswith("llama"):  # one process solves every expert; some starve
            assert len(ref["moe"]) == 2 and all(len(s) == 4 for s, _ in ref["moe"]), name
            assert all(bool(f) == name.endswith("starved") for _, f in ref["moe"]), name
    assert len(refs["llama-gsq"]["e2e"]) == 1  # the e2e stage ran its epoch
    for arch in ("llama", "qwen3_moe"):  # training moved codes away from GPTQ's: it is compared
        gsq_codes, gptq_codes = (refs[f"{arch}-{m}"]["records"] for m in ("gsq", "gptq"))
        assert any(not torch.equal(gsq_codes[n][0], gptq_codes[n][0]) for n in gsq_codes), arch


@pytest.fixture(scope="module")
def single_process_dir(tmp_path_factory, tiny_llama_dir) -> tuple[Path, Path]:
    """The calibration text and the output of `gsq quantize` in this (one) process."""
    root = tmp_path_factory.mktemp("dist-cli")
    calib = root / "calib.txt"
    calib.write_text(" ".join(["the cat sat on the mat and looked at the door"] * 60))
    out = root / "one"
    assert main(["-q", "quantize", str(tiny_llama_dir), "--calib", str(calib), "--out", str(out),
                 *BUDGET]) == 0
    return calib, out


def _same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name != "report.json":  # wall times differ
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _check_shares(ranks: list[dict], single: list[dict]) -> None:
    """Two ranks listed with their own peak memory, each having propagated only its share of
    the windows one process propagates (batch i by rank i mod 2: 8 + 6 rows of 14 per block)."""
    assert [r["rank"] for r in ranks] == [0, 1] and [r["rank"] for r in single] == [0]
    assert all(r["peak_host_rss_gib"] > 0 for r in ranks)
    shares = [r["windows_propagated"] for r in ranks]
    assert sum(shares) == single[0]["windows_propagated"] > 0 and all(shares), shares
    assert max(shares) < single[0]["windows_propagated"], shares
    solved = [r["experts_solved"] for r in ranks]  # MoE: each rank its own experts (e mod 2)
    assert sum(solved) == single[0]["experts_solved"], solved
    assert max(solved) <= -(-single[0]["experts_solved"] // 2), solved


def test_cli_under_torchrun_writes_what_one_process_writes(tmp_path, tiny_llama_dir,
                                                           single_process_dir):
    """The same files; the report lists both ranks, each with its share of the propagation and
    the activations in the shared files (the same bytes one process keeps in RAM, and none in a
    rank's own RAM: one copy on the node)."""
    calib, one = single_process_dir
    out = tmp_path / "two"
    run = torchrun(2, "cli", "-q", "quantize", str(tiny_llama_dir), "--calib", str(calib),
                   "--out", str(out), *BUDGET)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("quantized 14 tensors") == 1, run.stdout  # rank 0 reports, alone
    _same_files(one, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two"]  # no partial directory left
    single, two = (json.loads((d / "report.json").read_text()) for d in (one, out))
    assert single["activations"] == "memory" and two["activations"] == "shared"
    _check_shares(two["ranks"], single["ranks"])
    in_ram = single["ranks"][0]["activations_private_gib"]
    assert in_ram > 0 and single["ranks"][0]["activations_file_gib"] == 0
    for rank in two["ranks"]:
        assert rank["activations_private_gib"] == 0
        assert rank["activations_file_gib"] == in_ram  # the same files, mapped by both ranks


def test_a_failing_rank_stops_the_run_and_one_process_resumes_it(tmp_path, tiny_llama_dir,
                                                                 single_process_dir):
    """Rank 1 raises at block 1: the launch fails with rank 1's error, nothing at --out; the
    partial directory rank 0 kept is resumed by one process to the same bytes."""
    calib, one = single_process_dir
    out = tmp_path / "two"
    args = ["-q", "quantize", str(tiny_llama_dir), "--calib", str(calib), "--out", str(out),
            *BUDGET]
    run = torchrun(2, "fail", *args)
    assert run.returncode != 0
    assert "gsq: error: injected failure on rank 1" in run.stderr, run.stderr[-3000:]
    assert not out.exists()
    assert main([*args, "--resume"]) == 0
    _same_files(one, out)


def test_streamed_e2e_stage_under_torchrun_writes_what_one_process_writes(tmp_path,
                                                                         tiny_llama_dir):
    """The e2e stage streamed one block at a time (`--e2e-streamed on`): each rank streams every
    block and runs its micro-batches, gradients summed; rank 0 rewrites --out."""
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(["the cat sat on the mat and looked at the door"] * 60))
    args = ["-q", "quantize", str(tiny_llama_dir), "--calib", str(calib), *BUDGET, "--method",
            "rtn", "--e2e-epochs", "1", "--e2e-lr", "0.01", "--e2e-streamed", "on"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    run = torchrun(2, "cli", *args, "--out", str(tmp_path / "two"))
    assert run.returncode == 0, run.stderr[-3000:]
    _same_files(tmp_path / "one", tmp_path / "two")
    reports = [json.loads((tmp_path / d / "report.json").read_text())["e2e"]
               for d in ("one", "two")]
    assert all(r["streamed"] and r["best_epoch"] == 1 for r in reports)
    assert reports[0]["history"][0]["val_kl"] == reports[1]["history"][0]["val_kl"]


def test_bpw_under_torchrun_writes_what_one_process_writes(tmp_path, tiny_llama_dir):
    """--bpw: every rank quantizes with rank 0's allocation (the followers allocate too, and
    rank 0's widths are broadcast), so two processes write the files one writes (GSQ: the ranks'
    summed gradients need the same quantizers on every rank)."""
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(["the cat sat on the mat and looked at the door"] * 60))
    args = ["-q", "quantize", str(tiny_llama_dir), "--calib", str(calib), *BUDGET, "--method",
            "gsq", "--bpw", "2.9"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    run = torchrun(2, "cli", *args, "--out", str(tmp_path / "two"))
    assert run.returncode == 0, run.stderr[-3000:]
    _same_files(tmp_path / "one", tmp_path / "two")
    widths = [json.loads((tmp_path / d / "report.json").read_text())["allocation"]["widths"]
              for d in ("one", "two")]
    assert widths[0] == widths[1] and len(set(widths[0].values())) > 1  # a real mix of widths
